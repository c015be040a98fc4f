"""Synthetic DM-scale captures with ground truth, seen through two optics.

A capture is a 640x480 RGB field at 0.1 µm/px: background, many red cells with central pallor (some
overlapping), platelets, and usually one white cell near the centre (sometimes none, sometimes two).
The scene is rendered once in the DM96 look (the "truth"), by Beer-Lambert absorbance of stain
densities, and :func:`apply_optics` turns it into the DM1200 look with a stain-dependent colour shift:
one affine RGB map per class (background, red cell, cytoplasm, nucleus, eosin-rich granules), blended
softly across class borders, plus a little sharpening and sensor noise. A single global colour map
cannot undo it, which is the point: it mimics the halogen (DM96) versus LED (DM1200) difference that
made HM normalisation segment the image (thesis, sections 1.1 and 2.2).

Everything random comes from the ``numpy.random.Generator`` passed in, so a seed fixes the bytes.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from cellbatch.detect.base import BACKGROUND, CYTOPLASM, NUCLEUS, RED_CELL
from cellbatch.errors import ConfigError, InputFormatError, OutputError

WBC_TYPES = ("neutrophil", "eosinophil", "basophil", "lymphocyte", "monocyte")
LOOKS = ("dm1200", "dm96")
CSV_COLUMNS = ("filename", "cx", "cy", "cell_type", "diameter")
MARKER = "synth.json"

# Red cells are about 7.5 µm across, white cells about 11 µm: the red-cell size follows --cell-diameter.
RBC_PER_WBC = 75.0 / 110.0
PLATELET_PER_WBC = (20.0 / 110.0, 30.0 / 110.0)

# DM96 look (May-Grünwald-Giemsa under halogen light), RGB at full stain density; measured by eye and
# by percentile means on the PBC DM96 images (the PBC data set, Acevedo et al. 2020; docs/synth.md).
BACKGROUND_RGB = np.array([252.0, 231.0, 204.0], dtype=np.float32)
RBC_RGB = (202.0, 158.0, 162.0)
PLATELET_RGB = (150.0, 95.0, 160.0)
PLATELET_HALO_RGB = (222.0, 196.0, 214.0)


@dataclass(frozen=True)
class _WbcLook:
    size: float  # diameter relative to --cell-diameter
    cytoplasm: tuple[float, float, float]
    nucleus: tuple[float, float, float]
    chromatin: float  # contrast of the chromatin texture
    granule: tuple[float, float, float] | None = None


_WBC_LOOKS = {
    "neutrophil": _WbcLook(1.0, (226.0, 200.0, 206.0), (98.0, 44.0, 135.0), 0.30, (196.0, 150.0, 190.0)),
    "eosinophil": _WbcLook(1.05, (228.0, 198.0, 192.0), (92.0, 40.0, 130.0), 0.30, (206.0, 104.0, 98.0)),
    "basophil": _WbcLook(0.95, (214.0, 184.0, 202.0), (100.0, 50.0, 140.0), 0.25, (62.0, 22.0, 112.0)),
    "lymphocyte": _WbcLook(0.72, (182.0, 172.0, 204.0), (82.0, 34.0, 124.0), 0.22),
    "monocyte": _WbcLook(1.2, (198.0, 186.0, 204.0), (120.0, 70.0, 152.0), 0.35),
}


def _od(rgb: Sequence[float]) -> np.ndarray:
    """Optical density (per channel, >= 0) of a stain that shows ``rgb`` on the DM96 background."""
    ratio = np.asarray(rgb, dtype=np.float32) / BACKGROUND_RGB
    return np.maximum(-np.log(np.clip(ratio, 1e-3, None)), 0.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------- optics
@dataclass(frozen=True)
class _ClassMap:
    """``y = dst + gain @ (x - src)``: an affine RGB map anchored at the class's typical colour."""

    src: tuple[float, float, float]
    dst: tuple[float, float, float]
    gain: tuple[tuple[float, float, float], ...]

    def matrix(self) -> np.ndarray:
        """The map as a (3, 4) float32 ``[A | b]`` for :func:`cv2.transform`."""
        a = np.asarray(self.gain, dtype=np.float64)
        b = np.asarray(self.dst, dtype=np.float64) - a @ np.asarray(self.src, dtype=np.float64)
        return np.concatenate([a, b[:, None]], axis=1).astype(np.float32)


