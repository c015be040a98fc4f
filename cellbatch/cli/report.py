"""``cellbatch report OUT``: one self-contained HTML page describing an output folder."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("report")
@click.argument("out_dir", metavar="OUT", type=click.Path(path_type=Path))
@click.option("--out", "dest", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the page  [default: OUT/report.html]")
@click.option("--cells-per-class", type=click.IntRange(min=1, max=50), default=6, show_default=True,
              help="Cells shown per class in the before/after montages.")
def report(out_dir: Path, dest: Path | None, cells_per_class: int) -> None:
    """Write an HTML report of OUT: run header, slide table, before/after montages, agreement heat maps.

    One file that opens from a file share with no server and no network (images inline). It describes
    everything in OUT, including slides an earlier run wrote, and reads only the cells it shows.
    """
    from cellbatch.report import build_report

    result = build_report(out_dir, dest, cells_per_class=cells_per_class)
    click.echo(f"cellbatch: report of {result.slides} slide(s), {result.cells} cells ({result.sampled} shown) "
               f"written to {result.path} in {result.seconds:.1f} s", err=True)
