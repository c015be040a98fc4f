"""Fit a normalisation profile from captures on disk (``cellbatch normalise fit``).

Source and target are unpaired sets of captures (folders or Zarr stores). ``hm`` segments every
capture with a detector from the registry and fits per-class Gaussians; ``global`` fits one
Gaussian per side; ``reinhard`` and ``macenko`` need only the target set. Captures stream through
the fit, so the whole set never sits in memory.

``hm`` segments the source captures after mapping them by the global transform. A detector's
thresholds are tuned for one look; run on the other look it draws the class borders elsewhere (on
PBC images shifted to the DM1200 look, the threshold detector called a third of the cytoplasm red
cell), and the per-class Gaussians then compare different structures on the two sides. Seen
through the global transform, both sets look alike to the detector, so a class means the same thing
on both sides. The source Gaussians are still fitted on the original source colours.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from cellbatch.errors import ConfigError, InputFormatError, InputNotFoundError
from cellbatch.normalise.global_affine import apply_affine, fit_global
from cellbatch.normalise.hm import fit_hm
from cellbatch.normalise.macenko import fit_macenko
from cellbatch.normalise.profile import METHODS, write_profile
from cellbatch.normalise.reinhard import fit_reinhard
from cellbatch.read import discover_slides, read_frame, slide_frame_count, validate_slide

NEEDS_SOURCE = ("hm", "global")


def iter_captures(src: str | Path, *, limit: int | None = None) -> Iterator[np.ndarray]:
    """(H, W, 3) uint8 RGB captures below a folder or Zarr store, in slide order, at most ``limit``."""
    return islice(_all_captures(Path(src)), limit)


def _all_captures(src: Path) -> Iterator[np.ndarray]:
    # the reader of `cellbatch run`, so a profile is fitted from exactly the inputs a run accepts
    for slide in discover_slides(src):
        validate_slide(slide)
        for i in range(slide_frame_count(slide)):
            yield read_frame(slide, i).image


class CaptureSet:
    """The captures below a folder or Zarr store, read again on every iteration (at most ``limit``).

    HM reads both sets twice (global fit, then per-class fit), so a one-shot iterator will not do.
    """

    def __init__(self, src: str | Path, *, limit: int | None = None) -> None:
        self.src, self.limit = Path(src), limit

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter_captures(self.src, limit=self.limit)


class _Counted:
    """An iterable that counts what passed through it (fits stream; the count goes in the profile)."""

    def __init__(self, items: Iterable[Any]) -> None:
        self.items, self.count = items, 0

    def __iter__(self) -> Iterator[Any]:
        for item in self.items:
            self.count += 1
            yield item


def fit_profile(
    method: str,
    *,
    source: Iterable[np.ndarray] | None,
    target: Iterable[np.ndarray],
    segment: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[dict[str, Any], dict[str, int]]:
    """Fit the fields of a ``method`` profile.

    Parameters
    ----------
    method : {"hm", "global", "reinhard", "macenko"}
        The normaliser the profile is for.
    source, target : iterable of np.ndarray
        (H, W, 3) uint8 RGB captures; ``source`` is ignored by ``reinhard`` and ``macenko``. For
        ``hm`` both must be re-iterable (lists, :class:`CaptureSet`): they are read twice.
    segment : callable, optional
        ``image -> (H, W) uint8 labels``; required by ``hm``.

    Returns
    -------
    fields : dict
        For :func:`~cellbatch.normalise.profile.write_profile`.
    counts : dict
        ``{"source_images": n, "target_images": n}``.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown normalisation method {method!r}: choose one of {', '.join(METHODS)}")
    if method in NEEDS_SOURCE and source is None:
        raise ConfigError(f"--method {method} needs --source captures (the look to convert from)")
    tgt = _Counted(target)
    src = _Counted(source if method in NEEDS_SOURCE and source is not None else ())
    if method == "hm":
        if segment is None:
            raise ConfigError("--method hm needs a detector to segment the captures")
        # see the module docstring: the detector sees the source in (roughly) the target look
        global_map = fit_global(source, target)["transform"]
        a, b = global_map["A"], global_map["b"]
        fields = fit_hm(
            ((im, segment(apply_affine(im, a, b))) for im in src), ((im, segment(im)) for im in tgt)
        )
    elif method == "global":
        fields = fit_global(src, tgt)
    elif method == "reinhard":
        fields = fit_reinhard(tgt)
    else:
        fields = fit_macenko(tgt)
    return fields, {"source_images": src.count, "target_images": tgt.count}


def fitted_on(source_model: str | Path | None) -> dict[str, Any]:
    """What a source-fitted profile maps from: raw captures, or one generator's output (by sha256)."""
    if source_model is None:
        return {"kind": "captures"}
    from cellbatch.modelfile import sha256_file

    path = Path(source_model)
    if not path.is_file():
        raise InputNotFoundError(f"--source-model {path} does not exist: pass the generator whose output --source is")
    return {"kind": "model_output", "model": str(path.resolve()), "sha256": sha256_file(path)}


def fit_profile_files(
    out: str | Path,
    *,
    method: str,
    source: str | Path | None,
    target: str | Path,
    detector: str = "threshold",
    cell_diameter: float = 110.0,
    limit: int | None = None,
    source_model: str | Path | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Fit a profile from captures on disk, write it to ``out`` and return (path, fit record).

    The record says what the profile was fitted on (``fitted_on``): raw ``source`` captures, or the
    output of the generator ``source_model`` (by sha256), so ``cellbatch run`` can refuse to apply it
    where it would convert colours twice (see docs/normalisation.md).

    Raises
    ------
    InputFormatError
        A set holds no captures.
    ConfigError
        Unknown method or detector, or no ``source`` for ``hm`` / ``global``.
    """
    segment = None
    if method == "hm":
        from cellbatch.registry import make_detector

        detect = make_detector(detector, cell_diameter=cell_diameter)

        def segment(image: np.ndarray) -> np.ndarray:
            return detect(image).labels

    src = CaptureSet(source, limit=limit) if source is not None and method in NEEDS_SOURCE else None
    try:
        fields, counts = fit_profile(
            method, source=src, target=CaptureSet(target, limit=limit), segment=segment
        )
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise InputFormatError(
            f"cannot fit a {method} profile (source {source}, target {target}): {exc}; "
            "pass folders or Zarr stores that hold captures"
        ) from exc
    from cellbatch import __version__

    fit = {
        "method": method,
        "source": None if src is None else str(source),
        "target": str(target),
        **counts,
        "limit": limit,
        "cellbatch_version": __version__,
    }
    if method in NEEDS_SOURCE:
        fit["fitted_on"] = fitted_on(source_model)
    if method == "hm":
        fit.update(detector=detector, cell_diameter=cell_diameter, source_segmented="after global transform")
    return write_profile(out, method=method, fields=fields, fit=fit), fit
