"""Pair DM1200 (source) and DM96 (target) captures of the same cells and align them pixel to pixel.

Paired training (L1Net, L1GAN, the paired loss of ccGAN) needs each DM1200 cell beside the DM96 image
of the same cell, matched pixel to pixel (thesis section 3.1.1). The analysers find the same cells on a
slide again but do not tag the images, so pairing works in three steps:

1. **Detect** the white cells in every capture of both sets with a registered detector.
2. **Match** each source cell to a target cell. Captures whose relative paths agree (the suffix
   ignored) are matched with each other only; every other source cell is searched among the target
   cells of the remaining captures (of the same folder when that folder exists in the target set).
   The score is the normalised cross-correlation of the thresholded nucleus (``NUCLEUS`` in the
   detector's labels) of the source cell against the target cell's, at a coarse scale; pairs are
   assigned best score first and need at least ``min_score``.
3. **Align** each pair: SIFT keypoints around the two cells, matched by descriptor within a window
   predicted by the template match, then a RANSAC similarity (or full affine) fit maps target pixels to
   source pixels.

The source crop is cut exactly as a conversion run cuts it (an integer 256x256 window centred on the
detected cell, no resampling), because it is what the generator sees at inference; the target is
warped into that frame, so only the training target is interpolated. Both sides pad past their capture
borders the same way (background colour by default, as `cellbatch run` pads); ``overlap`` says how
much of a pair is real pixels on both sides.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Literal

import cv2
import numpy as np

from cellbatch.crop import CROP_SIZE, background_colour, crop_window_origin
from cellbatch.detect.base import NUCLEUS, Detection
from cellbatch.errors import CellbatchError, ConfigError, InputFormatError, OutputError
from cellbatch.read import Slide, read_frame, read_image

ImageSource = np.ndarray | Path | Callable[[], np.ndarray]
"""A capture: an (H, W, 3) uint8 RGB array, a file to read, or a callable that returns the array."""

DetectFn = Callable[[np.ndarray], Detection]

# The nucleus templates are compared at a scale where the expected cell diameter is this many pixels:
# fine enough to tell lobes apart, coarse enough that a few degrees of rotation or a few percent of
# scale barely lower the score, and cheap when every source cell is compared with many target cells.
_TEMPLATE_CELL_PX = 48.0
_TEMPLATE_SIDE = 1.25  # template window, in cell diameters: the nucleus and a little of its neighbours
_SEARCH_MARGIN = 0.3  # extra search window on each side, in cell diameters: centroids of the two
# detections may disagree by this much (cytoplasm segmented differently under the two optics)
_AREA_RATIO = 1.6  # template search skips target cells whose nucleus area differs more than this
_LOWE_RATIO = 0.8
_SIFT_FEATURES = 1500


@dataclass(frozen=True)
class PairSettings:
    """Settings of :func:`pair_captures`.

    Parameters
    ----------
    cell_diameter
        Expected white-cell diameter in pixels; windows and search radii scale with it.
    min_score
        Least nucleus template score (normalised cross-correlation, -1..1) for two cells to pair.
    match
        ``"auto"``: captures with the same relative path (suffix ignored) are matched with each other,
        the rest by template search; ``"name"``: only by name; ``"template"``: ignore names.
    transform
        ``"similarity"`` (rotation, uniform scale, shift: what differs between two optics) or
        ``"affine"`` (adds shear and anisotropic scale, as in the thesis).
    min_inliers
        Least RANSAC inliers for an alignment to count.
    ransac_threshold
        RANSAC reprojection threshold in pixels.
    max_scale_change
        An alignment whose scale differs from 1 by more than this fraction is rejected as implausible.
    crop_size
        Side of the written crops in pixels; the source window is placed as
        :func:`cellbatch.crop.crop_window_origin` places it.
    pad
        How both crops are padded past their capture's border: ``"reflect"`` (mirror) or
        ``"background"`` (each capture's background colour, as ``cellbatch run`` pads).
    """

    cell_diameter: float = 110.0
    min_score: float = 0.5
    match: Literal["auto", "name", "template"] = "auto"
    transform: Literal["similarity", "affine"] = "similarity"
    min_inliers: int = 8
    ransac_threshold: float = 2.0
    max_scale_change: float = 0.25
    crop_size: int = CROP_SIZE
    # Background padding by default: it is how `cellbatch run` pads the crops a generator will see.
    pad: Literal["reflect", "background"] = "background"

    def __post_init__(self) -> None:
        if self.match not in ("auto", "name", "template"):
            raise ConfigError(f"match {self.match!r} is unknown: use auto, name or template")
        if self.transform not in ("similarity", "affine"):
            raise ConfigError(f"transform {self.transform!r} is unknown: use similarity or affine")
        if self.pad not in ("reflect", "background"):
            raise ConfigError(f"pad {self.pad!r} is unknown: use reflect or background")
        if self.cell_diameter < 8:
            raise ConfigError(f"cell diameter {self.cell_diameter} px is too small: use at least 8")
        if self.min_inliers < 3:
            raise ConfigError(f"min_inliers {self.min_inliers} is too small: an affine fit needs 3")
        if self.crop_size < 16:
            raise ConfigError(f"crop size {self.crop_size} is too small: use at least 16")


@dataclass(frozen=True)
class Alignment:
    """A fitted map from target capture pixels to source capture pixels.

    ``affine`` is (2, 3) float64: ``[x_s, y_s] = affine @ [x_t, y_t, 1]``.
    """

    affine: np.ndarray
    inliers: int
    rmse_px: float


@dataclass(frozen=True, eq=False)
class Pair:
    """One aligned pair. ``source_crop`` and ``target_crop`` are (S, S, 3) uint8 RGB in the source frame."""

    name: str
    source: str
    target: str
    source_cell: int
    target_cell: int
    source_xy: tuple[float, float]
    target_xy: tuple[float, float]
    crop_origin: tuple[int, int]
    alignment: Alignment
    score: float
    matched_by: Literal["name", "template"]
    overlap: float
    ncc: float
    source_crop: np.ndarray = field(repr=False)
    target_crop: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Unmatched:
    """A detected cell that got no pair, and why. ``side`` is ``"source"`` or ``"target"``."""

    side: Literal["source", "target"]
    capture: str
    cell: int
    cx: float
    cy: float
    reason: str
    best_score: float = math.nan


@dataclass(frozen=True)
class PairResult:
    """Everything :func:`pair_captures` found, in source order."""

    pairs: tuple[Pair, ...]
    unmatched: tuple[Unmatched, ...]


@dataclass(frozen=True, eq=False)
class _CellInfo:
    capture: str
    index: int
    cx: float
    cy: float
    nucleus_area: int
    nucleus: np.ndarray  # coarse uint8 nucleus mask: the template (source) or the search window (target)


@dataclass(frozen=True)
class _Job:
    source: _CellInfo
    target: _CellInfo
    score: float
    guess: tuple[float, float]  # where the source cell should be in the target capture (x, y)
    how: str


def pair_captures(
    source: Mapping[str, ImageSource],
    target: Mapping[str, ImageSource],
    *,
    detector: DetectFn,
    settings: PairSettings = PairSettings(),
    progress: bool = False,
) -> PairResult:
    """Pair and align the white cells of two sets of captures, in memory.

    Parameters
    ----------
    source, target
        Capture name (a relative path such as ``"slide1/img001.jpg"``) -> image, file or loader.
        Names that agree once the suffix is dropped are taken to be the same field of view.
    detector
        ``detector(image) -> Detection``, e.g.
        ``cellbatch.registry.make_detector("threshold", cell_diameter=110)``.
    settings
        See :class:`PairSettings`.
    progress
        Show progress bars on stderr.

    Returns
    -------
    PairResult
        The aligned pairs and every cell left unpaired, with the reason.

    Examples
    --------
    >>> result = pair_captures({"a.png": src}, {"a.png": tgt}, detector=detect)  # doctest: +SKIP
    >>> result.pairs[0].alignment.affine.shape  # doctest: +SKIP
    (2, 3)
    """
    pairs: list[Pair] = []
    unmatched: list[Unmatched] = []
    for item in iter_pairs(source, target, detector=detector, settings=settings, progress=progress):
        (pairs if isinstance(item, Pair) else unmatched).append(item)
    return PairResult(tuple(pairs), tuple(unmatched))


def iter_pairs(
    source: Mapping[str, ImageSource],
    target: Mapping[str, ImageSource],
    *,
    detector: DetectFn,
    settings: PairSettings = PairSettings(),
    progress: bool = False,
) -> Iterator[Pair | Unmatched]:
    """Like :func:`pair_captures`, but yield pairs as they are aligned so that crops need not pile up.

    Every capture is read twice (once to detect, once to align) instead of being held in memory.
    Unmatched target cells come last.
    """
    from tqdm import tqdm

    d = settings.cell_diameter
    with tqdm(total=len(source) + len(target), desc="detect", unit="capture", disable=not progress) as bar:
        source_cells = _detect_all(source, detector, d, as_template=True, bar=bar)
        target_cells = _detect_all(target, detector, d, as_template=False, bar=bar)

    groups = _candidate_groups(list(source), list(target), settings.match)
    assigned, source_reasons, target_best = _assign(source_cells, target_cells, groups, settings.min_score, d)

    jobs_of: dict[str, list[_Job]] = defaultdict(list)
    for job in assigned:
        jobs_of[job.source.capture].append(job)
    target_reasons: dict[tuple[str, int], tuple[str, float]] = {}
    used_targets: set[tuple[str, int]] = set()
    target_images = _LastImage(target)
    with tqdm(total=len(assigned), desc="align", unit="cell", disable=not progress) as bar:
        for name in source:
            jobs = sorted(jobs_of.get(name, []), key=lambda job: job.source.index)
            src_image = _load(source[name], name) if jobs else None
            for job in jobs:
                s, t = job.source, job.target
                tgt_image = target_images.get(t.capture)
                outcome = align_cells(src_image, tgt_image, (s.cx, s.cy), job.guess, settings=settings)
                bar.update(1)
                if isinstance(outcome, str):
                    source_reasons[(s.capture, s.index)] = (outcome, job.score)
                    target_reasons[(t.capture, t.index)] = (
                        f"its source cell {s.capture}#{s.index} could not be aligned",
                        job.score,
                    )
                    continue
                used_targets.add((t.capture, t.index))
                yield _make_pair(src_image, tgt_image, job, outcome, settings)
            for cell in source_cells[name]:
                if (name, cell.index) in source_reasons:
                    yield _unmatched("source", cell, *source_reasons[(name, cell.index)])
    for name, cells in target_cells.items():
        for cell in cells:
            if (name, cell.index) not in used_targets:
                key = (name, cell.index)
                best = target_best.get(key, math.nan)
                if key in target_reasons:
                    reason, best = target_reasons[key]
                elif math.isnan(best):
                    reason = _uncompared_reason(name, source, source_cells, settings.match)
                elif best < settings.min_score:
                    reason = f"best nucleus template score {best:.2f} < --min-score {settings.min_score:g}"
                else:
                    reason = "its matching source cells went to better-scoring target cells"
                yield _unmatched("target", cell, reason, best)


def align_cells(
    source_image: np.ndarray,
    target_image: np.ndarray,
    source_xy: tuple[float, float],
    target_xy: tuple[float, float],
    *,
    settings: PairSettings = PairSettings(),
) -> Alignment | str:
    """Fit the map from target pixels to source pixels around one cell by SIFT and RANSAC.

    Parameters
    ----------
    source_image, target_image
        (H, W, 3) uint8 RGB captures.
    source_xy, target_xy
        Where the cell is in each capture (x, y); the target position need only be good to about a
        third of a cell diameter.
    settings
        ``cell_diameter``, ``crop_size``, ``transform``, ``min_inliers``, ``ransac_threshold`` and
        ``max_scale_change`` are used.

    Returns
    -------
    Alignment or str
        The fit, or a one-line reason why there is none.
    """
    d = settings.cell_diameter
    half = settings.crop_size / 2 + 0.25 * d
    src_pts, src_desc = _sift(source_image, source_xy, half)
    tgt_pts, tgt_desc = _sift(target_image, target_xy, half * (1 + settings.max_scale_change))
    if len(src_pts) < settings.min_inliers or len(tgt_pts) < settings.min_inliers:
        return f"too few SIFT keypoints ({len(src_pts)} source, {len(tgt_pts)} target)"

    # A source keypoint may only match target keypoints near where the template match puts it: red
    # cells look alike, and without this gate their descriptors would fail the ratio test.
    predicted = src_pts - np.asarray(source_xy) + np.asarray(target_xy)
    gate = 0.4 * d + settings.max_scale_change * half
    near = ((predicted[:, None, :] - tgt_pts[None, :, :]) ** 2).sum(-1) <= gate**2
    dist = ((src_desc**2).sum(1)[:, None] + (tgt_desc**2).sum(1)[None, :] - 2.0 * src_desc @ tgt_desc.T).clip(min=0)
    dist = np.where(near, np.sqrt(dist), np.inf)
    if dist.shape[1] < 2:
        return "too few SIFT keypoints near the target cell"
    order = np.argsort(dist, axis=1)[:, :2]
    best = np.take_along_axis(dist, order, axis=1)
    keep = np.flatnonzero(np.isfinite(best[:, 0]) & (best[:, 0] < _LOWE_RATIO * best[:, 1]))
    # SIFT repeats a keypoint once per dominant orientation; such repeats would count one
    # correspondence several times and let RANSAC "confirm" a wrong pair with a handful of points.
    # Keep one match per source location and per target location, the closest in descriptor space.
    keep = keep[np.argsort(best[keep, 0], kind="stable")]
    _, first_src = np.unique(np.round(src_pts[keep] * 2), axis=0, return_index=True)
    keep = keep[np.sort(first_src)]
    _, first_tgt = np.unique(np.round(tgt_pts[order[keep, 0]] * 2), axis=0, return_index=True)
    keep = keep[np.sort(first_tgt)]
    if len(keep) < settings.min_inliers:
        return f"only {len(keep)} distinct SIFT matches (< {settings.min_inliers})"
    src_m = src_pts[keep].astype(np.float32)
    tgt_m = tgt_pts[order[keep, 0]].astype(np.float32)

    estimate = cv2.estimateAffinePartial2D if settings.transform == "similarity" else cv2.estimateAffine2D
    affine, inlier_mask = estimate(
        tgt_m,
        src_m,
        method=cv2.RANSAC,
        ransacReprojThreshold=settings.ransac_threshold,
        maxIters=5000,
        confidence=0.999,
        refineIters=20,
    )
    if affine is None:
        return "RANSAC found no consistent transform"
    inliers = inlier_mask.ravel().astype(bool)
    n_inliers = int(inliers.sum())
    if n_inliers < settings.min_inliers:
        return f"only {n_inliers} RANSAC inliers (< {settings.min_inliers})"
    scale = math.sqrt(abs(np.linalg.det(affine[:, :2])))
    if abs(math.log(scale)) > math.log1p(settings.max_scale_change):
        return f"implausible scale {scale:.2f} between the two captures"
    mapped = tgt_m[inliers] @ affine[:, :2].T + affine[:, 2]
    rmse = float(np.sqrt(((mapped - src_m[inliers]) ** 2).sum(1).mean()))
    return Alignment(affine.astype(np.float64), n_inliers, rmse)


def crop_source(
    image: np.ndarray, origin: tuple[int, int], *, size: int = CROP_SIZE, pad: str = "reflect"
) -> np.ndarray:
    """Cut the window at ``origin`` (x0, y0) out of ``image`` without resampling.

    ``pad`` is ``"reflect"`` (mirror past the border, edge pixel not repeated) or ``"background"``
    (the capture's background colour, as :func:`cellbatch.crop.background_colour` finds it).
    """
    shift = np.array([[1.0, 0.0, origin[0]], [0.0, 1.0, origin[1]]])
    return _warp(image, shift, size, cv2.INTER_NEAREST, pad)


def warp_target(
    image: np.ndarray, affine: np.ndarray, origin: tuple[int, int], *, size: int = CROP_SIZE, pad: str = "reflect"
) -> np.ndarray:
    """Resample ``image`` (target) into the source window at ``origin``, given ``affine`` (target -> source).

    Bicubic, so that pixel (u, v) of the result shows what pixel (x0 + u, y0 + v) of the source
    capture shows; past the target's border it pads as :func:`crop_source` does.
    """
    return _warp(image, _crop_to_target(affine, origin), size, cv2.INTER_CUBIC, pad)


def _warp(image: np.ndarray, crop_to_image: np.ndarray, size: int, interpolation: int, pad: str) -> np.ndarray:
    flags = interpolation | cv2.WARP_INVERSE_MAP
    if pad == "reflect":
        return cv2.warpAffine(image, crop_to_image, (size, size), flags=flags, borderMode=cv2.BORDER_REFLECT_101)
    fill = tuple(int(v) for v in background_colour(image))
    return cv2.warpAffine(
        image, crop_to_image, (size, size), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=fill
    )


def write_pairs(
    items: PairResult | Iterable[Pair | Unmatched],
    out: str | Path,
    *,
    overwrite: bool = False,
    parameters: Mapping[str, object] | None = None,
    command: list[str] | None = None,
) -> dict[str, int]:
    """Write pairs and unmatched cells to ``out``, which appears complete or not at all.

    Layout: ``source/<name>.png`` and ``target/<name>.png`` (RGB, same names), ``pairs.csv``,
    ``unmatched.csv`` and ``provenance.json``. See ``docs/pairing.md`` for the columns.

    Parameters
    ----------
    items
        A :class:`PairResult` or the stream from :func:`iter_pairs`.
    out
        Output folder; it must not exist or be empty unless ``overwrite``.
    overwrite
        Replace an existing ``out``.
    parameters, command
        Recorded in ``provenance.json``.

    Returns
    -------
    dict
        Counts: ``pairs``, ``unmatched_source``, ``unmatched_target``.
    """
    out = Path(out)
    check_output(out, overwrite=overwrite)
    started = _now()
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    stream = items.pairs + items.unmatched if isinstance(items, PairResult) else items
    counts = {"pairs": 0, "unmatched_source": 0, "unmatched_target": 0}
    try:
        tmp.mkdir(parents=True)
        with (
            open(tmp / "pairs.csv", "w", newline="", encoding="utf-8") as pf,
            open(tmp / "unmatched.csv", "w", newline="", encoding="utf-8") as uf,
        ):
            pairs_csv = csv.writer(pf)
            pairs_csv.writerow(PAIRS_COLUMNS)
            unmatched_csv = csv.writer(uf)
            unmatched_csv.writerow(UNMATCHED_COLUMNS)
            for item in stream:
                if isinstance(item, Pair):
                    _write_crop(tmp, "source", item.name, item.source_crop)
                    _write_crop(tmp, "target", item.name, item.target_crop)
                    pairs_csv.writerow(_pair_row(item))
                    counts["pairs"] += 1
                else:
                    unmatched_csv.writerow(
                        [
                            item.side,
                            item.capture,
                            item.cell,
                            _f(item.cx),
                            _f(item.cy),
                            _f(item.best_score),
                            item.reason,
                        ]
                    )
                    counts[f"unmatched_{item.side}"] += 1
        provenance = {
            "cellbatch_version": _version(),
            "command": list(command or []),
            "parameters": dict(parameters or {}),
            "environment": {
                "python": platform.python_version(),
                "numpy": np.__version__,
                "opencv": cv2.__version__,
            },
            "counts": counts,
            "started": started,
            "finished": _now(),
        }
        (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n", encoding="utf-8")
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        os.replace(tmp, out)
    except CellbatchError:  # an unreadable capture, say: report it as it is, not as an output problem
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"could not write pairs to {out}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def check_output(out: Path, *, overwrite: bool) -> None:
    """Raise :class:`OutputError` unless ``out`` can be (re)written."""
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"output {out} already exists and is not empty: choose a new folder or pass --overwrite")


PAIRS_COLUMNS = (
    "name", "source", "target", "source_cell", "target_cell", "source_cx", "source_cy", "target_cx",
    "target_cy", "x0", "y0", "a11", "a12", "a13", "a21", "a22", "a23", "score", "inliers", "rmse_px",
    "matched_by", "overlap", "ncc",
)  # fmt: skip
UNMATCHED_COLUMNS = ("side", "capture", "cell", "cx", "cy", "best_score", "reason")


def capture_sources(root: str | Path) -> dict[str, ImageSource]:
    """Name -> loader for every capture below ``root`` (a folder, searched recursively, or a Zarr store).

    Files are named by their path relative to ``root``; Zarr frames as ``<slide>/<frame index>``
    (zero-padded to six digits), so two stores of the same layout match by name.
    """
    from functools import partial

    from cellbatch.read import discover_slides, slide_frame_count, validate_slide

    captures: dict[str, ImageSource] = {}
    for slide in discover_slides(root):
        validate_slide(slide)
        if slide.kind == "dir":
            for path in slide.captures:
                captures[path.relative_to(slide.root).as_posix()] = path
            continue
        prefix = "" if slide.name == "." else f"{slide.name}/"
        for i in range(slide_frame_count(slide)):
            captures[f"{prefix}{i:06d}"] = partial(_frame, slide, i)
    if not captures:
        raise InputFormatError(f"no captures found in {root}: pass a folder of image files or a Zarr store")
    return captures


def _frame(slide: Slide, index: int) -> np.ndarray:
    return read_frame(slide, index).image


# --- detection and matching -------------------------------------------------------------------------


def _detect_all(
    captures: Mapping[str, ImageSource], detector: DetectFn, d: float, *, as_template: bool, bar
) -> dict[str, list[_CellInfo]]:
    found: dict[str, list[_CellInfo]] = {}
    for name, src in captures.items():
        image = _load(src, name)
        detection = detector(image)
        nucleus = detection.labels == NUCLEUS
        found[name] = [
            _CellInfo(name, i, c.cx, c.cy, c.nucleus_area_px, _nucleus_window(nucleus, (c.cx, c.cy), d, as_template))
            for i, c in enumerate(detection.cells)
        ]
        bar.update(1)
    return found


def _nucleus_window(nucleus: np.ndarray, xy: tuple[float, float], d: float, template: bool) -> np.ndarray:
    scale = _TEMPLATE_CELL_PX / d
    side = _template_side() if template else _template_side() + 2 * _search_margin()
    # Map the coarse window's pixel centres onto the capture: window centre = cell centre.
    c = (side - 1) / 2
    m = np.array([[1 / scale, 0, xy[0] - c / scale], [0, 1 / scale, xy[1] - c / scale]])
    # Averaging first keeps thin lobes from vanishing when sampled coarsely.
    smooth = cv2.blur(nucleus.astype(np.uint8) * 255, (max(1, round(1 / scale)),) * 2)
    return cv2.warpAffine(
        smooth, m, (side, side), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT
    )


def _stem(name: str) -> str:
    return str(PurePosixPath(name).with_suffix(""))


def _by_stem(names: list[str], side: str) -> dict[str, str]:
    by_stem: dict[str, str] = {}
    for name in names:
        if _stem(name) in by_stem:
            raise InputFormatError(
                f"{side} captures {by_stem[_stem(name)]} and {name} differ only in suffix: "
                "keep one, or use --match template"
            )
        by_stem[_stem(name)] = name
    return by_stem


def _template_side() -> int:
    return round(_TEMPLATE_CELL_PX * _TEMPLATE_SIDE) | 1


def _search_margin() -> int:
    return round(_TEMPLATE_CELL_PX * _SEARCH_MARGIN)


def _template_score(template: np.ndarray, window: np.ndarray) -> tuple[float, float, float]:
    """Best normalised correlation of ``template`` inside ``window``, and its offset (coarse px)."""
    if not template.any() or not window.any():
        return -1.0, 0.0, 0.0
    res = cv2.matchTemplate(window.astype(np.float32), template.astype(np.float32), cv2.TM_CCOEFF_NORMED)
    res = np.nan_to_num(res, nan=-1.0, posinf=-1.0, neginf=-1.0)
    _, best, _, (x, y) = cv2.minMaxLoc(res)
    margin = _search_margin()
    return float(min(best, 1.0)), float(x - margin), float(y - margin)


def _candidate_groups(source: list[str], target: list[str], match: str) -> list[tuple[list[str], list[str], str]]:
    """Split the captures into (source names, target names, how) groups whose cells compete."""
    groups: list[tuple[list[str], list[str], str]] = []
    left_source, left_target = list(source), list(target)
    if match != "template":
        by_key = _by_stem(target, "target")
        named = {s: by_key[_stem(s)] for s in _by_stem(source, "source").values() if _stem(s) in by_key}
        groups += [([s], [t], "name") for s, t in named.items()]
        left_source = [s for s in source if s not in named]
        left_target = [t for t in target if t not in set(named.values())]
        if match == "name":
            return groups + [([s], [], "name") for s in left_source]
    # Without names, compare within a folder when the target set has that folder (slides are usually
    # stored one per folder), else against everything left over.
    folders: dict[str, list[str]] = defaultdict(list)
    for t in left_target:
        folders[str(PurePosixPath(t).parent)].append(t)
    by_folder: dict[str, list[str]] = defaultdict(list)
    for s in left_source:
        folder = str(PurePosixPath(s).parent)
        by_folder[folder if folder in folders else "\0"].append(s)
    for folder, names in by_folder.items():
        groups.append((names, folders[folder] if folder != "\0" else left_target, "template"))
    return groups


def _assign(
    source_cells: dict[str, list[_CellInfo]],
    target_cells: dict[str, list[_CellInfo]],
    groups: list[tuple[list[str], list[str], str]],
    min_score: float,
    d: float,
) -> tuple[list[_Job], dict[tuple[str, int], tuple[str, float]], dict[tuple[str, int], float]]:
    """Assign source cells to target cells, best template score first, within each group.

    Returns the assignments, the reason and best score of each unassigned source cell, and the best
    score each compared target cell got.
    """
    jobs: list[_Job] = []
    reasons: dict[tuple[str, int], tuple[str, float]] = {}
    target_best: dict[tuple[str, int], float] = {}
    to_capture_px = d / _TEMPLATE_CELL_PX
    for src_names, tgt_names, how in groups:
        candidates = [t for name in tgt_names for t in target_cells[name]]
        best_of: dict[tuple[str, int], float] = {}
        edges: list[_Job] = []
        sources = [s for name in src_names for s in source_cells[name]]
        for s in sources:
            best = -math.inf
            for t in candidates:
                # Names vouch for the field of view; without them, skip the hopeless comparisons.
                if how == "template" and not _areas_compatible(s.nucleus_area, t.nucleus_area):
                    continue
                score, dx, dy = _template_score(s.nucleus, t.nucleus)
                best = max(best, score)
                t_key = (t.capture, t.index)
                target_best[t_key] = max(target_best.get(t_key, -1.0), score)
                if score >= min_score:
                    # The template's offset in the search window says where the source cell sits in
                    # the target capture; it centres the SIFT gate.
                    guess = (t.cx + dx * to_capture_px, t.cy + dy * to_capture_px)
                    edges.append(_Job(s, t, score, guess, how))
            best_of[(s.capture, s.index)] = best
        paired_sources: set[tuple[str, int]] = set()
        paired_targets: set[tuple[str, int]] = set()
        for job in sorted(edges, key=lambda e: -e.score):
            s_key, t_key = (job.source.capture, job.source.index), (job.target.capture, job.target.index)
            if s_key in paired_sources or t_key in paired_targets:
                continue
            paired_sources.add(s_key)
            paired_targets.add(t_key)
            jobs.append(job)
        for s in sources:
            key = (s.capture, s.index)
            if key in paired_sources:
                continue
            best = best_of[key]
            if not s.nucleus.any():
                reason = "no nucleus found in the source cell"
            elif not candidates:
                reason = "no target cells to compare with"
                if how == "name":
                    reason = (
                        f"no white cell detected in target capture {tgt_names[0]}"
                        if tgt_names
                        else f"no target capture named like {s.capture}"
                    )
            elif best == -math.inf:
                reason = "no target cell with a similar nucleus area"
            elif best < min_score:
                reason = f"best nucleus template score {best:.2f} < --min-score {min_score:g}"
            else:
                reason = "its matching target cells went to better-scoring source cells"
            reasons[key] = (reason, best if math.isfinite(best) else math.nan)
    return jobs, reasons, target_best


def _uncompared_reason(
    target_name: str, source: Mapping[str, ImageSource], source_cells: dict[str, list[_CellInfo]], match: str
) -> str:
    namesakes = [s for s in source if _stem(s) == _stem(target_name)] if match != "template" else []
    if namesakes and not source_cells[namesakes[0]]:
        return f"no white cell detected in source capture {namesakes[0]}"
    if match == "name" and not namesakes:
        return f"no source capture named like {target_name}"
    return "no source cell was compared with it (none left in its folder, or none with a similar nucleus area)"


def _areas_compatible(a: int, b: int) -> bool:
    return a > 0 and b > 0 and max(a, b) <= _AREA_RATIO * min(a, b)


# --- alignment and output ---------------------------------------------------------------------------


def _sift(image: np.ndarray, xy: tuple[float, float], half: float) -> tuple[np.ndarray, np.ndarray]:
    """SIFT keypoints (capture x, y) and descriptors in the square of half-side ``half`` around ``xy``."""
    h, w = image.shape[:2]
    x0, y0 = max(0, int(xy[0] - half)), max(0, int(xy[1] - half))
    x1, y1 = min(w, int(math.ceil(xy[0] + half))), min(h, int(math.ceil(xy[1] + half)))
    if x1 - x0 < 16 or y1 - y0 < 16:
        return np.zeros((0, 2)), np.zeros((0, 128), np.float32)
    gray = cv2.cvtColor(np.ascontiguousarray(image[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY)
    # A detector per call: creating one is cheap, and sharing one between threads is not documented safe.
    keypoints, desc = cv2.SIFT_create(nfeatures=_SIFT_FEATURES).detectAndCompute(gray, None)
    if desc is None:
        return np.zeros((0, 2)), np.zeros((0, 128), np.float32)
    pts = np.array([kp.pt for kp in keypoints], np.float64) + (x0, y0)
    return pts, desc.astype(np.float32)


def _crop_to_target(affine: np.ndarray, origin: tuple[int, int]) -> np.ndarray:
    """The (2, 3) map from crop pixels to target capture pixels."""
    inverse = cv2.invertAffineTransform(affine)
    lin, shift = inverse[:, :2], inverse[:, 2]
    return np.hstack([lin, (lin @ np.asarray(origin, np.float64) + shift)[:, None]])


def _make_pair(src: np.ndarray, tgt: np.ndarray, job: _Job, alignment: Alignment, settings: PairSettings) -> Pair:
    size = settings.crop_size
    s, t = job.source, job.target
    origin = crop_window_origin(s.cx, s.cy, size=size)[:2]
    source_crop = crop_source(src, origin, size=size, pad=settings.pad)
    target_crop = warp_target(tgt, alignment.affine, origin, size=size, pad=settings.pad)
    # Where both crops show real pixels rather than reflections: the loss can be trusted there.
    u, v = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64))
    inside_src = (u + origin[0] >= 0) & (u + origin[0] <= src.shape[1] - 1)
    inside_src &= (v + origin[1] >= 0) & (v + origin[1] <= src.shape[0] - 1)
    m = _crop_to_target(alignment.affine, origin)
    tx, ty = m[0, 0] * u + m[0, 1] * v + m[0, 2], m[1, 0] * u + m[1, 1] * v + m[1, 2]
    both = inside_src & (tx >= 0) & (tx <= tgt.shape[1] - 1) & (ty >= 0) & (ty <= tgt.shape[0] - 1)
    return Pair(
        name=pair_name(s.capture, s.index),
        source=s.capture,
        target=t.capture,
        source_cell=s.index,
        target_cell=t.index,
        source_xy=(s.cx, s.cy),
        target_xy=(t.cx, t.cy),
        crop_origin=origin,
        alignment=alignment,
        score=job.score,
        matched_by=job.how,  # type: ignore[arg-type]
        overlap=float(both.mean()),
        ncc=_ncc(source_crop, target_crop, both),
        source_crop=source_crop,
        target_crop=target_crop,
    )


def _ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Normalised cross-correlation of the grey levels of two crops over ``mask``."""
    if mask.sum() < 2:
        return math.nan
    ga = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)[mask].astype(np.float64)
    gb = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)[mask].astype(np.float64)
    ga -= ga.mean()
    gb -= gb.mean()
    denom = math.sqrt(float((ga**2).sum() * (gb**2).sum()))
    return float((ga * gb).sum() / denom) if denom > 0 else math.nan


