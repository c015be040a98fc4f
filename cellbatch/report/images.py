"""``cellbatch export-images``: one PNG per cell, ``DIR/<slide>/<cell_id>_<class>.png``.

For people who browse folders and for tools that read images, not Zarr. Pixels are streamed one
chunk of ``cells.zarr`` at a time, so memory stays flat whatever the slide's size. ``<class>`` is the
class the report groups the cell under (its reference's, else its output's); a cell without one (no
classifier) is ``<cell_id>.png``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellbatch.errors import InputFormatError, InputNotFoundError, OutputError
from cellbatch.report.outdir import cell_class, cell_rows, open_arrays, read_out


@dataclass(frozen=True)
class ExportResult:
    slides: int
    images: int
    skipped_slides: list[str]  # slides without the array


def export_images(out: str | Path, dest: str | Path, *, array: str, slides: Sequence[str] = (),
                  classes: Sequence[str] = ()) -> ExportResult:
    """Write ``array`` of every cell (of the slides matching ``slides``, of ``classes``) as PNGs under ``dest``.

    ``slides`` are shell patterns on slide names (``day1/*``); ``classes`` are class names.
    """
    view = read_out(out)
    on_disk = [s for s in view.slides if s.folder is not None]
    chosen = [s for s in on_disk if not slides or any(fnmatch.fnmatchcase(s.name, p) for p in slides)]
    if not chosen:
        names = ", ".join(s.name for s in on_disk[:10]) or "none"
        raise InputNotFoundError(f"no slide of {out} matches --slides {' '.join(slides)}: its slides are {names}")
    dest = Path(dest)
    wanted = set(classes)
    images, skipped = 0, []
    for slide in chosen:
        data = open_arrays(slide.folder).get(array)
        if data is None:
            skipped.append(slide.name)
            continue
        images += _export_slide(slide.folder, data, dest / slide.name, wanted)
    if len(skipped) == len(chosen):
        raise InputFormatError(f"no chosen slide has a '{array}' array: generated needs a run with --model, "
                               "normalised one with --normalise")
    return ExportResult(slides=len(chosen) - len(skipped), images=images, skipped_slides=skipped)


def _export_slide(folder: Path, data, target: Path, wanted: set[str]) -> int:
    import cv2

    chunk = int(data.chunks[0]) if data.chunks else 16
    todo: list[tuple[int, str | None]] = []
    written = 0

    def flush() -> int:
        # Every wanted cell of one chunk: the chunk is decoded once.
        start = todo[0][0] // chunk * chunk
        block = np.asarray(data[start : min(start + chunk, data.shape[0])])
        for cell_id, name in todo:
            path = target / (f"{cell_id}_{_safe(name)}.png" if name else f"{cell_id}.png")
            if not cv2.imwrite(str(path), np.ascontiguousarray(block[cell_id - start][..., ::-1])):
                raise OutputError(f"could not write {path}: check that {target} is writable and has space")
        todo.clear()
        return len(block)

    for row in cell_rows(folder):
        try:
            cell_id = int(row["cell_id"])
        except (KeyError, ValueError):
            continue
        name = cell_class(row)
        if wanted and name not in wanted or not 0 <= cell_id < data.shape[0]:
            continue
        if todo and cell_id // chunk != todo[0][0] // chunk:
            flush()
        if not written and not todo:
            _make_dir(target)
        todo.append((cell_id, name))
        written += 1
    if todo:
        flush()
    return written


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"could not create {path}: {exc.strerror or exc}; pick another --out") from exc


def _safe(name: str) -> str:
    """A class name as a file-name part (class names come from a model file: trust none of their characters)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-") or "class"
