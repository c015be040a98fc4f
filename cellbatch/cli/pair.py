"""``cellbatch pair``: pair and align DM1200 and DM96 captures of the same cells for paired training."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cellbatch.cli.options import Command, cell_diameter_option, detector_option, json_option, quiet_option
from cellbatch.crop import CROP_SIZE


@click.command("pair", cls=Command)
@click.option(
    "--source",
    required=True,
    type=click.Path(path_type=Path),
    help="DM1200 captures: a folder (searched recursively) or a Zarr store.",
)
@click.option(
    "--target",
    required=True,
    type=click.Path(path_type=Path),
    help="DM96 captures of the same slides: a folder or a Zarr store.",
)
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="Output folder: source/, target/, pairs.csv, unmatched.csv, provenance.json.",
)
@cell_diameter_option
@detector_option
@click.option(
    "--min-score",
    type=click.FloatRange(-1, 1),
    default=0.5,
    show_default=True,
    help="Least nucleus template score (normalised correlation) for two cells to pair.",
)
@click.option(
    "--match",
    type=click.Choice(["auto", "name", "template"]),
    default="auto",
    show_default=True,
    help="auto: same relative path (suffix ignored) first, template search for the rest; "
    "name: by path only; template: ignore names.",
)
@click.option(
    "--transform",
    type=click.Choice(["similarity", "affine"]),
    default="similarity",
    show_default=True,
    help="Model fitted by RANSAC: similarity (rotation, scale, shift) or full affine.",
)
@click.option(
    "--min-inliers",
    type=click.IntRange(min=3),
    default=8,
    show_default=True,
    help="Least RANSAC inliers for an alignment to count.",
)
@click.option(
    "--pad",
    type=click.Choice(["reflect", "background"]),
    default="background",
    show_default=True,
    help="How both crops are padded past the capture border.",
)
@click.option(
    "--crop-size",
    type=click.IntRange(min=16),
    default=CROP_SIZE,
    show_default=True,
    metavar="PX",
    help="Side of the written crops.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@quiet_option
@json_option
def pair(
    source: Path,
    target: Path,
    out: Path,
    cell_diameter: float,
    detector: str,
    min_score: float,
    match: str,
    transform: str,
    min_inliers: int,
    pad: str,
    crop_size: int,
    overwrite: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Pair DM1200 (--source) and DM96 (--target) cells and write aligned crops to OUT.

    Each source cell is matched to a target cell by the shape of its thresholded nucleus (captures
    with the same relative path are matched with each other first), then the target is warped onto
    the source by SIFT keypoints and a RANSAC fit, so the two crops agree pixel to pixel. Cells left
    unpaired are listed with the reason in OUT/unmatched.csv.
    """
    from cellbatch.cli import command_line
    from cellbatch.registry import make_detector
    from cellbatch.train.pair import PairSettings, capture_sources, check_output, iter_pairs, write_pairs

    settings = PairSettings(
        cell_diameter=cell_diameter,
        min_score=min_score,
        match=match,  # type: ignore[arg-type]
        transform=transform,
        min_inliers=min_inliers,
        pad=pad,  # type: ignore[arg-type]
        crop_size=crop_size,
    )
    check_output(out, overwrite=overwrite)
    detect = make_detector(detector, cell_diameter=cell_diameter)
    sources, targets = capture_sources(source), capture_sources(target)
    parameters = {
        "source": str(source),
        "target": str(target),
        "detector": detector,
        **{k: getattr(settings, k) for k in settings.__dataclass_fields__},
    }
    counts = write_pairs(
        iter_pairs(sources, targets, detector=detect, settings=settings, progress=not quiet),
        out,
        overwrite=overwrite,
        parameters=parameters,
        command=command_line(),
    )
    summary = {"out": str(out), "source_captures": len(sources), "target_captures": len(targets), **counts}
    if as_json:
        click.echo(json.dumps(summary))
    elif not quiet:
        click.echo(
            f"{counts['pairs']} pairs written to {out}; unmatched: {counts['unmatched_source']} source, "
            f"{counts['unmatched_target']} target cells (see unmatched.csv)",
            err=True,
        )
