"""Gaussian colour statistics per class and the affine map between two Gaussians.

Fitting streams over images: :class:`ColourStats` keeps only sums (pixel count, sum, sum of outer
products per class, in float64), so fitting on thousands of captures needs no more memory than one.

The map between a source Gaussian N(m_s, S) and a target Gaussian N(m_t, T) is the Monge
(optimal-transport) map ``x -> A (x - m_s) + m_t`` with

    A = S^-1/2 (S^1/2 T S^1/2)^1/2 S^-1/2.

Any A with ``A S A^T = T`` matches the two Gaussians; they differ by a rotation of the whitened
colours. Whitening-colouring with Cholesky factors picks that rotation from the order of the RGB
channels, so it can turn hue (e.g. swap a red excess into a blue one) even when source and target
have the same shape. The Monge A is the unique symmetric positive-definite solution, the one that
moves every colour the least on average: it never rotates hue for nothing, it is identity when the
Gaussians agree, and it is exact whenever the true shift is a symmetric positive-definite matrix
(per-channel gains, or gains with mild symmetric crosstalk, which is what a change of lamp and
filters does to transmitted light).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Added to both covariances (in squared 8-bit levels) before matching: uint8 quantisation alone has
# variance 1/12, and a flat background can have a nearly singular covariance whose inverse root
# would amplify noise without bound.
RIDGE = 1.0

# (i, j) of the upper triangle of a 3x3 matrix, to accumulate outer products with 6 bincounts.
UPPER_TRIANGLE = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]


@dataclass(frozen=True)
class Gaussians:
    """K colour Gaussians in 8-bit RGB units: ``mean`` (K, 3), ``cov`` (K, 3, 3), ``pixels`` (K,)."""

    mean: np.ndarray
    cov: np.ndarray
    pixels: np.ndarray


class ColourStats:
    """Streaming per-class sums of RGB pixels, for K classes.

    Parameters
    ----------
    n_classes : int
        Number of classes; labels outside ``0..n_classes-1`` are ignored.
    """

    def __init__(self, n_classes: int) -> None:
        self.n_classes = n_classes
        self.count = np.zeros(n_classes, np.float64)
        self.sum = np.zeros((n_classes, 3), np.float64)
        self.outer = np.zeros((n_classes, 3, 3), np.float64)

    def add(self, image: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Add the pixels of one (H, W, 3) uint8 image; ``labels`` (H, W) picks each pixel's class.

        Without labels every pixel counts for class 0.
        """
        k = self.n_classes
        x = image.reshape(-1, 3).astype(np.float64)
        if labels is None:
            lab = np.zeros(x.shape[0], np.intp)
        else:
            if labels.shape != image.shape[:2]:
                raise ValueError(f"labels shape {labels.shape} does not match image shape {image.shape[:2]}")
            lab = labels.reshape(-1).astype(np.intp)
            keep = lab < k
            lab, x = lab[keep], x[keep]
        self.count += np.bincount(lab, minlength=k)[:k]
        for c in range(3):
            self.sum[:, c] += np.bincount(lab, weights=x[:, c], minlength=k)[:k]
        for i, j in UPPER_TRIANGLE:
            s = np.bincount(lab, weights=x[:, i] * x[:, j], minlength=k)[:k]
            self.outer[:, i, j] += s
            if i != j:
                self.outer[:, j, i] += s

    def gaussians(self) -> Gaussians:
        """Mean and covariance per class (NaN for classes that saw no pixel)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            n = self.count[:, None]
            mean = self.sum / n
            cov = self.outer / n[:, :, None] - mean[:, :, None] * mean[:, None, :]
        return Gaussians(mean=mean, cov=cov, pixels=self.count.astype(np.int64))


def spd_sqrt(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Square root and inverse square root of a symmetric positive-definite 3x3 matrix."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    w = np.clip(w, 1e-12, None)
    return (v * np.sqrt(w)) @ v.T, (v / np.sqrt(w)) @ v.T


def monge_map(
    mean_s: np.ndarray, cov_s: np.ndarray, mean_t: np.ndarray, cov_t: np.ndarray, *, ridge: float = RIDGE
) -> tuple[np.ndarray, np.ndarray]:
    """Affine map ``x -> A x + b`` that carries N(mean_s, cov_s) onto N(mean_t, cov_t).

    Parameters
    ----------
    mean_s, mean_t : np.ndarray
        (3,) means.
    cov_s, cov_t : np.ndarray
        (3, 3) covariances.
    ridge : float
        Added to both diagonals first (squared 8-bit levels).

    Returns
    -------
    A : np.ndarray
        (3, 3) symmetric positive-definite matrix.
    b : np.ndarray
        (3,) offset.

    Examples
    --------
    >>> s = np.diag([100.0, 50.0, 20.0])
    >>> a, b = monge_map(np.zeros(3), s, np.ones(3), 4 * s, ridge=0)
    >>> np.allclose(a, 2 * np.eye(3)), np.allclose(b, 1)
    (True, True)
    """
    eye = np.eye(3)
    s = np.asarray(cov_s, np.float64) + ridge * eye
    t = np.asarray(cov_t, np.float64) + ridge * eye
    s_half, s_inv_half = spd_sqrt(s)
    middle, _ = spd_sqrt(s_half @ t @ s_half)
    a = s_inv_half @ middle @ s_inv_half
    a = (a + a.T) / 2
    b = np.asarray(mean_t, np.float64) - a @ np.asarray(mean_s, np.float64)
    return a, b