def _unmatched(side: Literal["source", "target"], cell: _CellInfo, reason: str, best: float) -> Unmatched:
    return Unmatched(side, cell.capture, cell.index, cell.cx, cell.cy, reason, best)


def _pair_row(p: Pair) -> list[object]:
    a = p.alignment.affine
    return [
        p.name, p.source, p.target, p.source_cell, p.target_cell, _f(p.source_xy[0]), _f(p.source_xy[1]),
        _f(p.target_xy[0]), _f(p.target_xy[1]), p.crop_origin[0], p.crop_origin[1],
        *(f"{v:.6g}" for v in a.ravel()), _f(p.score, 4), p.alignment.inliers, _f(p.alignment.rmse_px),
        p.matched_by, _f(p.overlap, 4), _f(p.ncc, 4),
    ]  # fmt: skip


def _f(value: float, digits: int = 2) -> str:
    return "" if math.isnan(value) else f"{value:.{digits}f}"


def pair_name(capture: str, cell: int) -> str:
    """File stem of a pair: the capture's relative path without suffix, folders joined by ``__``, then
    ``_c<cell>``. Flat, because training reads ``source/*.png`` (e.g. ``slide1/img7.png`` cell 0 ->
    ``slide1__img7_c0``)."""
    parts = [part for part in PurePosixPath(_stem(capture)).parts if part != "/"]
    return f"{'__'.join(parts)}_c{cell}"


def _write_crop(root: Path, side: str, name: str, crop: np.ndarray) -> None:
    path = root / side / f"{name}.png"
    if path.exists():
        raise OutputError(f"two pairs are both named {name}: rename one of their captures (folders join with __)")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR)):
        raise OutputError(f"could not write {path}: check the disk and permissions")


def _load(src: ImageSource, name: str) -> np.ndarray:
    if isinstance(src, np.ndarray):
        image = src
    elif isinstance(src, Path):
        return read_image(src)
    else:
        image = src()
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InputFormatError(f"capture {name} is {image.dtype} {image.shape}, not (H, W, 3) uint8 RGB")
    return image


class _LastImage:
    """The target capture read last: jobs come in source order, and consecutive jobs usually share it."""

    def __init__(self, captures: Mapping[str, ImageSource]) -> None:
        self._captures = captures
        self._name: str | None = None
        self._image: np.ndarray | None = None

    def get(self, name: str) -> np.ndarray:
        if name != self._name or self._image is None:
            self._image = _load(self._captures[name], name)
            self._name = name
        return self._image


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _version() -> str:
    from cellbatch import __version__

    return __version__
