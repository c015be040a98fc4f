"""``cellbatch normalise``: fit colour-normalisation profiles for ``--normalise NAME:PROFILE.json``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cellbatch.cli.options import (
    Group,
    cell_diameter_option,
    detector_option,
    json_option,
    threads_option,
    use_threads,
)


@click.group("normalise", cls=Group)
def normalise() -> None:
    """Fit colour-normalisation profiles (HM, global, Reinhard, Macenko).

    See docs/normalisation.md for the methods, the profile format and the measured accuracy.
    """


@normalise.command("fit")
@click.option(
    "--source",
    type=click.Path(path_type=Path),
    help="Captures in the look to convert from (DM1200): a folder or Zarr store. Needed by hm and global.",
)
@click.option(
    "--target",
    type=click.Path(path_type=Path),
    required=True,
    help="Captures in the look to convert to (DM96): a folder or Zarr store; need not be paired.",
)
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Profile JSON to write.")
@click.option(
    "--method",
    type=click.Choice(["hm", "global", "reinhard", "macenko"]),
    default="hm",
    show_default=True,
    help="Normaliser the profile is for (use it as --normalise METHOD:OUT).",
)
@cell_diameter_option
@detector_option
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="Use at most N captures of each set.")
@threads_option
@click.option("--source-model", type=click.Path(path_type=Path), metavar="MODEL.pt",
              help="The --source captures are this generator's output: the profile then corrects that model "
              "and `run` applies it after that model only (without it: fitted on raw captures, applied "
              "without --model).")
@json_option
def fit(
    source: Path | None,
    target: Path,
    out: Path,
    method: str,
    cell_diameter: float,
    detector: str,
    limit: int | None,
    threads: int | None,
    source_model: Path | None,
    as_json: bool,
) -> None:
    """Fit a profile from --source and --target captures; write it to --out.

    hm segments every capture with --detector (background, red cells, cytoplasm, nucleus) and fits
    one Gaussian per class on each side; global fits one Gaussian per side; reinhard and macenko
    need only --target.

    \b
    Example:
      cellbatch normalise fit --source dm1200/ --target dm96/ --out hm.json
      cellbatch run captures/ --normalise hm:hm.json --normalise display
    """
    use_threads(threads, command="fit")
    from cellbatch.modelfile import sha256_file
    from cellbatch.normalise.fit import fit_profile_files

    path, record = fit_profile_files(
        out,
        method=method,
        source=source,
        target=target,
        detector=detector,
        cell_diameter=cell_diameter,
        limit=limit,
        source_model=source_model,
    )
    summary = {"profile": str(path), "sha256": sha256_file(path), **record}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    images = f"{record['target_images']} target"
    if record["source"] is not None:
        images = f"{record['source_images']} source and {images}"
    click.echo(f"wrote {path} ({method} profile from {images} captures); use --normalise {method}:{path}")
