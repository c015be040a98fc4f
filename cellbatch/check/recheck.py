"""Re-check a written output (``cellbatch check OUT``) without running the generator again.

Each slide folder (``cells.csv`` + ``cells.zarr`` + ``provenance.json``) is streamed through the same
:class:`~cellbatch.check.agreement.AgreementCheck` the run uses, batch by batch: input = ``crop``,
output = ``normalised`` if present, else ``generated``, else ``crop``. The check columns of
``cells.csv``, ``confusion.csv``/``.png``, the ``check`` figures of ``provenance.json`` and of
``OUT/run.json`` are replaced, each file atomically.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cellbatch.atomic import atomic_write
from cellbatch.check.agreement import AgreementCheck, summarise_run
from cellbatch.errors import InputFormatError, InputNotFoundError

SLIDE_FILES = ("cells.csv", "cells.zarr", "provenance.json")
OUTPUT_ORDER = ("normalised", "generated", "crop")  # what the run writes last comes first


def find_slide_dirs(out_root: str | Path) -> list[Path]:
    """Slide folders below OUT, sorted; hidden folders (staging) and Zarr stores are not entered."""
    out_root = Path(out_root)
    if not out_root.is_dir():
        raise InputNotFoundError(f"output folder {out_root} does not exist: pass the OUT of a cellbatch run")
    found = []
    for dirpath, dirnames, _ in os.walk(out_root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not d.endswith(".zarr"))
        here = Path(dirpath)
        if all((here / name).exists() for name in SLIDE_FILES):
            found.append(here)
    return found


def recheck_output(out_root: str | Path, check: AgreementCheck, *, command: list[str]) -> dict[str, Any]:
    """Re-check every slide under OUT.

    Returns the run summary (:func:`summarise_run`) plus ``slides_checked`` (slide name -> summary) and
    ``exit_code``, OUT's after the check (as in ``run.json``; :func:`cellbatch.runstate.exit_code_for`).
    """
    from cellbatch.provenance import utc_now

    out_root = Path(out_root)
    slide_dirs = find_slide_dirs(out_root)
    if not slide_dirs:
        raise InputFormatError(
            f"{out_root} holds no slide folders (cells.csv + cells.zarr + provenance.json): "
            "pass the OUT folder of a finished cellbatch run"
        )
    stamp = {"command": command, "at": utc_now()}
    summaries = {}
    compared_with_itself = []
    for slide_dir in slide_dirs:
        name = slide_dir.relative_to(out_root).as_posix()
        summaries[name] = recheck_slide(slide_dir, check, name=name, stamp=stamp)
        if check.reference is None and _output_array(slide_dir) == "crop":
            compared_with_itself.append(name)
    warnings = []
    if compared_with_itself:
        warnings.append(
            f"{len(compared_with_itself)} slide(s) ({', '.join(compared_with_itself[:3])}"
            f"{', ...' if len(compared_with_itself) > 3 else ''}) hold no generated or normalised crops and no "
            "--reference was given: output and reference are the same pixels, so agreement is 100% by "
            "construction; pass --reference DM96/ or check an output made with --model"
        )
    run = summarise_run(summaries, min_agreement=check.settings.min_agreement)
    exit_code = _update_run_json(out_root / "run.json", summaries, run, check, stamp)
    return {**run, "slides_checked": summaries, "exit_code": exit_code, "warnings": warnings}


def _output_array(slide_dir: Path) -> str | None:
    """The array a check reads as the slide's output (``normalised``, ``generated`` or ``crop``)."""
    import zarr

    try:
        present = set(zarr.open_group(str(slide_dir / "cells.zarr"), mode="r").array_keys())
    except Exception:  # recheck_slide has already reported an unreadable store
        return None
    return next((n for n in OUTPUT_ORDER if n in present), None)


