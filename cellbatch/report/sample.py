"""Which cells a report shows, and their pictures: a bounded, deterministic sample per class.

Every cell gets a key from a hash of its slide and ``cell_id``; each group keeps the ``per_group``
cells with the smallest keys (bottom-k sampling). The choice is the same on every build, spreads
over all slides, and needs one pass over ``cells.csv`` with memory bounded by the sample, however
many cells OUT holds. Only the sampled rows of ``cells.zarr`` are read (one chunk each).
"""

from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cellbatch.report.outdir import PICTURE_ARRAYS, SlideView, cell_class, cell_rows, open_arrays

ALL_CELLS = "all cells"  # the one group of an output checked without a classifier
DISAGREE = "output and reference disagree"


@dataclass
class SampledCell:
    """One cell of the sample, with its pictures once :func:`load_pictures` ran."""

    slide: str
    cell_id: int
    row: dict[str, str]
    pictures: dict[str, np.ndarray | None] = field(default_factory=dict)


@dataclass
class Sample:
    """Cells per group (class name, :data:`ALL_CELLS` or :data:`DISAGREE`) and counts seen per group."""

    groups: dict[str, list[SampledCell]]
    counts: dict[str, int]
    cells_read: int


def sample_cells(slides: list[SlideView], *, per_group: int) -> Sample:
    """Stream every slide's ``cells.csv`` and keep ``per_group`` cells per class, chosen by hash."""
    heaps: dict[str, list[tuple[int, int, SampledCell]]] = {}
    counts: dict[str, int] = {}
    order = 0  # tie-breaker so heap entries never compare cells
    for slide in slides:
        if slide.folder is None:
            continue
        for row in cell_rows(slide.folder):
            try:
                cell_id = int(row["cell_id"])
            except (KeyError, ValueError):
                continue
            key = _key(slide.name, cell_id)
            groups = [cell_class(row) or ALL_CELLS]
            if row.get("agree") == "0":
                groups.append(DISAGREE)
            for group in groups:
                counts[group] = counts.get(group, 0) + 1
                heap = heaps.setdefault(group, [])
                if len(heap) < per_group or -heap[0][0] > key:
                    order += 1
                    entry = (-key, order, SampledCell(slide.name, cell_id, dict(row)))
                    if len(heap) < per_group:
                        heapq.heappush(heap, entry)
                    else:
                        heapq.heapreplace(heap, entry)
    groups = {
        name: sorted((cell for _, _, cell in heap), key=lambda c: (c.slide, c.cell_id))
        for name, heap in heaps.items()
    }
    return Sample(groups=groups, counts=counts, cells_read=sum(c for g, c in counts.items() if g != DISAGREE))


def load_pictures(sample: Sample, slides: list[SlideView]) -> list[str]:
    """Read each sampled cell's row of ``crop``, ``generated``, ``normalised`` and its reference crop.

    Returns the picture names some slide has, in montage order (``reference`` last). A reference is
    re-cropped from the paired capture named in the slide's provenance, the way the check found it;
    without ``--reference`` the check compared with the input crop, so no reference column is shown.
    """
    by_name = {s.name: s for s in slides}
    arrays: dict[str, dict[str, Any]] = {}
    references: dict[str, Any] = {}
    shown: set[str] = set()
    for cells in sample.groups.values():
        for cell in cells:
            slide = by_name[cell.slide]
            if cell.slide not in arrays:
                arrays[cell.slide] = open_arrays(slide.folder) if slide.folder else {}
            for name, array in arrays[cell.slide].items():
                shown.add(name)
                cell.pictures[name] = _row(array, cell.cell_id)
            source = _reference_source(slide, references)
            if source is not None:
                shown.add("reference")
                cell.pictures["reference"] = _reference_crop(source, cell)
    return [name for name in (*PICTURE_ARRAYS, "reference") if name in shown]


def _key(slide: str, cell_id: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{slide}\0{cell_id}".encode(), digest_size=8).digest(), "big")


def _row(array: Any, index: int) -> np.ndarray | None:
    if not 0 <= index < array.shape[0]:
        return None
    try:
        return np.asarray(array[index])
    except Exception:  # a damaged chunk hides one picture, not the report
        return None


def _reference_source(slide: SlideView, cache: dict[str, Any]) -> Any:
    """The slide's paired-reference reader (shared between slides with the same settings), or ``None``."""
    from cellbatch.check.reference import ReferenceSource

    settings = ((slide.provenance.get("classifier") or {}).get("reference")) or None
    if not isinstance(settings, dict) or not settings.get("root"):
        return None
    key = repr(sorted(settings.items()))
    if key not in cache:
        try:
            cache[key] = ReferenceSource(
                settings["root"], detector=settings.get("detector") or "threshold",
                cell_diameter=float(settings.get("cell_diameter") or 110.0), max_offset=settings.get("max_offset"),
            )
        except Exception:  # reference moved, or its detector plugin is not installed here
            cache[key] = False
    return cache[key] or None


def _reference_crop(source: Any, cell: SampledCell) -> np.ndarray | None:
    try:
        row = {"source": cell.row["source"], "frame": int(cell.row.get("frame") or 0),
               "cx": float(cell.row["cx"]), "cy": float(cell.row["cy"])}
        return source.crops_for([row], slide=cell.slide)[0]
    except Exception:  # an unreadable or moved reference capture shows as missing
        return None
