"""``cellbatch synth``: write synthetic DM-scale captures, in one or both looks."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cellbatch.cli.options import Command, cell_diameter_option, quiet_option


@click.command("synth", cls=Command)
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--count", type=click.IntRange(min=0), default=100, show_default=True, help="Captures to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed: the same seed, the same bytes.")
@cell_diameter_option
@click.option(
    "--look",
    type=click.Choice(["dm1200", "dm96", "both"]),
    default="both",
    show_default=True,
    help="Which optics to write: the DM1200 look (input), the DM96 look (target), or matching pairs.",
)
@click.option("--labels", is_flag=True, help="Also write OUT/labels/ (uint8 class image per capture).")
@quiet_option
def synth(out: Path, count: int, seed: int, cell_diameter: float, look: str, labels: bool, quiet: bool) -> None:
    """Write synthetic 640x480 captures with known white cells to OUT.

    OUT/dm1200/ and OUT/dm96/ hold the same scenes in the two looks (same file names), OUT/cells.csv
    the white-cell centres and types. OUT must be new, empty, or an earlier synth output (replaced).
    """
    from cellbatch.synth import LOOKS, write_synth

    looks = LOOKS if look == "both" else (look,)
    write_synth(
        out,
        count=count,
        seed=seed,
        cell_diameter=cell_diameter,
        looks=looks,
        labels=labels,
        progress=not quiet and sys.stderr.isatty(),
    )
    if not quiet:
        click.echo(f"wrote {count} captures ({', '.join(looks)}) to {out}", err=True)
