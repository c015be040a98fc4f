"""Hedlund-Morell (HM) normalisation: one colour transform per class, blended by soft class probabilities.

Thesis section 2.2: segment captures into background, red cells, cytoplasm and nucleus; fit a 3-D
Gaussian in RGB per class on source (DM1200) and on target (DM96) captures; map each class by the
affine transform between its two Gaussians (the Monge map, see :mod:`cellbatch.normalise.gaussian`
for why); give every pixel a probability of each class and blend the four results by them, so that
a pixel on a class border, or a pixel the segmentation got wrong, gets a smooth mix instead of a seam.

``--normalise hm:PROFILE.json`` with a profile from ``cellbatch normalise fit --method hm``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from cellbatch.normalise.base import planar, to_image
from cellbatch.normalise.gaussian import UPPER_TRIANGLE, ColourStats, Gaussians, monge_map
from cellbatch.normalise.profile import read_profile

if TYPE_CHECKING:
    import torch

# Indexed by label value (cellbatch.detect.base: BACKGROUND=0, RED_CELL=1, CYTOPLASM=2, NUCLEUS=3).
CLASSES = ("background", "red_cell", "cytoplasm", "nucleus")
N_CLASSES = len(CLASSES)

# A class with fewer fitted pixels than this (on either side) takes the whole-image transform: a
# covariance from a handful of pixels is noise.
MIN_CLASS_PIXELS = 500


@dataclass(frozen=True)
class SoftSettings:
    """How class probabilities are made from colours and a label mask.

    ``prior_sigma`` (px): Gaussian blur of the one-hot label mask, so a label edge becomes a ramp
    about 4 sigma wide. ``prior_floor``: weight every class keeps everywhere, so a pixel whose colour
    clearly belongs to another class than its label can still take that class (the segmentation
    is not perfect). ``colour_sigma`` (8-bit levels): added in quadrature to every class's standard
    deviation for the likelihood, so the probability changes gradually with colour instead of
    flipping with sensor noise. ``smooth_sigma`` (px): final blur of the probabilities, which
    removes pixel-to-pixel flicker where two classes are equally likely.
    """

    prior_sigma: float = 2.0
    prior_floor: float = 0.05
    colour_sigma: float = 4.0
    smooth_sigma: float = 1.0


# Colours are centred on mid-grey before any product: the quadratic forms below then cancel with a
# quarter of the float32 rounding they would have on raw 0-255 values.
CENTRE = 127.5
# Log-likelihoods are floored this far below each pixel's best class before exp(): smaller ratios
# change no output level, and the denormal floats below e^-87 make every later blur several times slower.
LOG_FLOOR = -60.0
# :func:`colour_features` rows: the products u_i u_j (i <= j), then u_0, u_1, u_2 and 1
N_PRODUCTS = len(UPPER_TRIANGLE)
N_FEATURES = N_PRODUCTS + 4


def colour_features(planes: np.ndarray) -> np.ndarray:
    """(3, P) float32 colours -> (10, P) float32 [u_i u_j for i <= j, u_0, u_1, u_2, 1], u = colour - CENTRE.

    Every per-class Gaussian log-likelihood and every affine colour map is then one small matrix
    times these rows: one BLAS call over long contiguous rows instead of a dozen numpy passes.
    """
    f = np.empty((N_FEATURES, planes.shape[1]), np.float32)
    u = f[N_PRODUCTS : N_PRODUCTS + 3]
    np.subtract(planes, np.float32(CENTRE), out=u)
    for row, (i, j) in enumerate(UPPER_TRIANGLE):
        np.multiply(u[i], u[j], out=f[row])
    f[-1] = 1.0
    return f


class ClassLikelihood:
    """Log-likelihoods of pixel colours under K Gaussians.

    log N(x | m, C) is a quadratic form in the centred colour u = x - CENTRE: with P = C^-1 and
    d = m - CENTRE it is -0.5 u'Pu + (Pd)'u - 0.5 d'Pd - 0.5 log|C| (+ a constant shared by the
    classes). ``coef`` holds those coefficients for :func:`colour_features`, so the K log-likelihoods
    of every pixel are one (K, 10) matrix product.
    """

    def __init__(self, mean: np.ndarray, cov: np.ndarray, *, colour_sigma: float) -> None:
        k = mean.shape[0]
        coef = np.zeros((k, N_FEATURES))
        for i in range(k):
            c = cov[i] + colour_sigma**2 * np.eye(3)
            precision = np.linalg.inv(c)
            d = np.asarray(mean[i], np.float64) - CENTRE
            for row, (a, b) in enumerate(UPPER_TRIANGLE):
                coef[i, row] = -0.5 * precision[a, a] if a == b else -precision[a, b]
            coef[i, N_PRODUCTS : N_PRODUCTS + 3] = precision @ d
            coef[i, -1] = -0.5 * d @ precision @ d - 0.5 * np.linalg.slogdet(c)[1]
        self.coef, self.k = coef.astype(np.float32), k

    def __call__(self, planes: np.ndarray) -> np.ndarray:
        """(3, P) float32 colours -> (K, P) float32 log-likelihoods (up to a shared constant)."""
        return self.coef @ colour_features(planes)


def class_probabilities(
    image: np.ndarray,
    labels: np.ndarray | None,
    *,
    likelihood: ClassLikelihood,
    settings: SoftSettings = SoftSettings(),
) -> np.ndarray:
    """Soft class probabilities of every pixel of one image.

    p_k(x) is proportional to prior_k(x) * N(colour(x) | class k) where prior_k is the one-hot
    label mask blurred by a Gaussian of ``prior_sigma`` px, floored at ``prior_floor`` (uniform
    without labels), and the class Gaussians are the fitted source Gaussians widened by
    ``colour_sigma``. The normalised probabilities are then blurred by ``smooth_sigma`` px; a blur
    of a partition of unity still sums to one.

    Parameters
    ----------
    image : np.ndarray
        (H, W, 3) uint8 RGB.
    labels : np.ndarray or None
        (H, W) uint8 class labels (0..K-1), or ``None``.
    likelihood : ClassLikelihood
        The class colour model.
    settings : SoftSettings
        Blur widths and floors.

    Returns
    -------
    np.ndarray
        (K, H, W) float32 planes, summing to 1 over K.
    """
    h, w = image.shape[:2]
    k = likelihood.k
    log_lik = likelihood(planar(image))
    # the shift by the best class keeps exp() in range; the prior is at least prior_floor / K, so
    # the product cannot underflow everywhere at once
    log_lik -= log_lik.max(axis=0)
    np.maximum(log_lik, LOG_FLOOR, out=log_lik)
    p = np.exp(log_lik, out=log_lik)
    if labels is not None:
        onehot = (labels[None] == np.arange(k, dtype=labels.dtype)[:, None, None]).astype(np.float32)
        prior = _blur_partition(onehot, settings.prior_sigma).reshape(k, -1)
        prior *= 1.0 - settings.prior_floor
        prior += settings.prior_floor / k
        p *= prior
    p /= p.sum(axis=0)
    return _blur_partition(p.reshape(k, h, w), settings.smooth_sigma)


def _blur_partition(planes: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of each (H, W) plane of a (K, H, W) float32 stack whose planes sum to one.

    A blur is linear and keeps constants, so the blurred planes sum to one as well: the last is one
    minus the others, three passes of arithmetic instead of a blur.
    """
    if sigma <= 0:
        return planes
    out = np.empty_like(planes)
    for plane, blurred in zip(planes[:-1], out[:-1], strict=True):
        cv2.GaussianBlur(plane, (0, 0), sigma, dst=blurred, borderType=cv2.BORDER_REFLECT)
    np.subtract(1.0, out[:-1].sum(axis=0), out=out[-1])
    return out


