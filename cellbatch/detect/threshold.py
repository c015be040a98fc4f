"""The built-in white-cell detector: stain thresholds at reduced resolution.

A white cell is found by its nucleus: after white-balancing the capture on its own background, a
nucleus is where blue exceeds green (blue-purple chromatin absorbs green; red cells and background do
not). The work runs on a copy downsampled by an integer factor so that the expected cell is about
:data:`WORK_DIAMETER` pixels across, which keeps the cost near-constant per capture whatever the
magnification; only the label image is brought back to full resolution.

Steps, at the working scale (distances in cell diameters ``D``):

1. **Stain maps.** ``purple = B - G`` and ``dark = 1 - mean(R, G, B)`` of the white-balanced image.
2. **Nucleus density.** The nucleus mask (``purple > NUCLEUS_PURPLE``) blurred with a Gaussian of
   ``0.2 D``: the lobes of one neutrophil melt into one hill, two cells keep two hills.
3. **Seeds.** Local maxima of the density (a flat top counts once). A weaker maximum joins a
   stronger one nearer than ``0.55 D``, or one within ``0.8 D`` that it reaches without a density
   valley while the two blobs span at most ``1.5 D``, or one whose nearest chromatin (nucleus pixels
   that absorb red light) is one connected piece with the other's, up to a ``1.9 D`` span: the lobes
   of a multilobed nucleus are ONE cell, two touching cells stay two.
4. **Acceptance.** Each seed owns the pixels within ``0.85 D`` that are nearer to it than to any
   other seed, so touching cells are split between their nuclei. Seeds with less nucleus than a
   platelet-sized floor are dropped first (a detached lobe then counts towards its own cell). A seed
   is a white cell when its nucleus is large (above any giant platelet); a mid-sized one is a
   platelet when it has the granulomere's colour (``purple / dark`` in a band below pale Wright
   nuclei and above MGG chromatin) and either no cell body around it or chromatin as pale as a
   granulomere (a giant platelet on a red cell or in a clump), unless it has both dense chromatin
   and a small body (erythroblasts, small lymphocytes). Each kept seed then moves to the middle of
   the nucleus it owns.
5. **Segmentation.** Nucleus pixels are nucleus-coloured and absorb red light nearly as much as their
   nucleus does (chromatin absorbs red, eosin hardly: this keeps eosinophil granules out); specks
   smaller than ``0.01 D^2`` are dropped. The cell is a circle fitted to where 32 rays from the
   nucleus leave the stained area; rays that run on into a neighbouring red cell or off the capture
   are outliers, so overlapping red cells do not drag the outline. Cytoplasm is the stained part of
   the circle outside the nucleus. ``edge`` is set when the cell touches the capture border.

Full-resolution labels: the white-cell classes are upsampled from the working scale; background
versus red cell is re-decided per full-resolution pixel from the green channel, the channel red
cells absorb most.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import cv2
import numpy as np

from cellbatch.detect.base import CYTOPLASM, NUCLEUS, RED_CELL, Cell, Detection, DetectSettings

#: Cell diameter, in pixels, at the working scale. About 28 px resolves a nucleus and its lobes;
#: more only costs time.
WORK_DIAMETER = 28.0

# Stain thresholds on white-balanced values in [0, 1]. Measured on MGG (PBC, DM96) and Wright (BCCD)
# captures: nuclei have B - G of 0.3 to 0.5; red cells and background below 0.12.
NUCLEUS_PURPLE = 0.22
STAINED_DARK = 0.06  # darker than this (1 - mean of white-balanced RGB) is part of some cell
BACKGROUND_PERCENTILE = 98.0  # the background is the brightest part of any blood-film capture

# Seeds, in cell diameters.
DENSITY_SIGMA = 0.2
PEAK_WINDOW = 0.5
MIN_PEAK_DENSITY = 0.3
MERGE_DISTANCE = 0.55  # two maxima nearer than this are lobes of one nucleus
VALLEY_DISTANCE = 0.8  # up to this far, maxima joined without a density valley are one nucleus
VALLEY_RATIO = 0.75
NUCLEUS_SPAN = 1.5  # lobes of one nucleus span at most this much, edge to edge
CONNECTED_SPAN = 1.9  # ... or this much when chromatin joins them (band and segmented neutrophils)
CELL_REACH = 0.85  # a cell extends at most this far from its seed
SPECK = 0.01  # nucleus fragments smaller than this (D^2) are granules or debris

# Acceptance: nucleus area in squared cell diameters (a round nucleus 0.8 D across has 0.5 D^2).
# Measured on PBC (MGG; its cells are about 1.3x the 110 px default), BCCD (Wright) and cellbatch.synth.
MIN_NUCLEUS = 0.10  # below: ordinary platelets, stain specks, detached lobes (BCCD small lymphocyte: 0.12)
LARGE_NUCLEUS = 0.50  # above: a nucleus whatever its colour (largest PBC giant platelet measured: 0.44)
PLATELET_RATIO = (0.80, 1.10)  # purple / darkness of MGG platelets; chromatin is darker, Wright bluer
CELL_BODY = 0.65  # a stained body this large (D^2) around a blob makes it a cell (platelets: 99th pct 0.60)
# ... unless the body is no more than a red cell under a giant platelet (a red cell is about 0.4 D^2, a giant
# platelet up to 0.45) and the chromatin is as pale as a granulomere (PBC tuning half: the two giant platelets
# with bodies 0.68 and 0.93 have chromatin 2.6-2.9; neutrophils in the colour band 4.4-8.5; synthetic monocytes,
# pale, have bodies of 1.0-1.2).
PLATELET_ON_RED_CELL = 1.0
PALE_CHROMATIN = 3.5
SMALL_BODY = 0.30  # with dense chromatin, a body this large suffices (erythroblasts, lymphocytes)
# Chromatin density is judged against the capture's own red cells: optical densities (-ln of the
# white-balanced value) all scale by g under a gamma g, so their ratio does not move, where absolute
# darkness does (gamma 1.3 on PBC turned 15 % of giant platelets "dense"). 75th percentile of the
# nucleus' density over the median density of stained pixels outside nuclei (PBC: small lymphocytes and
# erythroblasts 4.5-9, giant platelets median 3.7).
DENSE_CHROMATIN = 5.0  # dense, for a blob of the platelet colour
MGG_CHROMATIN = 4.0  # dense, for a blob darker for its purple than platelets (below the colour band)
# An over-exposed capture (background clipped at 255) lightens everything by a constant density, which
# shrinks the red cells' density more than the nucleus': a loose absolute floor keeps that from making
# platelets dense (PBC small lymphocytes: darkness >= 0.57 even at gamma 0.8; platelets median 0.50).
DARK_CHROMATIN = 0.55
MIN_REFERENCE_PIXELS = 50  # fewer stained pixels outside nuclei than this: no red cells to compare with
TYPICAL_RED_CELL_DENSITY = 0.21  # then use the PBC median
# Chromatin absorbs red light, eosin (eosinophil granules, red cells) hardly: a nucleus pixel absorbs at
# least this fraction of the red its nucleus' 75th percentile absorbs.
NUCLEUS_RELATIVE_RED = 0.75

# Cell outline.
N_RAYS = 32
CIRCLE_TOLERANCE = 0.3  # rays whose exit radius is off the median by more than this are outliers
CIRCLE_MARGIN = 1.05
MIN_RAYS = 8
MIN_RADIUS = 0.2

_RAY_ANGLES = np.linspace(0.0, 2.0 * np.pi, N_RAYS, endpoint=False)
_RAY_COS = np.cos(_RAY_ANGLES).astype(np.float32)
_RAY_SIN = np.sin(_RAY_ANGLES).astype(np.float32)
_RAY_INDEX = np.arange(N_RAYS)


@functools.lru_cache(maxsize=8)
def _rays(reach: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample radii every half pixel up to ``reach``, and each ray's x and y offsets at them (float32).

    One reach per cell diameter, so a detector computes these once, not for every blob.
    """
    rho = np.arange(0.0, reach, 0.5, dtype=np.float32)
    tables = (rho, _RAY_COS[:, None] * rho, _RAY_SIN[:, None] * rho)
    for table in tables:
        table.flags.writeable = False  # shared between calls
    return tables

