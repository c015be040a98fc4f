"""``--normalise macenko:PROFILE.json``: Macenko stain normalisation (Macenko et al., ISBI 2009).

Colours become optical densities ``OD = -log((I + 1) / (I0 + 1))`` against the image's own
background colour ``I0`` (the median of its brightest quarter: DM backgrounds are far from white,
and the original's fixed I0 = 255 would count the lamp's tint as stain); pixels with little stain
(any channel OD below ``BETA``) are dropped; the two stain vectors are the directions at the
``ALPHA`` and ``100 - ALPHA`` percentiles of angle in the plane of the two largest principal
components of the rest. Every pixel is unmixed into two stain concentrations, each concentration
is rescaled so its 99th percentile matches the target's, and the pixel is remixed with the
target's stain vectors and background. Stains are estimated per crop; the profile holds the
target's stain vectors, maximal concentrations and background colour, pooled over the target set.

The method models two stains (haematoxylin and eosin in histology; with May-Grünwald-Giemsa the
azure-eosin pair) and a white light, so it cannot move the background colour independently.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from cellbatch.normalise.profile import read_profile

if TYPE_CHECKING:
    import torch

ALPHA = 1.0  # percentile of angle that defines the stain vectors (robust extremes)
BETA = 0.15  # OD below which a channel counts as unstained
MIN_STAINED = 200  # fewer stained pixels than this and a crop is returned unchanged
MAX_FIT_PIXELS = 400_000  # pooled target pixels kept (a fixed-seed sample) for the fit


def background(image: np.ndarray) -> np.ndarray:
    """(3,) float64 background colour of an (H, W, 3) uint8 image: median of its brightest quarter."""
    flat = image.reshape(-1, 3)
    brightness = flat.sum(axis=1, dtype=np.int32)
    return np.median(flat[brightness >= np.quantile(brightness, 0.75)], axis=0).astype(np.float64)


def optical_density(image: np.ndarray, light: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H*W, 3) float64 optical density against the ``light`` colour (3,)."""
    return np.maximum(-np.log((image.reshape(-1, 3).astype(np.float64) + 1) / (light + 1)), 0.0)


def stain_vectors(od: np.ndarray) -> np.ndarray | None:
    """The (3, 2) unit stain matrix of (P, 3) optical densities, first column the more blue-absorbing
    (haematoxylin / azure: larger red OD), or ``None`` with fewer than ``MIN_STAINED`` stained pixels.
    """
    od = od[(od > BETA).all(axis=1)]
    if od.shape[0] < MIN_STAINED:
        return None
    _, vecs = np.linalg.eigh(np.cov(od.T))
    plane = vecs[:, 1:3]
    plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # eigenvector signs are arbitrary; OD is positive
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [ALPHA, 100 - ALPHA])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    he = np.stack([v1, v2], axis=1) if v1[0] > v2[0] else np.stack([v2, v1], axis=1)
    return he / np.linalg.norm(he, axis=0)


def concentrations(od: np.ndarray, he: np.ndarray) -> np.ndarray:
    """Least-squares stain concentrations (2, P) of (P, 3) optical densities."""
    return np.linalg.pinv(he) @ od.T


def fit_macenko(target: Iterable[np.ndarray]) -> dict[str, Any]:
    """Target stain vectors and 99th-percentile concentrations from (H, W, 3) uint8 RGB captures.

    Returns
    -------
    dict
        ``{"target": {"stains": (3, 2), "max_concentration": (2,), "background": (3,), "pixels": n}}``, for
        :func:`~cellbatch.normalise.profile.write_profile`.
    """
    chunks, lights = [], []
    for image in target:
        lights.append(background(image))
        chunks.append(optical_density(image, lights[-1]))
    if not chunks:
        raise ValueError("fit_macenko needs at least one target image")
    od = np.concatenate(chunks)
    if od.shape[0] > MAX_FIT_PIXELS:
        od = od[np.random.default_rng(0).choice(od.shape[0], MAX_FIT_PIXELS, replace=False)]
    he = stain_vectors(od)
    if he is None:
        raise ValueError("the target images hold too few stained pixels to estimate stain vectors")
    max_c = np.percentile(concentrations(od, he), 99, axis=1)
    light = np.median(np.stack(lights), axis=0)
    return {
        "target": {"stains": he, "max_concentration": max_c, "background": light, "pixels": int(od.shape[0])}
    }


def macenko(
    image: np.ndarray, *, stains: np.ndarray, max_concentration: np.ndarray, light: np.ndarray
) -> np.ndarray:
    """Remix one (H, W, 3) uint8 RGB image with the target's ``stains`` (3, 2), ``max_concentration``
    (2,) and background colour ``light`` (3,)."""
    od = optical_density(image, background(image))
    he = stain_vectors(od)
    if he is None:
        return image.copy()
    c = concentrations(od, he)
    src_max = np.percentile(c, 99, axis=1)
    c *= (max_concentration / np.maximum(src_max, 1e-6))[:, None]
    rgb = (light[:, None] + 1) * np.exp(-(stains @ c)) - 1
    return np.clip(rgb.T + 0.5, 0, 255).astype(np.uint8).reshape(image.shape)


