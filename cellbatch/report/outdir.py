"""Read what an OUT folder says about itself: run.json, each slide's provenance and cells.csv.

The report describes OUT, not the last invocation: slides come from ``run.json`` and from the slide
folders on disk (a slide an earlier run wrote is still there), and a slide's figures come from its
committed ``provenance.json`` when ``run.json`` lacks them (a skipped slide). Every field is read
defensively: other versions of cellbatch write more or fewer, and a missing one shows as "—".
Nothing here touches ``cells.zarr``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellbatch.check.recheck import find_slide_dirs
from cellbatch.errors import InputFormatError, InputNotFoundError

# The arrays a report or an export can show, in pipeline order (mask is a label image, not a picture).
PICTURE_ARRAYS = ("crop", "generated", "normalised")


@dataclass
class SlideView:
    """One slide of OUT as the report shows it."""

    name: str
    status: str
    folder: Path | None = None
    in_run_json: bool = True
    captures: int | None = None
    failed_captures: int | None = None
    cells: int | None = None
    reason: str = ""
    failures: list[dict[str, Any]] = field(default_factory=list)
    check: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def anchor(self) -> str:
        return slide_anchor(self.name)


@dataclass
class OutView:
    """OUT as a whole: ``run.json`` (``{}`` when absent) and every slide, sorted by name."""

    root: Path
    run: dict[str, Any]
    slides: list[SlideView]


def slide_anchor(name: str) -> str:
    """An HTML id for a slide: readable, and unique even when two names differ only in punctuation."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:60]
    return f"slide-{readable}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"


def read_out(root: str | Path) -> OutView:
    """Collect ``run.json`` and every slide of OUT (``find_slide_dirs``), provenance included."""
    root = Path(root)
    if not root.is_dir():
        raise InputNotFoundError(f"output folder {root} does not exist: pass the OUT of a cellbatch run")
    run = read_json(root / "run.json") or {}
    on_disk = {d.relative_to(root).as_posix(): d for d in find_slide_dirs(root)}
    if not run and not on_disk:
        raise InputFormatError(f"{root} holds neither run.json nor slide folders: pass the OUT of a cellbatch run")
    failures_by_slide: dict[str, list[dict[str, Any]]] = {}
    for failure in run.get("failures") or []:
        if isinstance(failure, dict):
            failures_by_slide.setdefault(str(failure.get("slide")), []).append(failure)

    slides: dict[str, SlideView] = {}
    for entry in run.get("slides") or []:
        if not isinstance(entry, dict) or "name" not in entry:
            continue
        name = str(entry["name"])
        view = SlideView(
            name=name, status=str(entry.get("status") or "—"), captures=entry.get("captures"),
            failed_captures=entry.get("failed_captures"), cells=entry.get("cells"),
            reason=str(entry.get("reason") or ""), check=entry.get("check") or None,
        )
        # Capture failures only: a failed slide's own reason is already its `reason`.
        view.failures = [f for f in failures_by_slide.get(name, []) if f.get("path") != name]
        slides[name] = view
    for name, folder in on_disk.items():
        view = slides.get(name) or SlideView(name=name, status="", in_run_json=False)
        _fill_from_provenance(view, folder)
        slides[name] = view
    return OutView(root=root, run=run, slides=[slides[n] for n in sorted(slides)])


def _fill_from_provenance(view: SlideView, folder: Path) -> None:
    """What the slide's committed provenance knows and ``run.json`` did not say (a skip, an older run)."""
    provenance = read_json(folder / "provenance.json") or {}
    view.folder = folder
    view.provenance = {k: v for k, v in provenance.items() if k != "inputs"}  # inputs: one entry per capture
    inputs = provenance.get("inputs")
    if view.captures in (None, 0) and isinstance(inputs, list):
        view.captures = len(inputs)
    failures = provenance.get("failures")
    if not view.failures and isinstance(failures, list):
        view.failures = [f for f in failures if isinstance(f, dict)]
    if view.failed_captures in (None, 0) and isinstance(failures, list):
        view.failed_captures = len(failures)
    if not view.cells and isinstance(provenance.get("cells"), int):
        view.cells = provenance["cells"]
    if view.check is None and isinstance(provenance.get("check"), dict):
        view.check = provenance["check"]
    if not view.status:
        view.status = "qc_failed" if (view.check or {}).get("qc_failed") else "done"


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or ``None`` when it is missing or not a readable object."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def cell_rows(folder: Path) -> Iterator[dict[str, str]]:
    """Stream a slide's ``cells.csv`` one row at a time (never the whole file in memory)."""
    try:
        with open(folder / "cells.csv", newline="", encoding="utf-8") as fh:
            yield from csv.DictReader(fh)
    except OSError:
        return


def cell_class(row: dict[str, str]) -> str | None:
    """The class a cell is shown and exported under: its reference's class, else its output's.

    The reference class is what the agreement rate is measured against (per reference class), so the
    montages and file names group cells the way the agreement-per-class figures do.
    """
    return row.get("class_reference") or row.get("class_output") or None


def open_arrays(folder: Path) -> dict[str, Any]:
    """The picture arrays of a slide's ``cells.zarr``, opened lazily (no pixel is read here)."""
    import zarr

    try:
        group = zarr.open_group(str(folder / "cells.zarr"), mode="r")
        present = set(group.array_keys())
    except Exception:  # a damaged store: the slide shows no pictures, the rest of the report stands
        return {}
    return {name: group[name] for name in PICTURE_ARRAYS if name in present}