_DEFAULT_SETTINGS = DetectSettings()


class ThresholdDetector:
    """Find white cells by their blue-purple nuclei and segment the capture into four classes.

    Stateless between calls and picklable (it holds only its settings), so one instance can be
    shipped to Dask workers.

    Parameters
    ----------
    settings
        ``settings.cell_diameter`` (pixels) sets every size and distance.

    Examples
    --------
    >>> import numpy as np
    >>> from cellbatch.detect import DetectSettings
    >>> image = np.full((240, 320, 3), (235, 228, 220), np.uint8)
    >>> image[100:130, 150:180] = (90, 40, 150)  # a nucleus-coloured square, 30 px
    >>> detection = ThresholdDetector(DetectSettings(cell_diameter=40.0))(image)
    >>> len(detection.cells), detection.labels.shape
    (1, (240, 320))
    """

    def __init__(self, settings: DetectSettings = _DEFAULT_SETTINGS) -> None:
        self.settings = settings

    def __repr__(self) -> str:
        return f"ThresholdDetector({self.settings!r})"

    def __call__(self, image: np.ndarray) -> Detection:
        """Detect and segment one (H, W, 3) uint8 RGB capture."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
        h, w = image.shape[:2]
        # An integer factor puts every working pixel on a k x k block of the capture, so labels upsample
        # exactly; bilinear sampling at that factor averages 2 x 2 pixels of each block, which is enough
        # at 28 px per cell (area averaging of the whole block costs several times more).
        k = max(1, min(round(self.settings.cell_diameter / WORK_DIAMETER), h, w))
        sh, sw = h // k, w // k
        small = cv2.resize(image[: sh * k, : sw * k], (sw, sh), interpolation=cv2.INTER_LINEAR)
        d = self.settings.cell_diameter / k

        white = _background_colour(small)
        balanced = small.astype(np.float32) * (1.0 / white)
        purple = balanced[..., 2] - balanced[..., 1]
        dark = 1.0 - (balanced[..., 0] + balanced[..., 1] + balanced[..., 2]) * (1.0 / 3.0)
        maps = _Maps(
            nucleus=purple > NUCLEUS_PURPLE, stained=dark > STAINED_DARK, dark=dark, purple=purple, balanced=balanced,
            small=small, white=white,
        )

        density = cv2.GaussianBlur(maps.nucleus.astype(np.float32), (0, 0), DENSITY_SIGMA * d)
        seeds = _accepted_seeds(_seeds(density, maps, d), maps, d)

        labels = _red_cell_labels(image, white)
        cells: list[Cell] = []
        for win, mine, nuc in maps.owned(seeds, CELL_REACH * d):
            if not nuc.any():
                continue
            red_absorbed = 1.0 - balanced[..., 0][win]
            red_floor = NUCLEUS_RELATIVE_RED * float(_percentile75(red_absorbed[nuc]))
            nuc = _without_specks(nuc & (red_absorbed >= red_floor), d)
            if not nuc.any():
                continue
            centre, radius = _cell_circle(nuc, mine & maps.stained[win], CELL_REACH * d, d)
            cells.append(_paint_cell(labels, image, white, _Outline(win, mine, nuc, centre, radius, red_floor), k))
        cells.sort(key=lambda c: (c.cy, c.cx))  # reading order: the same image gives the same cell ids
        return Detection(cells=tuple(cells), labels=labels)


class _Owned(NamedTuple):
    """What one seed owns at the working scale: its window, its territory in it, and the nucleus there."""

    win: tuple[slice, slice]
    territory: np.ndarray
    nucleus: np.ndarray


class _Maps:
    """The per-pixel stain maps of one capture at the working scale."""

    __slots__ = (
        "nucleus", "stained", "dark", "purple", "balanced", "small", "white", "_mean_density", "_red_cell_density",
        "_chromatin_pieces", "_owned",
    )

    def __init__(
        self, *, nucleus: np.ndarray, stained: np.ndarray, dark: np.ndarray, purple: np.ndarray, balanced: np.ndarray,
        small: np.ndarray, white: np.ndarray,
    ):
        self.nucleus, self.stained, self.dark, self.purple = nucleus, stained, dark, purple
        self.balanced, self.small, self.white = balanced, small, white
        self._mean_density: np.ndarray | None = None
        self._red_cell_density: float | None = None
        self._chromatin_pieces: np.ndarray | None = None
        self._owned: tuple[tuple[tuple[float, float], ...], list[_Owned]] | None = None

    def owned(self, seeds: list[tuple[float, float]], reach: float) -> list[_Owned]:
        """Each seed's territory (see :func:`_territory`) and the nucleus pixels in it.

        Kept for the last list of seeds asked about: the acceptance passes, the re-centring and the
        segmentation ask again for an unchanged list whenever no seed was dropped or moved.
        """
        key = tuple(seeds)
        if self._owned is None or self._owned[0] != key:
            found = []
            for i in range(len(seeds)):
                win, mine = _territory(seeds, i, self.nucleus.shape, reach)
                found.append(_Owned(win, mine, mine & self.nucleus[win]))
            self._owned = (key, found)
        return self._owned[1]

    def mean_density(self) -> np.ndarray:
        """Each pixel's optical density, the mean over R, G and B of :func:`_density` of its white-balanced value.

        A white-balanced channel takes one of 256 values, so the logarithms come from a 256-entry table
        per channel, made with the same float32 operations: the same floats as ``_density(balanced)``
        (the red-cell reference took 0.10 instead of 0.22 ms a capture in a line profile). Computed on
        first use (captures whose blobs are all large never ask).
        """
        if self._mean_density is None:
            table = _density(np.arange(256, dtype=np.float32)[:, np.newaxis] * (1.0 / self.white))
            od = cv2.LUT(self.small, table.reshape(1, 256, 3))
            self._mean_density = (od[..., 0] + od[..., 1] + od[..., 2]) / 3
        return self._mean_density

    def red_cell_density(self) -> float:
        """Median optical density (mean of R, G, B) of the stained pixels outside nuclei: mostly red cells."""
        if self._red_cell_density is None:
            other = self.stained & ~self.nucleus
            if np.count_nonzero(other) < MIN_REFERENCE_PIXELS:
                self._red_cell_density = TYPICAL_RED_CELL_DENSITY
            else:
                self._red_cell_density = float(_median(self.mean_density()[other]))
        return self._red_cell_density

    def chromatin_pieces(self) -> np.ndarray:
        """Connected pieces of chromatin (int32 labels, 0 elsewhere): nucleus pixels that absorb red light.

        Lobes of one nucleus are joined by chromatin filaments; two cells that touch are joined, if at
        all, by cytoplasm, which is nucleus-coloured in some cells but absorbs little red. Computed on
        first use: most captures never hold two maxima close enough to ask.
        """
        if self._chromatin_pieces is None:
            red_absorbed = 1.0 - self.balanced[..., 0]
            floor = NUCLEUS_RELATIVE_RED * float(_percentile75(red_absorbed[self.nucleus]))
            chromatin = (self.nucleus & (red_absorbed >= floor)).view(np.uint8)
            self._chromatin_pieces = cv2.connectedComponents(chromatin, connectivity=8, ltype=cv2.CV_32S)[1]
        return self._chromatin_pieces


def _density(balanced: np.ndarray) -> np.ndarray:
    """Optical density of white-balanced values: a gamma applied to the capture scales it, ratios stay."""
    return -np.log(np.maximum(balanced, 1.0 / 255.0))


# numpy's median and percentile spend 20-40 us a call on checks and dispatch, more than the few hundred
# values take; these give the same floats (its "linear" method) for the float32 arrays used here.
def _median(values: np.ndarray) -> np.floating:
    """``np.median(values)`` of a non-empty 1-D array without NaNs."""
    n = values.size
    part = np.partition(values, [(n - 1) // 2, n // 2])
    return (part[(n - 1) // 2] + part[n // 2]) / 2


def _percentile75(values: np.ndarray) -> np.floating:
    """``np.percentile(values, 75)`` of a non-empty 1-D array without NaNs."""
    n = values.size
    index = 0.75 * (n - 1)
    lo = int(index)
    hi = min(lo + 1, n - 1)
    part = np.partition(values, [lo, hi])
    a, b, t = part[lo], part[hi], index - lo
    # numpy's lerp: from the nearer end, so t = 0 and t = 1 give a and b exactly
    return a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t)


def _grid(rows: tuple[int, int], cols: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``np.ogrid[r0:r1, c0:c1]`` (a column of row indices, a row of column indices) without its indexing machinery."""
    return np.arange(*rows)[:, np.newaxis], np.arange(*cols)[np.newaxis, :]