def macenko_tensors(
    images: torch.Tensor, *, stains: np.ndarray, max_concentration: np.ndarray, light: np.ndarray
) -> torch.Tensor:
    """:func:`macenko` for a batch of (N, H, W, 3) uint8 tensors, stains estimated per crop.

    Works in float64 like the reference: stain vectors come from percentiles of angles, which float32
    would move enough to change a grey level here and there. A crop with too few stained pixels is
    returned unchanged, as by :func:`macenko`.
    """
    import torch

    from cellbatch.normalise.torch_ops import masked_quantile, planar

    n, h, w, _ = images.shape
    dev, f64 = images.device, torch.float64
    x = planar(images, f64)  # (N, 3, P)
    brightness = x.sum(dim=1)
    bright = brightness >= masked_quantile(brightness, None, 0.75).unsqueeze(1)
    src_light = masked_quantile(x, bright.unsqueeze(1), 0.5)  # (N, 3): np.median of the brightest quarter
    od = (-torch.log((x + 1) / (src_light.unsqueeze(2) + 1))).clamp(min=0)
    stained = (od > BETA).all(dim=1)  # (N, P)
    count = stained.sum(dim=1)
    enough = count >= MIN_STAINED
    weight = stained.to(f64).unsqueeze(1)
    mean = (od * weight).sum(dim=2, keepdim=True) / count.clamp(min=1).view(n, 1, 1)
    centred = (od - mean) * weight
    cov = centred @ centred.transpose(1, 2) / (count - 1).clamp(min=1).view(n, 1, 1)
    cov = torch.where(enough.view(n, 1, 1), cov, torch.eye(3, dtype=f64, device=dev))
    plane = torch.linalg.eigh(cov).eigenvectors[:, :, 1:3]  # (N, 3, 2)
    plane = plane * torch.where(plane.sum(dim=1, keepdim=True) < 0, -1.0, 1.0)
    proj = plane.transpose(1, 2) @ od  # (N, 2, P)
    phi = torch.atan2(proj[:, 1], proj[:, 0])
    lo = masked_quantile(phi, stained, ALPHA / 100)
    hi = masked_quantile(phi, stained, 1 - ALPHA / 100)
    v1 = plane @ torch.stack([torch.cos(lo), torch.sin(lo)], dim=1).unsqueeze(2)
    v2 = plane @ torch.stack([torch.cos(hi), torch.sin(hi)], dim=1).unsqueeze(2)
    first = v1[:, 0] > v2[:, 0]  # (N, 1)
    he = torch.cat([torch.where(first.unsqueeze(1), v1, v2), torch.where(first.unsqueeze(1), v2, v1)], dim=2)
    he = he / torch.linalg.vector_norm(he, dim=1, keepdim=True)
    c = torch.linalg.pinv(torch.where(enough.view(n, 1, 1), he, torch.eye(3, 2, dtype=f64, device=dev))) @ od
    src_max = masked_quantile(c, None, 0.99)  # (N, 2)
    target_max = torch.from_numpy(max_concentration).to(dev, f64)
    c = c * (target_max / src_max.clamp(min=1e-6)).unsqueeze(2)
    target_light = torch.from_numpy(light).to(dev, f64).view(1, 3, 1)
    rgb = (target_light + 1) * torch.exp(-(torch.from_numpy(stains).to(dev, f64) @ c)) - 1
    out = (rgb + 0.5).clamp(0, 255).to(torch.uint8).transpose(1, 2).reshape(n, h, w, 3)
    return torch.where(enough.view(n, 1, 1, 1), out, images)


class MacenkoNormaliser:
    """``--normalise macenko:PROFILE.json``, profile from ``cellbatch normalise fit --method macenko``."""

    name = "macenko"

    def __init__(self, arg: str | None = None) -> None:
        self.arg = arg
        self.profile = read_profile(arg, method="macenko")
        self.stains = self.profile.array("target", "stains", shape=(3, 2))
        self.max_concentration = self.profile.array("target", "max_concentration", shape=(2,))
        self.light = self.profile.array("target", "background", shape=(3,), bounds=(0, 255))

    def __call__(self, crops: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
        out = np.empty_like(crops)
        for i in range(crops.shape[0]):
            out[i] = macenko(
                crops[i], stains=self.stains, max_concentration=self.max_concentration, light=self.light
            )
        return out

    def apply_tensors(self, images: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        """The same on a batch of (N, H, W, 3) uint8 tensors on any device."""
        return macenko_tensors(images, stains=self.stains, max_concentration=self.max_concentration, light=self.light)

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "arg": self.arg, "profile": self.profile.provenance()}