def recheck_slide(slide_dir: Path, check: AgreementCheck, *, name: str, stamp: dict[str, Any]) -> dict[str, Any]:
    """Re-check one slide folder in place and return its summary (see :meth:`AgreementCheck.finish_slide`)."""
    import zarr

    from cellbatch.atomic import write_json_atomic
    from cellbatch.write import CHECK_COLUMNS, format_value

    fieldnames, rows = _read_cells_csv(slide_dir / "cells.csv")
    try:
        group = zarr.open_group(str(slide_dir / "cells.zarr"), mode="r")
    except Exception as exc:  # zarr raises several types for a damaged store
        raise InputFormatError(f"{slide_dir / 'cells.zarr'} is not a readable Zarr group: {exc}") from exc
    present = set(group.array_keys())
    if "crop" not in present:
        raise InputFormatError(
            f"{slide_dir / 'cells.zarr'} has no 'crop' array: the check needs the input crops; re-run the slide"
        )
    crop = group["crop"]
    output = group[next(n for n in OUTPUT_ORDER if n in present)]
    if crop.shape[0] != len(rows) or output.shape[0] != len(rows):
        raise InputFormatError(
            f"{slide_dir}: cells.csv has {len(rows)} rows but cells.zarr holds {crop.shape[0]} crops "
            f"and {output.shape[0]} outputs; re-run the slide"
        )

    state = check.start_slide(name)
    step = check.settings.batch_size
    for start, batch in _batches(rows, step):
        crops = np.asarray(crop[start : start + len(batch)])
        outputs = crops if output is crop else np.asarray(output[start : start + len(batch)])
        columns = check.check_batch(state, [_cell_position(row, slide_dir) for row in batch], crops, outputs)
        for row, new in zip(batch, columns, strict=True):
            row.update({key: format_value(value) for key, value in new.items()})
    summary = check.finish_slide(state, slide_dir)

    header = [f for f in fieldnames if f not in CHECK_COLUMNS] + list(CHECK_COLUMNS)
    _write_cells_csv(slide_dir / "cells.csv", header, rows)
    provenance = _read_json(slide_dir / "provenance.json")
    provenance["classifier"] = check.provenance()
    provenance["check"] = {**summary, "rechecked": stamp}
    write_json_atomic(slide_dir / "provenance.json", provenance)
    return summary


def _batches(rows: list[dict[str, str]], step: int) -> Iterator[tuple[int, list[dict[str, str]]]]:
    for start in range(0, len(rows), step):
        yield start, rows[start : start + step]


def _cell_position(row: dict[str, str], slide_dir: Path) -> dict[str, Any]:
    try:
        return {
            "source": row["source"],
            "frame": int(row.get("frame") or 0),
            "cx": float(row["cx"]),
            "cy": float(row["cy"]),
        }
    except (KeyError, ValueError) as exc:
        raise InputFormatError(
            f"{slide_dir / 'cells.csv'} row {row.get('cell_id', '?')} lacks a valid source/frame/cx/cy "
            f"({exc}): re-run the slide"
        ) from exc


def _read_cells_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        fieldnames = list(reader.fieldnames or [])
    missing = {"source", "cx", "cy"} - set(fieldnames)
    if missing:
        raise InputFormatError(f"{path} lacks the column(s) {', '.join(sorted(missing))}: re-run the slide")
    return fieldnames, rows


def _write_cells_csv(path: Path, header: list[str], rows: list[dict[str, Any]]) -> None:
    with atomic_write(path, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputFormatError(f"{path} is not readable JSON ({exc}): re-run the slide") from exc


def _update_run_json(
    path: Path,
    summaries: dict[str, dict[str, Any]],
    run: dict[str, Any],
    check: AgreementCheck,
    stamp: dict[str, Any],
) -> int:
    """Put the new figures into OUT/run.json: each slide's ``check`` and QC status, and the run's.

    A slide that was ``done`` or ``qc_failed`` takes the status the new check gives it; ``exit_code``
    follows the one rule of :func:`cellbatch.runstate.exit_code_for`, and is returned.
    """
    from cellbatch.atomic import write_json_atomic
    from cellbatch.runstate import exit_code_for

    data = _read_json(path) if path.exists() else {}
    slides = data.setdefault("slides", [])
    if not isinstance(slides, list):
        raise InputFormatError(f"{path} has no list of slides: it was not written by cellbatch run")
    entries = {entry.get("name"): entry for entry in slides if isinstance(entry, dict)}
    for name, summary in summaries.items():
        entry = entries.get(name)
        if entry is None:
            entry = {"name": name, "status": "done", "cells": summary["cells"]}
            slides.append(entry)
        entry["check"] = summary
        if entry.get("status") in ("done", "qc_failed"):
            entry["status"] = "qc_failed" if summary["qc_failed"] else "done"
    counts: dict[str, int] = {}
    for entry in slides:
        counts[entry.get("status", "")] = counts.get(entry.get("status", ""), 0) + 1
    data["slides_by_status"] = counts
    data["exit_code"] = exit_code_for(entry for entry in slides if isinstance(entry, dict))
    data["classifier"] = check.provenance()
    data["check"] = {**run, "rechecked": stamp}
    write_json_atomic(path, data)
    return data["exit_code"]