def _background_colour(small: np.ndarray) -> np.ndarray:
    """Per-channel white point: a high percentile, from a 256-bin histogram (cheaper than a sort)."""
    white = np.empty(3, np.float32)
    n = small.shape[0] * small.shape[1]
    for c in range(3):
        hist = cv2.calcHist([small], [c], None, [256], [0, 256]).ravel()
        white[c] = np.searchsorted(np.cumsum(hist), n * BACKGROUND_PERCENTILE / 100.0)
    return np.maximum(white, 1.0)


def _seeds(density: np.ndarray, maps: _Maps, d: float) -> list[tuple[float, float]]:
    """One (x, y) per nucleus: density maxima, strongest first, merged when they are lobes of one."""
    size = int(2 * round(PEAK_WINDOW * d / 2) + 1)
    local_max = cv2.dilate(density, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
    peaks = ((density >= local_max) & (density > MIN_PEAK_DENSITY)).view(np.uint8)
    # A flat-topped maximum (a large round nucleus) is one peak, at its middle.
    _, _, _, centres = cv2.connectedComponentsWithStats(peaks, connectivity=8)
    xs, ys = centres[1:, 0], centres[1:, 1]
    values = density[np.round(ys).astype(np.intp), np.round(xs).astype(np.intp)]
    kept: list[tuple[float, float, float]] = []
    for i in np.argsort(-values, kind="stable"):
        peak = (float(xs[i]), float(ys[i]), float(values[i]))
        if not any(_same_nucleus(density, maps, peak, other, d) for other in kept):
            kept.append(peak)
    return [(x, y) for x, y, _ in kept]


def _same_nucleus(
    density: np.ndarray, maps: _Maps, a: tuple[float, float, float], b: tuple[float, float, float], d: float
) -> bool:
    """Whether two density maxima ``(x, y, value)`` are lobes of one nucleus rather than two cells.

    Lobes are close, joined without a density valley (or by a chromatin filament, which lets the far
    ends of a band neutrophil join), and together no wider than one cell holds. A
    maximum's value tells the size of its blob: a disc of radius r blurred by sigma peaks at
    1 - exp(-r^2 / 2 sigma^2).
    """
    dist = float(np.hypot(a[0] - b[0], a[1] - b[1]))
    if dist < MERGE_DISTANCE * d:
        return True
    sigma = DENSITY_SIGMA * d
    span = dist + sum(sigma * np.sqrt(-2.0 * np.log(max(1.0 - v, 1e-3))) for v in (a[2], b[2]))
    if span <= CONNECTED_SPAN * d and _one_piece(maps.chromatin_pieces(), a, b, sigma):
        return True
    if dist >= VALLEY_DISTANCE * d or span > NUCLEUS_SPAN * d:
        return False
    t = np.linspace(0.0, 1.0, max(3, int(dist) + 1))
    iy = np.round(a[1] + t * (b[1] - a[1])).astype(np.intp)
    ix = np.round(a[0] + t * (b[0] - a[0])).astype(np.intp)
    return bool(density[iy, ix].min() >= VALLEY_RATIO * min(a[2], b[2]))


def _one_piece(pieces: np.ndarray, a: tuple[float, float, float], b: tuple[float, float, float], r: float) -> bool:
    """Whether the chromatin nearest to two maxima (within ``r``) is one connected piece."""
    found = []
    for x, y, _ in (a, b):
        y0, x0 = max(0, int(y - r)), max(0, int(x - r))
        window = pieces[y0 : int(y + r) + 1, x0 : int(x + r) + 1]
        ys, xs = np.nonzero(window)
        if not len(ys):
            return False
        nearest = np.argmin((ys + y0 - y) ** 2 + (xs + x0 - x) ** 2)
        found.append(window[ys[nearest], xs[nearest]])
    return bool(found[0] == found[1])


def _territory(
    seeds: list[tuple[float, float]], i: int, shape: tuple[int, int], reach: float
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Seed ``i``'s window and, within it, the pixels within ``reach`` nearer to it than to any other seed."""
    sx, sy = seeds[i]
    h, w = shape
    y0, y1 = max(0, int(sy - reach)), min(h, int(sy + reach) + 2)
    x0, x1 = max(0, int(sx - reach)), min(w, int(sx + reach) + 2)
    yy, xx = _grid((y0, y1), (x0, x1))
    own = (xx - sx) ** 2 + (yy - sy) ** 2
    mine = own <= reach * reach
    for j, (ox, oy) in enumerate(seeds):
        if j != i and abs(ox - sx) < 2 * reach and abs(oy - sy) < 2 * reach:
            mine &= own <= (xx - ox) ** 2 + (yy - oy) ** 2
    return (slice(y0, y1), slice(x0, x1)), mine


def _accepted_seeds(seeds: list[tuple[float, float]], maps: _Maps, d: float) -> list[tuple[float, float]]:
    """The seeds that are white cells, each moved to the middle of the nucleus it owns.

    Seeds with too little nucleus (platelets, specks, a detached lobe) are dropped first, so they claim
    no territory while the rest are judged: a lobe then counts towards its own cell.
    """
    reach = CELL_REACH * d
    for final in (False, True):
        kept = []
        for seed, (win, mine, nuc) in zip(seeds, maps.owned(seeds, reach), strict=True):
            area = np.count_nonzero(nuc) / (d * d)
            if area >= MIN_NUCLEUS and (not final or area >= LARGE_NUCLEUS or not _platelet(nuc, mine, win, maps, d)):
                kept.append(seed)
        seeds = kept
    # A seed starts on its densest lobe; the far lobe of a lobed nucleus can lie beyond its reach
    # until the seed sits in the middle of the whole nucleus.
    for _ in range(2):
        moved = []
        for seed, (win, _, nuc) in zip(seeds, maps.owned(seeds, reach), strict=True):
            ys, xs = np.nonzero(nuc)
            moved.append((float(xs.mean()) + win[1].start, float(ys.mean()) + win[0].start) if len(xs) else seed)
        seeds = moved
    return seeds


def _platelet(nuc: np.ndarray, mine: np.ndarray, win: tuple[slice, slice], maps: _Maps, d: float) -> bool:
    """Whether a mid-sized nucleus-coloured blob is a (giant) platelet rather than a small nucleus.

    Blue-violet nuclei of pale stains lie above the platelet colour band, and a blob inside a large
    stained body is a cell, unless it has the platelet colour and chromatin as pale as a granulomere
    (a giant platelet on a red cell, or a platelet clump). Otherwise a blob is a cell only with a small
    body and chromatin dense for this capture (see :data:`DENSE_CHROMATIN`): erythroblasts and small
    lymphocytes. MGG chromatin,
    darker for its purple than the granulomere (below the band), needs less density; so does a blob
    cut by the capture border, whose body cannot be measured.
    """
    nuc_dark = maps.dark[win][nuc]
    ratio = float(maps.purple[win][nuc].mean()) / max(float(nuc_dark.mean()), 1e-3)
    if ratio > PLATELET_RATIO[1]:
        return False
    body = np.count_nonzero(_cell_body(nuc, mine & maps.stained[win], CELL_REACH * d, d) | nuc) / (d * d)
    chromatin = float(_percentile75(maps.mean_density()[win][nuc])) / maps.red_cell_density()
    if body >= CELL_BODY:
        return PLATELET_RATIO[0] <= ratio and body < PLATELET_ON_RED_CELL and chromatin < PALE_CHROMATIN
    if ratio < PLATELET_RATIO[0]:
        return chromatin < MGG_CHROMATIN or (body < SMALL_BODY and not _on_border(nuc, win, maps.nucleus.shape))
    if body < SMALL_BODY:
        return True
    return chromatin < DENSE_CHROMATIN or float(_percentile75(nuc_dark)) < DARK_CHROMATIN


def _on_border(mask: np.ndarray, win: tuple[slice, slice], shape: tuple[int, int]) -> bool:
    """Whether a window mask reaches the edge of the capture (``shape``: the capture at the working scale)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return bool(
        rows[0] + win[0].start == 0
        or cols[0] + win[1].start == 0
        or rows[-1] + win[0].start == shape[0] - 1
        or cols[-1] + win[1].start == shape[1] - 1
    )


def _without_specks(nuc: np.ndarray, d: float) -> np.ndarray:
    """The nucleus mask without isolated specks (eosinophil granules, a stray platelet fragment)."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(nuc.view(np.uint8), connectivity=8)
    kept = stats[:, cv2.CC_STAT_AREA] >= SPECK * d * d
    return nuc & kept[labels] if not kept[1:].all() else nuc


def _cell_body(nuc: np.ndarray, stained: np.ndarray, reach: float, d: float) -> np.ndarray:
    """The stained part of the cell's circle (see :func:`_cell_circle`), at the working scale."""
    (cx, cy), radius = _cell_circle(nuc, stained, reach, d)
    yy, xx = _grid((0, nuc.shape[0]), (0, nuc.shape[1]))
    return ((xx - cx) ** 2 + (yy - cy) ** 2 <= (radius * CIRCLE_MARGIN) ** 2) & stained


def _cell_circle(nuc: np.ndarray, stained: np.ndarray, reach: float, d: float) -> tuple[tuple[float, float], float]:
    """Centre and radius of a circle fitted to where rays from the nucleus leave the stained cell.

    Rays that run on into a neighbouring red cell (too long) or off the window (the capture border or
    the territory's edge) are outliers; the circle through the rest finds the cell whatever the
    nucleus' position inside it.
    """
    h, w = nuc.shape
    # the centroid from integer moments: the same floats as the mean of the pixel coordinates
    moments = cv2.moments(nuc.view(np.uint8), binaryImage=True)
    cx, cy = moments["m10"] / moments["m00"], moments["m01"] / moments["m00"]
    rho, ray_x, ray_y = _rays(reach)
    px = cx + ray_x
    py = cy + ray_y
    ix, iy = np.round(px).astype(np.intp), np.round(py).astype(np.intp)
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    # a sample off the window reads some other pixel of it, and ``inside`` discards it
    on = inside & stained.ravel().take(iy * w + ix, mode="clip")
    last = len(rho) - 1
    stop = np.where(on.all(axis=1), last, np.argmin(on, axis=1))
    rays = _RAY_INDEX
    r = rho[stop]
    clean = inside[rays, stop] & (stop < last)
    if np.count_nonzero(clean) >= 3:
        typical = float(_median(r[clean]))
        clean &= np.abs(r - typical) <= CIRCLE_TOLERANCE * typical
    centre, radius = (cx, cy), float(_median(r[clean] if clean.any() else r))
    if np.count_nonzero(clean) >= MIN_RAYS:
        bx, by = px[rays, stop][clean], py[rays, stop][clean]
        # Algebraic (Kasa) circle fit: x^2 + y^2 = A x + B y + C, by its normal equations in float64
        # (lstsq's SVD cost 0.1 ms a cell; on 20,000 random rings both gave the same float32 solution).
        design = np.stack([bx, by, np.ones_like(bx)], axis=1).astype(np.float64)
        rhs = (bx * bx + by * by).astype(np.float64)
        try:
            sol = np.linalg.solve(design.T @ design, design.T @ rhs).astype(np.float32)
        except np.linalg.LinAlgError:  # every ray stopped at one point: lstsq's minimum-norm answer
            sol = np.linalg.lstsq(design, rhs, rcond=None)[0].astype(np.float32)
        fx, fy = float(sol[0]) / 2.0, float(sol[1]) / 2.0
        fr = float(np.sqrt(max(float(sol[2]) + fx * fx + fy * fy, 0.0)))
        if np.hypot(fx - cx, fy - cy) <= reach and MIN_RADIUS * d <= fr <= reach:
            centre, radius = (fx, fy), fr
    return centre, radius


def _red_cell_labels(image: np.ndarray, white: np.ndarray) -> np.ndarray:
    """Full-resolution ``RED_CELL`` / ``BACKGROUND`` from the green channel, the one red cells absorb most."""
    limit = float(white[1]) * (1.0 - STAINED_DARK)
    _, labels = cv2.threshold(cv2.extractChannel(image, 1), limit, RED_CELL, cv2.THRESH_BINARY_INV)
    return labels


class _Outline(NamedTuple):
    """One white cell as found at the working scale (window coordinates)."""

    win: tuple[slice, slice]
    territory: np.ndarray
    nucleus: np.ndarray
    centre: tuple[float, float]
    radius: float
    red_floor: float  # red absorbance a nucleus pixel reaches


def _tight(cell: _Outline) -> _Outline:
    """The same cell in the smallest window that holds its circle and nucleus (fewer pixels to paint)."""
    ys, xs = np.nonzero(cell.nucleus)
    r = cell.radius * CIRCLE_MARGIN + 1.0
    h, w = cell.nucleus.shape
    top = max(0, min(int(ys.min()), int(cell.centre[1] - r)))
    left = max(0, min(int(xs.min()), int(cell.centre[0] - r)))
    bottom = min(h, max(int(ys.max()) + 1, int(np.ceil(cell.centre[1] + r)) + 1))
    right = min(w, max(int(xs.max()) + 1, int(np.ceil(cell.centre[0] + r)) + 1))
    rows, cols = slice(top, bottom), slice(left, right)
    win = (
        slice(cell.win[0].start + top, cell.win[0].start + bottom),
        slice(cell.win[1].start + left, cell.win[1].start + right),
    )
    centre = (cell.centre[0] - left, cell.centre[1] - top)
    return cell._replace(win=win, territory=cell.territory[rows, cols], nucleus=cell.nucleus[rows, cols], centre=centre)


def _paint_cell(labels: np.ndarray, image: np.ndarray, white: np.ndarray, cell: _Outline, k: int) -> Cell:
    """Draw one cell into the full-resolution labels and measure it there.

    The nucleus is re-thresholded per pixel near the working-scale nucleus; the cytoplasm is the
    stained part of the fitted circle, drawn at full resolution: outlines come out smooth, not in
    k x k blocks, for a few hundred thousand pixel operations per cell.
    """
    cell = _tight(cell)
    h, w = labels.shape
    y0, x0 = cell.win[0].start * k, cell.win[1].start * k
    y1 = h if cell.win[0].stop * k >= (h // k) * k else cell.win[0].stop * k
    x1 = w if cell.win[1].stop * k >= (w // k) * k else cell.win[1].stop * k

    def upsample(mask: np.ndarray) -> np.ndarray:
        up = cv2.resize(mask.view(np.uint8), (mask.shape[1] * k, mask.shape[0] * k), interpolation=cv2.INTER_NEAREST)
        up = cv2.copyMakeBorder(
            up, 0, max(0, y1 - y0 - up.shape[0]), 0, max(0, x1 - x0 - up.shape[1]), cv2.BORDER_REPLICATE
        )
        return up[: y1 - y0, : x1 - x0].view(bool)

    territory = upsample(cell.territory)
    nucleus = upsample(cv2.dilate(cell.nucleus.view(np.uint8), np.ones((3, 3), np.uint8))) & territory
    # Re-threshold per pixel only where the working-scale nucleus (grown by one working pixel) lies.
    ys, xs = np.nonzero(nucleus.any(axis=1))[0], np.nonzero(nucleus.any(axis=0))[0]
    box = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
    balanced = image[y0:y1, x0:x1][box].astype(np.float32) * (1.0 / white)
    nucleus[box] &= (balanced[..., 2] - balanced[..., 1] > NUCLEUS_PURPLE) & (1.0 - balanced[..., 0] >= cell.red_floor)
    if not nucleus.any():
        nucleus = upsample(cell.nucleus) & territory
    view = labels[y0:y1, x0:x1]
    cx = (cell.centre[0] + cell.win[1].start + 0.5) * k - 0.5 - x0
    cy = (cell.centre[1] + cell.win[0].start + 0.5) * k - 0.5 - y0
    yy, xx = _grid((0, y1 - y0), (0, x1 - x0))
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= (cell.radius * CIRCLE_MARGIN * k) ** 2
    region = (disc & territory & (view == RED_CELL)) | nucleus
    view[region] = CYTOPLASM
    view[nucleus] = NUCLEUS
    # Centroid from the mask's moments: integer sums, so the same floats as the mean of the pixel
    # coordinates, without listing them.
    mask = region.view(np.uint8)
    moments = cv2.moments(mask, binaryImage=True)
    n = int(moments["m00"])
    left, top, width, height = cv2.boundingRect(mask)
    return Cell(
        cx=(moments["m10"] + x0 * n) / n,
        cy=(moments["m01"] + y0 * n) / n,
        area_px=n,
        nucleus_area_px=cv2.countNonZero(nucleus.view(np.uint8)),
        edge=y0 + top == 0 or x0 + left == 0 or y0 + top + height == h or x0 + left + width == w,
    )
