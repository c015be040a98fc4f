"""``cellbatch export-images OUT``: per-cell PNGs of one array of an output folder."""

from __future__ import annotations

from pathlib import Path

import click

from cellbatch.report.outdir import PICTURE_ARRAYS


@click.command("export-images")
@click.argument("out_dir", metavar="OUT", type=click.Path(path_type=Path))
@click.option("--array", type=click.Choice(PICTURE_ARRAYS), default="generated", show_default=True,
              help="Which picture of each cell: the input crop, the generator's output or the normalised one.")
@click.option("--out", "dest", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to write DIR/<slide>/<cell_id>_<class>.png into.")
@click.option("--slides", "slides", multiple=True, metavar="PATTERN",
              help="Only slides whose name matches (shell pattern, repeatable): --slides 'day1/*'.")
@click.option("--class", "classes", multiple=True, metavar="NAME",
              help="Only cells of this class (the reference's class, else the output's; repeatable).")
def export_images(out_dir: Path, array: str, dest: Path, slides: tuple[str, ...], classes: tuple[str, ...]) -> None:
    """Write one PNG per cell of OUT as DIR/<slide>/<cell_id>_<class>.png (<cell_id>.png without a classifier)."""
    from cellbatch.report.images import export_images as export

    result = export(out_dir, dest, array=array, slides=slides, classes=classes)
    click.echo(f"cellbatch: {result.images} {array} image(s) of {result.slides} slide(s) written to {dest}", err=True)
    for name in result.skipped_slides:
        click.echo(f"cellbatch: warning: slide {name} has no '{array}' array; nothing written for it", err=True)
