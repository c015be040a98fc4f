"""Colour differences and colour-space helpers shared by normalisation, benchmarks and tests.

Perceptual error is measured as CIEDE2000 ΔE in CIELAB (D65), the standard for "how different do two
colours look": ΔE ≈ 1 is about the smallest difference an observer notices side by side, ΔE ≈ 2-3 is
visible on close inspection, and ΔE > 10 reads as a different colour.
"""

from __future__ import annotations

import numpy as np


def rgb_to_lab(image: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of an (..., 3) uint8 sRGB image, as float64 with L in [0, 100].

    Parameters
    ----------
    image : np.ndarray
        (..., 3) uint8 RGB.

    Returns
    -------
    np.ndarray
        (..., 3) float64 L*, a*, b*.
    """
    from skimage.color import rgb2lab

    _check_rgb8(image, "image")
    return rgb2lab(image.reshape(-1, 1, 3)).reshape(image.shape)


def delta_e_map(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-pixel CIEDE2000 ΔE between two uint8 RGB images of the same shape.

    Parameters
    ----------
    image, reference : np.ndarray
        (..., 3) uint8 RGB, same shape.

    Returns
    -------
    np.ndarray
        (...) float64 ΔE00.

    Examples
    --------
    >>> a = np.full((2, 2, 3), 200, np.uint8)
    >>> float(delta_e_map(a, a).max())
    0.0
    """
    from skimage.color import deltaE_ciede2000

    if image.shape != reference.shape:
        raise ValueError(f"image shape {image.shape} differs from reference shape {reference.shape}")
    return deltaE_ciede2000(rgb_to_lab(image), rgb_to_lab(reference), channel_axis=-1)


def mean_delta_e(image: np.ndarray, reference: np.ndarray, *, mask: np.ndarray | None = None) -> float:
    """Mean CIEDE2000 ΔE between two uint8 RGB images, optionally over ``mask`` pixels only.

    Parameters
    ----------
    image, reference : np.ndarray
        (..., 3) uint8 RGB, same shape.
    mask : np.ndarray, optional
        (...) bool; pixels to average over (all when ``None``).

    Returns
    -------
    float
        Mean ΔE00 (``nan`` when the mask is empty).
    """
    de = delta_e_map(image, reference)
    if mask is not None:
        de = de[mask.astype(bool)]
    return float(de.mean()) if de.size else float("nan")


def _check_rgb8(image: np.ndarray, what: str) -> None:
    if image.dtype != np.uint8 or image.shape[-1] != 3:
        raise ValueError(f"{what} must be (..., 3) uint8 RGB, got {image.dtype} {image.shape}")