def blend_affine(image: np.ndarray, probabilities: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum_k p_k (A_k x + b_k) for every pixel x, rounded to uint8, for probabilities that sum to one.

    Computed as (A_K x + b_K) + sum_{k < K} p_k ((A_k - A_K) x + b_k - b_K): the same sum when the
    p_k sum to one, with one class term fewer.

    Parameters
    ----------
    image : np.ndarray
        (H, W, 3) uint8 RGB.
    probabilities : np.ndarray
        (K, H, W) float32 planes summing to one (the last is not read).
    a, b : np.ndarray
        (K, 3, 3) matrices and (K, 3) offsets.

    Returns
    -------
    np.ndarray
        (H, W, 3) uint8.
    """
    h, w = image.shape[:2]
    k = a.shape[0]
    x = np.empty((4, h * w), np.float32)  # colours with a row of ones, so b_k rides in the product
    x[:3] = image.reshape(-1, 3).T
    x[3] = 1.0
    ab = np.concatenate([a, b[:, :, None]], axis=2)  # (K, 3, 4)
    ab[:-1] -= ab[-1]
    ab = ab.astype(np.float32)
    p = probabilities.reshape(k, -1)
    out = ab[-1] @ x
    term = np.empty_like(out)
    for i in range(k - 1):  # class by class: a (3, P) term stays in cache where all (3K, P) would not
        np.matmul(ab[i], x, out=term)
        term *= p[i]
        out += term
    return to_image(out, image.shape)


def fit_hm(
    source: Iterable[tuple[np.ndarray, np.ndarray]], target: Iterable[tuple[np.ndarray, np.ndarray]]
) -> dict[str, Any]:
    """Fit HM profile fields from (image, labels) pairs of source and target captures.

    Source and target need not be paired. A class with fewer than ``MIN_CLASS_PIXELS`` pixels on
    either side takes the whole-image transform (``"fallback": true`` in the profile).

    Parameters
    ----------
    source, target : iterable of (np.ndarray, np.ndarray)
        (H, W, 3) uint8 RGB captures with (H, W) uint8 labels (0 background, 1 red cell,
        2 cytoplasm, 3 nucleus).

    Returns
    -------
    dict
        Fields for :func:`~cellbatch.normalise.profile.write_profile`.
    """
    fitted = {}
    for side, pairs in (("source", source), ("target", target)):
        per_class, whole = ColourStats(N_CLASSES), ColourStats(1)
        for image, labels in pairs:
            per_class.add(image, labels)
            whole.add(image)
        fitted[side] = (per_class.gaussians(), whole.gaussians())
    (src, src_all), (tgt, tgt_all) = fitted["source"], fitted["target"]
    if src_all.pixels[0] == 0 or tgt_all.pixels[0] == 0:
        raise ValueError("fit_hm needs at least one source and one target image")
    a_all, b_all = monge_map(src_all.mean[0], src_all.cov[0], tgt_all.mean[0], tgt_all.cov[0])
    a = np.empty((N_CLASSES, 3, 3))
    b = np.empty((N_CLASSES, 3))
    fallback = (src.pixels < MIN_CLASS_PIXELS) | (tgt.pixels < MIN_CLASS_PIXELS)
    src_mean, src_cov = src.mean.copy(), src.cov.copy()
    for k in range(N_CLASSES):
        if fallback[k]:
            a[k], b[k] = a_all, b_all
            if src.pixels[k] < MIN_CLASS_PIXELS:
                # the likelihood of an unseen class must still be finite; whole-image colours are
                # the least committal stand-in, and the prior from the labels does the rest
                src_mean[k], src_cov[k] = src_all.mean[0], src_all.cov[0]
        else:
            a[k], b[k] = monge_map(src.mean[k], src.cov[k], tgt.mean[k], tgt.cov[k])
    return {
        "classes": list(CLASSES),
        "source": _gaussian_fields(Gaussians(src_mean, src_cov, src.pixels)),
        "target": _gaussian_fields(tgt, fill=tgt_all),
        "transform": {"A": a, "b": b, "fallback": fallback.tolist()},
    }


def _gaussian_fields(g: Gaussians, fill: Gaussians | None = None) -> dict[str, Any]:
    mean, cov = g.mean.copy(), g.cov.copy()
    if fill is not None:
        empty = ~np.isfinite(mean).all(axis=1)
        mean[empty], cov[empty] = fill.mean[0], fill.cov[0]
    return {"mean": mean, "cov": cov, "pixels": g.pixels}


def hm_tensors(
    images: torch.Tensor,
    masks: torch.Tensor | None,
    *,
    likelihood: ClassLikelihood,
    a: np.ndarray,
    b: np.ndarray,
    settings: SoftSettings = SoftSettings(),
) -> torch.Tensor:
    """:func:`class_probabilities` then :func:`blend_affine` for a batch, as torch operations.

    Parameters
    ----------
    images : torch.Tensor
        (N, H, W, 3) uint8 RGB.
    masks : torch.Tensor or None
        (N, H, W) uint8 labels.

    Returns
    -------
    torch.Tensor
        (N, H, W, 3) uint8 on the device of ``images``.
    """
    import torch

    from cellbatch.normalise.torch_ops import gaussian_blur, planar, to_images

    n, h, w, _ = images.shape
    k = likelihood.k
    dev = images.device
    x = planar(images)  # (N, 3, P)
    u = x - CENTRE
    products = [u[:, i : i + 1] * u[:, j : j + 1] for i, j in UPPER_TRIANGLE]
    features = torch.cat([*products, u, torch.ones_like(u[:, :1])], 1)  # colour_features, batched
    log_lik = torch.from_numpy(likelihood.coef).to(dev) @ features
    p = torch.exp((log_lik - log_lik.amax(dim=1, keepdim=True)).clamp(min=LOG_FLOOR))
    if masks is not None:
        onehot = (masks.unsqueeze(1) == torch.arange(k, device=dev).view(1, k, 1, 1)).to(torch.float32)
        prior = gaussian_blur(onehot, settings.prior_sigma).reshape(n, k, -1)
        p = p * (prior * (1.0 - settings.prior_floor) + settings.prior_floor / k)
    p = gaussian_blur((p / p.sum(dim=1, keepdim=True)).reshape(n, k, h, w), settings.smooth_sigma)
    y = torch.from_numpy(a.reshape(3 * k, 3).astype(np.float32)).to(dev) @ x
    y = (y + torch.from_numpy(b.reshape(3 * k, 1).astype(np.float32)).to(dev)).reshape(n, k, 3, -1)
    out = (y * p.reshape(n, k, 1, -1)).sum(dim=1)
    return to_images(out + 0.5, h, w)


class HMNormaliser:
    """``--normalise hm:PROFILE.json``: per-class Monge maps blended by soft class probabilities.

    Parameters
    ----------
    arg : str
        Path of a profile from ``cellbatch normalise fit --method hm``.

    Examples
    --------
    >>> norm = HMNormaliser("profile.json")  # doctest: +SKIP
    >>> out = norm(crops, masks)  # doctest: +SKIP
    """

    name = "hm"

    def __init__(self, arg: str | None = None, *, settings: SoftSettings = SoftSettings()) -> None:
        self.arg = arg
        self.profile = read_profile(arg, method="hm")
        k = N_CLASSES
        if self.profile.data.get("classes") != list(CLASSES):
            self.profile.fail(f"has classes {self.profile.data.get('classes')!r}, expected {list(CLASSES)}")
        self.a = self.profile.array("transform", "A", shape=(k, 3, 3))
        self.b = self.profile.array("transform", "b", shape=(k, 3))
        mean = self.profile.array("source", "mean", shape=(k, 3), bounds=(0, 255))
        cov = self.profile.array("source", "cov", shape=(k, 3, 3))
        if (np.linalg.eigvalsh(cov) < -1e-6).any():
            self.profile.fail("has a source covariance that is not positive semi-definite")
        self.settings = settings
        self.likelihood = ClassLikelihood(mean, cov, colour_sigma=settings.colour_sigma)

    def __call__(self, crops: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
        out = np.empty_like(crops)
        for i in range(crops.shape[0]):
            p = class_probabilities(
                crops[i],
                None if masks is None else masks[i],
                likelihood=self.likelihood,
                settings=self.settings,
            )
            out[i] = blend_affine(crops[i], p, self.a, self.b)
        return out

    def apply_tensors(self, images: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        """The same on a batch of (N, H, W, 3) uint8 tensors on any device (torch reference: ``__call__``)."""
        return hm_tensors(images, masks, likelihood=self.likelihood, a=self.a, b=self.b, settings=self.settings)

    def provenance(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "arg": self.arg,
            "profile": self.profile.provenance(),
            "settings": asdict(self.settings),
        }