# DM96 -> DM1200 per class. The LED look: background whiter and bluer, red cells pinker-violet,
# cytoplasm bluer, nucleus blue-violet instead of purple-magenta, eosin granules from orange-red to pink.
# Shifts are 10-60 levels: the size of the differences between real DM96 and DM1200 raw images.
_DM1200_MAPS = {
    "background": _ClassMap((252, 231, 204), (238, 239, 246), ((0.95, 0, 0), (0, 1.0, 0), (0, 0, 1.04))),
    "red_cell": _ClassMap((198, 158, 163), (204, 168, 184), ((1.02, 0, 0), (0, 1.06, 0), (0, 0.02, 1.03))),
    "cytoplasm": _ClassMap((214, 190, 200), (207, 196, 218), ((0.96, 0, 0), (0, 1.04, 0), (0.02, 0, 1.0))),
    "nucleus": _ClassMap((100, 46, 136), (78, 58, 151), ((0.86, 0, 0.04), (0.02, 1.08, 0), (0, 0, 1.06))),
    "eosin": _ClassMap((206, 108, 100), (216, 112, 156), ((1.0, 0, 0), (0, 1.02, 0), (0.12, 0, 0.92))),
}
EOSIN = 4  # class of eosin-rich granules, for the optics only (labels stop at NUCLEUS)
# Width (px) of the soft transition between class maps at class borders; granules are 5-8 px across,
# so theirs is narrower or no granule pixel would get its full shift.
BLEND_SIGMA = 1.5
GRANULE_BLEND_SIGMA = 0.7
SHARPEN = 0.3  # unsharp-mask amount: the LED optics render edges a little crisper
NOISE_SIGMA = 1.2  # sensor noise, grey levels


@lru_cache(maxsize=1)
def _dm1200_matrices() -> np.ndarray:
    """(5, 3, 4) maps indexed by class: BACKGROUND, RED_CELL, CYTOPLASM, NUCLEUS, EOSIN."""
    order = ("background", "red_cell", "cytoplasm", "nucleus", "eosin")
    return np.stack([_DM1200_MAPS[k].matrix() for k in order])


