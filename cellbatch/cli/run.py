"""``cellbatch run``: the whole conversion job."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from cellbatch.cli.config import config_option, resolved_options
from cellbatch.cli.options import (
    Command,
    agreement_options,
    cell_diameter_option,
    detector_option,
    device_option,
    json_option,
    precision_option,
    quiet_option,
    threads_option,
)
from cellbatch.crop import CROP_SIZE


class NumberOrAuto(click.ParamType):
    """A whole number of at least ``minimum`` (``what`` names it in the error), or ``auto``."""

    name = "N|auto"

    def __init__(self, minimum: int, what: str) -> None:
        self.minimum, self.what = minimum, what

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if value == "auto" or isinstance(value, int) and value >= self.minimum:
            return value
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = self.minimum - 1
        if number < self.minimum:
            self.fail(f"{value!r} is neither {self.what} nor auto", param, ctx)
        return number


BATCH_SIZE = NumberOrAuto(1, "a positive number of crops")
PROCESSES = NumberOrAuto(0, "a number of worker processes (0: threads)")


@click.command("run", cls=Command)
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), default=Path("cellbatch-out"), show_default=True,
              help="Output folder: one folder per slide, plus run.json.")
@click.option("--model", type=click.Path(path_type=Path),
              help="Generator file (.pt or .onnx); without it, generation is skipped.")
@click.option("--model-sha256", metavar="HEX", help="Refuse a model file whose sha256 differs.")
@device_option
@precision_option
@click.option("--batch-size", type=BATCH_SIZE, default="16", show_default=True,
              help="Crops per device batch, or auto (on CUDA the largest that fits; 32 on CPU).")
@cell_diameter_option
@detector_option
@click.option("--crop-size", type=click.IntRange(min=1), default=CROP_SIZE, show_default=True, metavar="PX",
              help="Side of the square crop cut around each cell; raise it with --cell-diameter so large cells "
              "fit (the classifier check uses the centre 256x256).")
@click.option("--drop-edge", is_flag=True, help="Leave out cells cut by the capture border.")
@click.option("--normalise", "normalise", multiple=True, metavar="NAME[:ARG]",
              help="Normaliser from the registry, applied in order (repeatable): none, display, hm:PROFILE.json, ...")
@click.option("--classifier", type=click.Path(path_type=Path), help="Classifier (.pt or .onnx): agreement check.")
@agreement_options
@click.option("--scheduler", metavar="ADDRESS", help="Run the CPU stages on an existing Dask cluster (tcp://HOST:PORT).")
@threads_option
@click.option("--workers", type=click.IntRange(min=1),
              help="Local threads for the CPU stages (default: one per core of --threads).")
@click.option("--processes", type=PROCESSES, default="auto", show_default=True,
              help="Run the CPU stages in N local worker processes instead of threads (0: threads). auto: when "
              "they pay (1,000 captures or more): one per core, or a quarter of 8 or more cores beside a generator "
              "on the CPU; else threads.")
@click.option("--force", is_flag=True, help="Redo every slide, even those whose output is complete and unchanged.")
@click.option("--report", "write_report", is_flag=True,
              help="Write OUT/report.html at the end (run header, slides, montages, heat maps).")
@click.option("--shard", metavar="I/N", callback=lambda ctx, param, value: _shard(value),
              help="Do share I of N (0-based, by slide name) beside other runs into the same OUT: cluster array jobs.")
@quiet_option
@json_option
@config_option
def run(sources: tuple[Path, ...], out: Path, classes: str | None, quiet: bool, as_json: bool, write_report: bool,
        config: Path | None, **options: Any) -> None:
    """Convert the captures in SOURCES (folders or Zarr stores) into OUT.

    Each slide (a leaf folder of captures, or one Zarr array) gets OUT/<slide>/cells.csv, cells.zarr
    and provenance.json; OUT/run.json describes OUT: every slide as it stands, skipped ones included.
    Exit codes: 0 all done, 2 bad command line, 3 could not run, 4 some captures or slides in OUT
    failed, 5 some slides in OUT below --min-agreement, 130/143 interrupted (Ctrl-C/SIGTERM; rerun to
    resume).

    Every option (and SOURCES, as `sources`) can come from --config FILE.toml under its long name;
    the command line wins, and the values used go into each provenance.json.
    """
    from cellbatch.api import convert
    from cellbatch.cli import command_line

    class_list = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    with progress_bar(quiet) as (on_plan, on_progress):
        report = convert(
            sources, out, classes=class_list, command=command_line(), on_progress=on_progress,
            on_plan=on_plan, on_warning=lambda message: click.echo(f"cellbatch: warning: {message}", err=True),
            run_options=resolved_options(click.get_current_context()), **options,
        )
    summary = report.to_dict()
    print_summary(summary)  # --quiet hides the progress bar only: a log always gets the outcome
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    if write_report:
        report_of(out, quiet=quiet)
    sys.exit(summary["exit_code"])


def report_of(out: Path, *, quiet: bool) -> None:
    """The HTML report of OUT; a report that cannot be written is a warning, the run's results stand."""
    from cellbatch.errors import CellbatchError
    from cellbatch.report import build_report

    try:
        result = build_report(out)
    except CellbatchError as exc:
        click.echo(f"cellbatch: warning: no report written: {exc}", err=True)
        return
    if not quiet:
        click.echo(f"cellbatch: report in {result.path}", err=True)


def _shard(value: str | None) -> tuple[int, int] | None:
    from cellbatch.errors import ConfigError
    from cellbatch.shard import parse_shard

    if value is None:
        return None
    try:
        return parse_shard(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc).removeprefix(f"--shard {value!r} "), param_hint="--shard") from exc


@contextmanager
def progress_bar(quiet: bool) -> Iterator[tuple[Callable[[int, int], None], Callable[[int, int, int], None]]]:
    """A tqdm bar over captures with slides and cells/s, on a terminal only (quiet in logs and pipelines).

    Yields ``(on_plan, on_progress)``: the first sets the totals once the slides are listed.
    """
    from tqdm import tqdm

    disable = quiet or not sys.stderr.isatty()
    with tqdm(unit="capture", disable=disable, dynamic_ncols=True, file=sys.stderr) as bar:
        cells = slides = 0
        total_slides = "?"

        def on_plan(n_captures: int, n_slides: int) -> None:
            nonlocal total_slides
            total_slides = str(n_slides)
            bar.reset(total=n_captures)

        def on_progress(n_captures: int, n_cells: int, n_slides: int) -> None:
            nonlocal cells, slides
            cells += n_cells
            slides += n_slides
            bar.update(n_captures)
            elapsed = bar.format_dict["elapsed"]
            bar.set_postfix(slides=f"{slides}/{total_slides}", cells=cells,
                            cells_per_s=f"{cells / elapsed:.1f}" if elapsed else "-", refresh=False)

        yield on_plan, on_progress


def print_summary(summary: dict[str, Any]) -> None:
    from cellbatch.runlog import failure_lines, summary_lines

    for line in summary_lines(summary):
        click.echo(f"cellbatch: {line}", err=True)
    for line in failure_lines(summary, limit=20):
        click.echo(f"  {line}", err=True)
