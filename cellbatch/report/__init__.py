"""The run report (``cellbatch report OUT``, ``cellbatch run --report``) and per-cell image export.

    outdir.py  read OUT: run.json, slide provenance, cells.csv rows (never cells.zarr)
    sample.py  a bounded, deterministic sample of cells per class, and only their pictures
    figures.py matplotlib plots: cells per slide, agreement per class
    page.py    one self-contained HTML page (inline CSS, data-URI images, no script, CSP)
    images.py  ``cellbatch export-images``: per-cell PNGs for folder browsers and other tools

Cost grows with the number of slides (one provenance and one streamed cells.csv each) and with the
sample, never with the pixels in OUT: ``benchmarks/bench_report.py`` measures a 100,000-cell OUT.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cellbatch.atomic import write_text_atomic
from cellbatch.errors import OutputError

REPORT_NAME = "report.html"
CELLS_PER_CLASS = 6
_OPEN_SLIDES_UP_TO = 20  # more slides than this: per-slide sections start folded, except those with problems


@dataclass(frozen=True)
class ReportResult:
    path: Path
    slides: int
    cells: int
    sampled: int
    seconds: float


def build_report(out: str | Path, dest: str | Path | None = None, *,
                 cells_per_class: int = CELLS_PER_CLASS) -> ReportResult:
    """Write the HTML report of the output folder ``out`` to ``dest`` (default ``out/report.html``).

    The file is written beside its final name and renamed into place, so a reader never sees half a
    report. Raises :class:`~cellbatch.errors.InputNotFoundError` when ``out`` is not a cellbatch output.
    """
    from cellbatch.check.agreement import summarise_run
    from cellbatch.errors import ConfigError
    from cellbatch.provenance import utc_now
    from cellbatch.report import figures
    from cellbatch.report.outdir import read_out
    from cellbatch.report.page import render_page
    from cellbatch.report.sample import load_pictures, sample_cells

    start = time.perf_counter()
    out = Path(out)
    dest = Path(dest) if dest is not None else out / REPORT_NAME
    view = read_out(out)
    sample = sample_cells(view.slides, per_group=cells_per_class)
    columns = load_pictures(sample, view.slides)

    checked = {s.name: s.check for s in view.slides if s.check and s.check.get("confusion")}
    run_check = None
    if checked:
        try:
            run_check = summarise_run(checked, min_agreement=_min_agreement(view.run, checked.values()))
        except ConfigError:  # slides checked with classifiers of different classes: no run-level matrix
            run_check = None
    plots = {"cells_per_slide": figures.cells_per_slide(
        [s.name for s in view.slides], [s.cells or 0 for s in view.slides], [s.status for s in view.slides])}
    if run_check is not None:
        plots["agreement_per_class"] = figures.agreement_per_class(
            run_check["per_class"], min_agreement=run_check["min_agreement"])
    html = render_page(view, sample, columns, run_check, plots, generated_at=utc_now(),
                       open_slides=len(view.slides) <= _OPEN_SLIDES_UP_TO)
    _write_text_atomic(dest, html)
    return ReportResult(path=dest, slides=len(view.slides), cells=sum(s.cells or 0 for s in view.slides),
                        sampled=sum(len(c) for c in sample.groups.values()), seconds=time.perf_counter() - start)


def _min_agreement(run: dict, summaries) -> float | None:
    """The QC threshold: run.json's, else the one every checked slide shares (None when they differ)."""
    stated = (run.get("check") or {}).get("min_agreement") if isinstance(run.get("check"), dict) else None
    if stated is not None:
        return stated
    values = {s.get("min_agreement") for s in summaries}
    return values.pop() if len(values) == 1 else None


def _write_text_atomic(path: Path, text: str) -> None:
    try:
        write_text_atomic(path, text)
    except OSError as exc:
        raise OutputError(f"could not write the report {path}: {exc.strerror or exc}; pick another --out") from exc