def apply_optics(
    image: np.ndarray,
    labels: np.ndarray,
    *,
    optics: str = "dm1200",
    granules: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Show a DM96-look image through another optics, shifting each stained class its own way.

    Parameters
    ----------
    image : (H, W, 3) uint8
        RGB in the DM96 look (a synthetic capture or a real PBC image).
    labels : (H, W) uint8
        Class of each pixel (``BACKGROUND``, ``RED_CELL``, ``CYTOPLASM``, ``NUCLEUS`` from
        :mod:`cellbatch.detect.base`); it picks the colour map. Pixels stained like a nucleus but
        outside one (platelets, basophil granules) shift best when labelled ``NUCLEUS``.
    optics : {"dm1200", "dm96"}
        Target look. ``"dm96"`` returns a copy of ``image`` (it is already that look).
    granules : (H, W) float or bool, optional
        Density (0..1) of eosin-rich granules; these pixels get their own colour map.
    rng : numpy.random.Generator, optional
        Source of sensor noise; without it the result has no added noise.

    Returns
    -------
    (H, W, 3) uint8
        The image in the requested look.

    Examples
    --------
    >>> img = np.full((8, 8, 3), (252, 231, 204), np.uint8)
    >>> apply_optics(img, np.zeros((8, 8), np.uint8))[0, 0].tolist()
    [238, 239, 246]
    """
    if optics not in LOOKS:
        raise ConfigError(f"unknown optics {optics!r}; choose one of {', '.join(LOOKS)}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputFormatError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    if labels.shape != image.shape[:2]:
        raise InputFormatError(f"labels shape {labels.shape} does not match image {image.shape[:2]}")
    if granules is not None and granules.shape != image.shape[:2]:
        raise InputFormatError(f"granules shape {granules.shape} does not match image {image.shape[:2]}")
    if optics == "dm96":
        return image.copy()

    mats = _dm1200_matrices()
    x = image.astype(np.float32)
    # T = sum_k w_k T_k, with soft weights w_k from blurred class masks (a partition of unity) and the
    # granules' soft weight g taking its share: (1 - g) w_k. Written as T_bg + sum_k w_k (T_k - T_bg), so
    # that each class costs work only around its own pixels.
    out = cv2.transform(x, mats[BACKGROUND])
    classes = labels.astype(np.uint8, copy=False)
    for k in (RED_CELL, CYTOPLASM, NUCLEUS):
        for win, weight in _soft_weights(cv2.compare(classes, k, cv2.CMP_EQ), BLEND_SIGMA):
            delta = cv2.transform(x[win], mats[k] - mats[BACKGROUND])
            out[win] += cv2.multiply(delta, weight, scale=1.0 / 255.0, dtype=cv2.CV_32F)
    if granules is not None:
        for win, weight in _soft_weights((granules > 0.5).astype(np.uint8) * 255, GRANULE_BLEND_SIGMA):
            # out (1 - g) + T_eos g, as out + g (T_eos - out)
            delta = cv2.transform(x[win], mats[EOSIN]) - out[win]
            out[win] += cv2.multiply(delta, weight, scale=1.0 / 255.0, dtype=cv2.CV_32F)

    if SHARPEN:
        out = cv2.filter2D(out, -1, _SHARPEN_KERNEL)
    if rng is not None:
        out += _noise(rng, image.shape)
    return _to_uint8(out)


def _soft_weights(mask: np.ndarray, sigma: float) -> list[tuple[tuple[slice, slice], np.ndarray]]:
    """The blurred 0/255 ``mask`` as (h, w, 3) uint8 weights (255 is 1), on windows that cover its support.

    Separate blobs (a white cell, platelets) get separate windows, found by cutting the mask along empty
    rows, then empty columns: a full-capture window per class would cost several ms. The windows do not
    overlap and reach past every mask pixel by more than the blur's radius, so the result is exact.
    """
    pad = int(4 * sigma) + 2
    h, w = mask.shape
    windows = []
    for r0, r1 in _runs(cv2.reduce(mask, 1, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel(), 2 * pad):
        band = mask[r0:r1]
        for c0, c1 in _runs(cv2.reduce(band, 0, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel(), 2 * pad):
            _, y, _, bh = cv2.boundingRect(band[:, c0:c1])
            windows.append(
                (slice(max(r0 + y - pad, 0), min(r0 + y + bh + pad, h)), slice(max(c0 - pad, 0), min(c1 + pad, w)))
            )
    return [(win, cv2.merge([cv2.GaussianBlur(mask[win], (0, 0), sigma)] * 3)) for win in windows]


def _runs(active: np.ndarray, gap: int) -> list[tuple[int, int]]:
    """[start, stop) of the runs of nonzero entries, runs less than ``gap`` apart merged."""
    idx = np.flatnonzero(active)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) > gap)
    starts = [int(idx[0]), *(idx[breaks + 1].tolist())]
    stops = [*(idx[breaks] + 1).tolist(), int(idx[-1]) + 1]
    return list(zip(starts, stops, strict=True))


# Unsharp mask in one 3x3 pass: (1 + a) * identity - a * (3x3 binomial blur).
_SHARPEN_KERNEL = (
    (1.0 + SHARPEN) * np.pad(np.ones((1, 1)), 1) - SHARPEN * np.outer([1, 2, 1], [1, 2, 1]) / 16.0
).astype(np.float32)


def _noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Sensor noise with standard deviation ``NOISE_SIGMA``: a float32 view of ``shape``.

    Drawing a fresh Gaussian field costs several ms per capture, a large part of the 20 ms budget for a
    pair; a random window of a fixed, larger field (flipped upside down or not: column flips would make
    the add several times slower) is as good for training and nearly free.
    """
    bank = _noise_bank(shape)
    oy = int(rng.integers(bank.shape[0] - shape[0] + 1))
    ox = int(rng.integers(bank.shape[1] - shape[1] + 1))
    view = bank[oy : oy + shape[0], ox : ox + shape[1]]
    return view[::-1] if rng.random() < 0.5 else view


@lru_cache(maxsize=4)
def _noise_bank(shape: tuple[int, ...]) -> np.ndarray:
    margin = 256
    rng = np.random.default_rng(97)
    size = (shape[0] + margin, shape[1] + margin, *shape[2:])
    return NOISE_SIGMA * rng.standard_normal(size, dtype=np.float32)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Round and saturate float RGB to uint8 (values are clipped first, so the absolute value is a no-op)."""
    np.clip(image, 0.0, 255.0, out=image)
    return cv2.convertScaleAbs(image)


# ---------------------------------------------------------------------------------------------- scene
@dataclass(frozen=True)
class SynthCell:
    """One white cell of a synthetic capture: centre (px), type (one of :data:`WBC_TYPES`), diameter (px)."""

    cx: float
    cy: float
    cell_type: str
    diameter: float


@dataclass(frozen=True)
class SynthCapture:
    """One synthetic scene in both looks, with its ground truth.

    ``dm96`` and ``dm1200`` are (H, W, 3) uint8 RGB of the same scene, pixel-aligned; ``labels`` is the
    (H, W) uint8 class image (``BACKGROUND``, ``RED_CELL``, ``CYTOPLASM``, ``NUCLEUS``); ``granules`` is
    the (H, W) float32 density (0..1) of eosin-rich granules, the fifth class of the optics shift.
    """

    dm96: np.ndarray
    dm1200: np.ndarray
    labels: np.ndarray
    cells: tuple[SynthCell, ...]
    granules: np.ndarray


class _Patch:
    """Integer window of the capture around a centre, with float offsets to that centre."""

    def __init__(self, cx: float, cy: float, half: float, shape: tuple[int, int]) -> None:
        h, w = shape
        self.y0, self.y1 = max(int(cy - half), 0), min(int(cy + half) + 2, h)
        self.x0, self.x1 = max(int(cx - half), 0), min(int(cx + half) + 2, w)
        self.dy = (np.arange(self.y0, self.y1, dtype=np.float32) - np.float32(cy))[:, None]
        self.dx = (np.arange(self.x0, self.x1, dtype=np.float32) - np.float32(cx))[None, :]

    @property
    def empty(self) -> bool:
        return self.y1 <= self.y0 or self.x1 <= self.x0

    @property
    def window(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


def _soft(signed_distance: np.ndarray) -> np.ndarray:
    """Anti-aliased inside mask (1 inside, 0 outside, a 1 px ramp) from ``radius - distance``."""
    return np.clip(signed_distance + 0.5, 0.0, 1.0)


def _wobbly_radius(theta: np.ndarray, radius: float, rng: np.random.Generator, amount: float) -> np.ndarray:
    """Radius of a slightly irregular outline at angles ``theta``: low Fourier harmonics of a circle."""
    r = np.ones_like(theta)
    for k in (2, 3, 4, 5):
        a = amount * rng.uniform(0.3, 1.0) / (k - 1) ** 0.5
        r += a * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return radius * r


def _blob(dx: np.ndarray, dy: np.ndarray, radius: float, rng: np.random.Generator, amount: float) -> np.ndarray:
    theta = np.arctan2(dy, dx)
    rho = np.sqrt(dx * dx + dy * dy)
    return _soft(_wobbly_radius(theta, radius, rng, amount) - rho)


def _disc(dx: np.ndarray, dy: np.ndarray, x: float, y: float, r: float) -> np.ndarray:
    return _soft(r - np.sqrt((dx - x) ** 2 + (dy - y) ** 2))


def _capsule(dx: np.ndarray, dy: np.ndarray, p: tuple[float, float], q: tuple[float, float], r: float) -> np.ndarray:
    """Soft mask of a segment p-q thickened to radius ``r`` (the chromatin strand between lobes)."""
    ex, ey = q[0] - p[0], q[1] - p[1]
    t = np.clip(((dx - p[0]) * ex + (dy - p[1]) * ey) / max(ex * ex + ey * ey, 1e-6), 0.0, 1.0)
    return _soft(r - np.sqrt((dx - p[0] - t * ex) ** 2 + (dy - p[1] - t * ey) ** 2))


def _lobes(dx: np.ndarray, dy: np.ndarray, n: int, lobe_r: float, arc_r: float, rng: np.random.Generator) -> np.ndarray:
    """Oval lobes along an arc around the cell centre, joined by strands (segmented nuclei)."""
    long_r, short_r = 1.2 * lobe_r, 0.85 * lobe_r
    step = 2.0 * math.asin(min(0.95, long_r * rng.uniform(0.8, 1.0) / arc_r))
    a = rng.uniform(0, 2 * np.pi)
    mask = np.zeros(np.broadcast_shapes(dx.shape, dy.shape), dtype=np.float32)
    centres = []
    for _ in range(n):
        rr = arc_r * rng.uniform(0.85, 1.1)
        cx, cy = rr * math.cos(a), rr * math.sin(a)
        centres.append((cx, cy))
        # Long axis along the arc's tangent, so the lobes read as one bent, pinched band.
        tx, ty = -math.sin(a), math.cos(a)
        u = (dx - cx) * tx + (dy - cy) * ty
        v = (dx - cx) * ty - (dy - cy) * tx
        s = rng.uniform(0.85, 1.1)
        ell = np.sqrt((u / (long_r * s)) ** 2 + (v / (short_r * s)) ** 2)
        np.maximum(mask, _soft((1.0 - ell) * short_r * s), out=mask)
        a += step * rng.uniform(0.9, 1.15)
    for p, q in zip(centres[:-1], centres[1:], strict=True):
        np.maximum(mask, _capsule(dx, dy, p, q, max(0.6, lobe_r * rng.uniform(0.08, 0.4))), out=mask)
    return mask


def _nucleus(cell_type: str, dx: np.ndarray, dy: np.ndarray, d: float, rng: np.random.Generator) -> np.ndarray:
    """Soft nucleus mask for a white cell of diameter ``d`` centred at the patch origin."""
    if cell_type == "neutrophil":
        n = int(rng.choice([3, 4, 5], p=[0.45, 0.4, 0.15]))
        return _lobes(dx, dy, n, d * rng.uniform(0.12, 0.14) * (1.0 if n < 5 else 0.9), d * 0.24, rng)
    if cell_type == "eosinophil":
        return _lobes(dx, dy, 2, d * rng.uniform(0.16, 0.18), d * rng.uniform(0.18, 0.21), rng)
    if cell_type == "basophil":
        return _lobes(dx, dy, 2, d * rng.uniform(0.2, 0.23), d * 0.14, rng)
    if cell_type == "lymphocyte":
        r = d / 2 * rng.uniform(0.78, 0.88)
        off = (d / 2 - r) * rng.uniform(0.2, 0.7)
        a = rng.uniform(0, 2 * np.pi)
        return _blob(dx - off * math.cos(a), dy - off * math.sin(a), r, rng, 0.03)
    # Monocyte: an ellipse with a bite taken out of one long side, the kidney shape.
    a = rng.uniform(0, 2 * np.pi)
    u = dx * math.cos(a) + dy * math.sin(a)
    v = -dx * math.sin(a) + dy * math.cos(a)
    semi_u, semi_v = d * rng.uniform(0.3, 0.35), d * rng.uniform(0.22, 0.26)
    ell = _soft((1.0 - np.sqrt((u / semi_u) ** 2 + ((v + 0.05 * d) / semi_v) ** 2)) * semi_v)
    bite = _disc(u, v, 0.0, 0.05 * d + semi_v * 0.95, d * rng.uniform(0.15, 0.19))
    return ell * (1.0 - bite)


def _granules(
    patch: _Patch, mask: np.ndarray, d: float, radius: tuple[float, float], fill: float, rng: np.random.Generator
) -> np.ndarray:
    """Round granules scattered over a cell; returns their density (0..1) on the patch."""
    canvas = np.zeros(mask.shape, dtype=np.uint8)
    r_mean = sum(radius) / 2
    count = int(fill * math.pi * (d / 2) ** 2 / (math.pi * r_mean**2))
    rho = d / 2 * 0.96 * np.sqrt(rng.random(count))
    phi = rng.uniform(0, 2 * np.pi, count)
    rs = rng.uniform(*radius, count)
    shade = rng.integers(170, 256, count)
    # Sub-pixel centres through cv2's fixed-point ``shift`` (4 fractional bits).
    xs = np.round((rho * np.cos(phi) - patch.dx[0, 0]) * 16).astype(int)
    ys = np.round((rho * np.sin(phi) - patch.dy[0, 0]) * 16).astype(int)
    radii = np.round(rs * 16).astype(int)
    for x, y, r, s in zip(xs.tolist(), ys.tolist(), radii.tolist(), shade.tolist(), strict=True):
        cv2.circle(canvas, (x, y), r, s, -1, cv2.LINE_AA, 4)
    return canvas.astype(np.float32) * (1.0 / 255.0) * mask


def _rbc_template(rng: np.random.Generator, radius: float) -> np.ndarray:
    """Density of one red cell: a biconcave disc, thick rim and pale centre, slightly oval."""
    r = radius * rng.uniform(0.93, 1.07)
    half = int(math.ceil(r * 1.12)) + 1
    d = np.arange(-half, half + 1, dtype=np.float32)
    dy, dx = d[:, None], d[None, :]
    a = rng.uniform(0, np.pi)
    squash = rng.uniform(0.88, 1.0)
    u = dx * math.cos(a) + dy * math.sin(a)
    v = (-dx * math.sin(a) + dy * math.cos(a)) / squash
    theta = np.arctan2(v, u)
    rho = np.sqrt(u * u + v * v)
    edge = _soft(_wobbly_radius(theta, r, rng, 0.015) - rho)
    pallor = rng.uniform(0.3, 0.6) if rng.random() < 0.85 else rng.uniform(0.05, 0.2)
    pr = rng.uniform(0.38, 0.5) * r
    body = (1.0 - pallor * np.exp(-((rho / pr) ** 4))) * (0.9 + 0.1 * np.minimum(rho / r, 1.0) ** 2)
    return (edge * body).astype(np.float32)


@lru_cache(maxsize=4)
def _rbc_bank(radius: float) -> tuple[np.ndarray, ...]:
    """Red-cell templates for one size, drawn once: stamping them is far faster than drawing each cell.

    A fixed seed keeps the bank (and so every capture) reproducible; flips and transposes at stamping
    time give eight orientations of each template.
    """
    rng = np.random.default_rng(20240611)
    return tuple(_rbc_template(rng, radius) for _ in range(48))


def _place_white_cells(
    rng: np.random.Generator, shape: tuple[int, int], types: list[str], cell_diameter: float
) -> list[SynthCell]:
    h, w = shape
    cells: list[SynthCell] = []
    for i, t in enumerate(types):
        d = cell_diameter * _WBC_LOOKS[t].size * rng.uniform(0.92, 1.08)
        for _ in range(200):
            if i == 0:  # the one the analyser centred on
                cx = w / 2 + rng.normal(0, 0.05 * cell_diameter)
                cy = h / 2 + rng.normal(0, 0.05 * cell_diameter)
            else:  # anywhere, at most a little past the border
                cx = rng.uniform(min(0.35 * d, w / 2), max(w - 0.35 * d, w / 2))
                cy = rng.uniform(min(0.35 * d, h / 2), max(h - 0.35 * d, h / 2))
            if all(math.hypot(cx - c.cx, cy - c.cy) > 0.55 * (d + c.diameter) + 4 for c in cells):
                cells.append(SynthCell(float(cx), float(cy), t, float(d)))
                break
        else:
            raise ConfigError(
                f"{len(types)} white cells of about {cell_diameter:g} px do not fit a {w}x{h} capture; "
                "ask for fewer (n_white) or smaller cells (cell_diameter)"
            )
    return cells


def _place_red_cells(
    rng: np.random.Generator, shape: tuple[int, int], radius: float, cells: list[SynthCell]
) -> np.ndarray:
    """Centres (N, 2) of red cells: a monolayer with some overlaps, kept off the white cells."""
    h, w = shape
    target = int(rng.uniform(0.32, 0.55) * h * w / (math.pi * radius**2))
    n_cand = 6 * target + 20
    cand = np.stack(
        [rng.uniform(-0.4 * radius, w + 0.4 * radius, n_cand), rng.uniform(-0.4 * radius, h + 0.4 * radius, n_cand)],
        axis=1,
    )
    # Most neighbours just touch; about one in eight may overlap deeply, as in a real smear.
    min_gap = np.where(rng.random(n_cand) < 0.12, 1.0, 1.75) * radius
    if cells:
        wbc = np.array([[c.cx, c.cy, c.diameter / 2] for c in cells])
        dist = np.hypot(cand[:, None, 0] - wbc[None, :, 0], cand[:, None, 1] - wbc[None, :, 1])
        keep = np.all(dist > wbc[None, :, 2] + 0.6 * radius, axis=1)
        cand, min_gap = cand[keep], min_gap[keep]
    pair = np.hypot(cand[:, None, 0] - cand[None, :, 0], cand[:, None, 1] - cand[None, :, 1])
    accepted: list[int] = []
    for i in range(len(cand)):
        if not accepted or pair[i, accepted].min() > min_gap[i]:
            accepted.append(i)
            if len(accepted) == target:
                break
    return cand[accepted]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Zero-mean, unit-ish random field with features about ``cell`` px across."""
    h, w = shape
    coarse = rng.standard_normal((h // cell + 2, w // cell + 2), dtype=np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def synth_capture(
    rng: np.random.Generator,
    *,
    shape: tuple[int, int] = (480, 640),
    cell_diameter: float = 110.0,
    n_white: int | None = None,
    cell_types: Sequence[str] | None = None,
    platelets: bool = True,
) -> SynthCapture:
    """Render one synthetic capture in the DM96 and DM1200 looks, with its labels and white cells.

    Parameters
    ----------
    rng : numpy.random.Generator
        The only source of randomness: the same generator state gives the same capture.
    shape : (int, int)
        Capture height and width in pixels.
    cell_diameter : float
        Typical white-cell diameter in pixels (110 at 0.1 µm/px); every size scales with it
        (lymphocytes about 0.72x, monocytes about 1.2x, red cells about 75/110x).
    n_white : int, optional
        Number of white cells. By default one near the centre (82 %), none (6 %) or two (12 %, the second
        elsewhere). The first is always placed near the centre.
    cell_types : sequence of str, optional
        Types to draw each white cell's type from, uniformly (default: all of :data:`WBC_TYPES`).
        ``("eosinophil",)`` makes every white cell an eosinophil.
    platelets : bool
        Scatter a few platelets.

    Returns
    -------
    SynthCapture

    Examples
    --------
    >>> cap = synth_capture(np.random.default_rng(0), n_white=1, cell_types=("monocyte",))
    >>> cap.dm96.shape, cap.dm1200.dtype, cap.cells[0].cell_type
    ((480, 640, 3), dtype('uint8'), 'monocyte')
    """
    types_pool = tuple(WBC_TYPES if cell_types is None else cell_types)
    unknown = sorted(set(types_pool) - set(WBC_TYPES))
    if unknown or not types_pool:
        raise ConfigError(f"unknown white-cell types {unknown}; choose from {', '.join(WBC_TYPES)}")
    if n_white is not None and n_white < 0:
        raise ConfigError(f"n_white must be >= 0, got {n_white}")
    if not cell_diameter >= 8:
        raise ConfigError(f"cell_diameter must be at least 8 px, got {cell_diameter}")
    h, w = shape
    if h < 16 or w < 16:
        raise ConfigError(f"shape must be at least 16x16 px, got {shape}")
    if n_white is None:
        n_white = int(rng.choice([0, 1, 2], p=[0.06, 0.82, 0.12]))
    types = [types_pool[i] for i in rng.integers(0, len(types_pool), n_white)]
    cells = _place_white_cells(rng, (h, w), types, cell_diameter)

    stain = np.float32(rng.uniform(0.88, 1.12))  # slide-to-slide staining strength
    stained: list[tuple[tuple[slice, slice], np.ndarray]] = []  # optical density of white cells, platelets
    labels = np.zeros((h, w), dtype=np.uint8)
    optic_extra: list[tuple[tuple[slice, slice], np.ndarray, int]] = []
    granules = np.zeros((h, w), dtype=np.float32)

    # Red cells: stamp density templates, then white cells lie on top of them.
    rbc_radius = cell_diameter * RBC_PER_WBC / 2
    bank = _rbc_bank(round(float(rbc_radius), 1))
    rbc = np.zeros((h, w), dtype=np.float32)
    for cx, cy in _place_red_cells(rng, (h, w), rbc_radius, cells):
        t = bank[int(rng.integers(len(bank)))]
        flip = int(rng.integers(8))
        t = t[::-1] if flip & 1 else t
        t = t[:, ::-1] if flip & 2 else t
        t = t.T if flip & 4 else t
        half = t.shape[0] // 2
        y0, x0 = int(round(cy)) - half, int(round(cx)) - half
        ty0, tx0 = max(-y0, 0), max(-x0, 0)
        ty1, tx1 = min(t.shape[0], h - y0), min(t.shape[1], w - x0)
        if ty1 > ty0 and tx1 > tx0:
            rbc[y0 + ty0 : y0 + ty1, x0 + tx0 : x0 + tx1] += t[ty0:ty1, tx0:tx1]

    for cell in cells:
        look = _WBC_LOOKS[cell.cell_type]
        d = cell.diameter
        p = _Patch(cell.cx, cell.cy, 0.62 * d, (h, w))
        if p.empty:
            continue
        win = p.window
        body = _blob(p.dx, p.dy, d / 2, rng, 0.045 if cell.cell_type == "monocyte" else 0.025)
        nuc = _nucleus(cell.cell_type, p.dx, p.dy, d, rng) * body
        cyto = body * (1.0 - nuc)
        mottle = _smooth_noise(rng, body.shape, 4)
        texture = 1.0 + look.chromatin * np.clip(mottle, -2.0, 2.0)
        dens_nuc = nuc * texture
        dens_cyto = cyto * (0.92 + 0.08 * mottle)
        cell_od = dens_cyto[..., None] * _od(look.cytoplasm) + dens_nuc[..., None] * _od(look.nucleus)
        if cell.cell_type == "eosinophil":
            g = _granules(p, body, d, (0.022 * d, 0.03 * d), 1.3, rng) * (1.0 - 0.7 * nuc)
            cell_od = cell_od * (1.0 - g)[..., None] + g[..., None] * _od(look.granule)
            np.maximum(granules[win], g, out=granules[win])
        elif cell.cell_type == "basophil":
            g = _granules(p, body, d, (0.022 * d, 0.036 * d), 0.75, rng)
            cell_od = cell_od * (1.0 - g)[..., None] + g[..., None] * _od(look.granule)
            optic_extra.append((win, g > 0.5, NUCLEUS))
        elif cell.cell_type == "neutrophil":
            fine = cv2.GaussianBlur((rng.random(body.shape) < 0.07).astype(np.float32), (3, 3), 0.7)
            fine *= cyto * 0.8
            cell_od += fine[..., None] * (_od(look.granule) - _od(look.cytoplasm))
        elif cell.cell_type == "monocyte":
            vac = np.zeros(body.shape, dtype=np.float32)
            for _ in range(int(rng.integers(0, 6))):
                a, rr = rng.uniform(0, 2 * np.pi), rng.uniform(0.25, 0.45) * d
                np.maximum(
                    vac, _disc(p.dx, p.dy, rr * math.cos(a), rr * math.sin(a), d * rng.uniform(0.018, 0.045)), out=vac
                )
            cell_od *= (1.0 - 0.6 * vac * cyto)[..., None]
        rbc[win] *= 1.0 - body
        stained.append((win, cell_od))
        lab = labels[win]
        lab[body > 0.5] = CYTOPLASM
        lab[nuc > 0.5] = NUCLEUS

    if platelets:
        scale = cell_diameter
        for _ in range(int(rng.poisson(2.5))):
            pd = scale * rng.uniform(*PLATELET_PER_WBC)
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            if any(math.hypot(cx - c.cx, cy - c.cy) < c.diameter / 2 + pd for c in cells):
                continue
            p = _Patch(cx, cy, 0.7 * pd, (h, w))
            if p.empty:
                continue
            win = p.window
            halo = _blob(p.dx, p.dy, pd / 2, rng, 0.12)
            core = _blob(p.dx, p.dy, pd * rng.uniform(0.22, 0.32), rng, 0.2) * (
                0.8 + 0.3 * _smooth_noise(rng, halo.shape, 4)
            )
            stained.append((win, halo[..., None] * _od(PLATELET_HALO_RGB) + core[..., None] * _od(PLATELET_RGB)))
            optic_extra.append((win, halo > 0.5, CYTOPLASM))
            optic_extra.append((win, core > 0.5, NUCLEUS))

    labels[(rbc > 0.35) & (labels == BACKGROUND)] = RED_CELL

    # Beer-Lambert: image = light * exp(-stain * OD). Halogen light: the lamp's colour varies a little
    # and falls off gently toward the edges. Light and red cells go into the exponent in one pass.
    tint = BACKGROUND_RGB * rng.uniform(0.985, 1.0, 3).astype(np.float32)
    fall = rng.uniform(0.01, 0.04)
    ys = np.log1p(-fall * np.linspace(-1, 1, h, dtype=np.float32) ** 2)
    xs = np.log1p(-fall * (np.linspace(-1, 1, w, dtype=np.float32) - np.float32(rng.uniform(-0.3, 0.3))) ** 2)
    light = np.add.outer(ys, xs)
    rbc_od, log_tint = (-stain * _od(RBC_RGB)).tolist(), np.log(tint).tolist()
    # Plane by plane: cv2.transform from one or two channels to three is several times slower.
    exponent = cv2.merge([cv2.addWeighted(rbc, rbc_od[c], light, 1.0, log_tint[c]) for c in range(3)])
    for win, patch_od in stained:
        exponent[win] -= stain * patch_od
    dm96f = cv2.exp(exponent)
    dm96f = cv2.GaussianBlur(dm96f, (3, 3), 0.7)  # the halogen optics' softness
    dm96f += _noise(rng, dm96f.shape)
    dm96 = _to_uint8(dm96f)

    optic_labels = labels.copy()
    # Platelet granulomeres and basophil granules take the basic (nuclear) dye: they shift like nuclei.
    for win, m, k in optic_extra:
        optic_labels[win][m] = k
    dm1200 = apply_optics(dm96, optic_labels, optics="dm1200", granules=granules, rng=rng)
    return SynthCapture(dm96=dm96, dm1200=dm1200, labels=labels, cells=tuple(cells), granules=granules)


# ---------------------------------------------------------------------------------------------- disk
def _capture_rng(seed: int, index: int) -> np.random.Generator:
    """Capture ``index`` of ``seed`` is the same whatever ``count``: one stream per capture."""
    return np.random.default_rng([seed, index])


def _prepare_out(out: Path, looks: Sequence[str], labels: bool) -> None:
    """Make ``out`` ready: new, empty, or an earlier synth output (whose files are replaced)."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder; choose a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise OutputError(f"{out} is not empty and is not a cellbatch synth output; choose a new or empty folder")
        for name in (*LOOKS, "labels"):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "cells.csv").unlink(missing_ok=True)
    try:
        for name in (*looks, *(["labels"] if labels else [])):
            (out / name).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out}: {exc.strerror}; choose a writable folder") from exc


def _write_png(path: Path, image: np.ndarray) -> None:
    data = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image  # OpenCV writes BGR
    # Level 1: the noise makes captures nearly incompressible, and higher levels cost 50 % more time.
    ok, buf = cv2.imencode(".png", data, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise OutputError(f"could not encode {path}")
    try:
        path.write_bytes(buf.tobytes())
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}; check space and permissions") from exc


def _write_capture(
    out: Path, index: int, *, seed: int, cell_diameter: float, looks: Sequence[str], labels: bool
) -> tuple[SynthCell, ...]:
    cap = synth_capture(_capture_rng(seed, index), cell_diameter=cell_diameter)
    name = _capture_name(index)
    for look in looks:
        _write_png(out / look / name, cap.dm96 if look == "dm96" else cap.dm1200)
    if labels:
        _write_png(out / "labels" / name, cap.labels)
    return cap.cells


def _capture_name(index: int) -> str:
    return f"capture_{index:05d}.png"


def write_synth(
    out: Path,
    *,
    count: int,
    seed: int,
    cell_diameter: float = 110.0,
    looks: Sequence[str] = LOOKS,
    labels: bool = False,
    progress: bool = False,
) -> Path:
    """Write ``count`` synthetic captures to ``out`` and return ``out``.

    Layout: ``out/<look>/capture_00000.png`` for each look (same names, same scene in every look),
    ``out/labels/capture_00000.png`` (uint8 class image) with ``labels``, ``out/cells.csv``
    (``filename,cx,cy,cell_type,diameter``, one row per white cell) and ``out/synth.json`` (the
    parameters). ``out`` must be new, empty, or an earlier synth output, which is then replaced: the same
    ``seed`` always gives the same bytes, and capture ``i`` does not depend on ``count``.
    """
    out = Path(out)
    looks = tuple(dict.fromkeys(looks))
    bad = [lk for lk in looks if lk not in LOOKS]
    if bad or not looks:
        raise ConfigError(f"unknown look {bad}; choose from {', '.join(LOOKS)}")
    if count < 0:
        raise ConfigError(f"count must be >= 0, got {count}")
    _prepare_out(out, looks, labels)
    params = {"count": count, "seed": seed, "cell_diameter": cell_diameter, "looks": list(looks), "labels": labels}
    (out / MARKER).write_text(json.dumps(params, indent=2) + "\n")

    def write(index: int) -> tuple[SynthCell, ...]:
        return _write_capture(out, index, seed=seed, cell_diameter=cell_diameter, looks=looks, labels=labels)

    # Threads: OpenCV and NumPy release the GIL for the heavy work (rendering, PNG encoding), and each
    # capture has its own random stream, so the bytes do not depend on the scheduling.
    workers = max(1, min(os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(workers) as pool, open(out / "cells.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        results: Iterable[tuple[SynthCell, ...]] = pool.map(write, range(count))
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=count, desc="synth", unit="capture")
        for i, cells in enumerate(results):
            for c in cells:
                writer.writerow([_capture_name(i), f"{c.cx:.2f}", f"{c.cy:.2f}", c.cell_type, f"{c.diameter:.2f}"])
    return out
