"""``cellbatch model``: export a generator as a TorchScript model file, and show a file's metadata."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cellbatch.errors import ConfigError


@click.group("model")
def model() -> None:
    """Export and inspect TorchScript model files."""


@model.command("export")
@click.argument("run", required=False, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Model file to write (.pt).")
@click.option(
    "--state-dict", type=click.Path(path_type=Path), help="Export a generator state dict instead of a RUN."
)
@click.option(
    "--untrained", is_flag=True, help="Export a freshly initialised generator (metadata trained: false)."
)
@click.option(
    "--base-filters",
    type=click.IntRange(min=1),
    help="Generator width (with --untrained; checked with --state-dict).",
)
@click.option("--seed", type=int, help="Initialisation seed (with --untrained).")
@click.option(
    "--trace-size", type=click.IntRange(min=128), default=256, show_default=True, help="Square trace input."
)
def export(
    run: Path | None,
    out: Path,
    state_dict: Path | None,
    untrained: bool,
    base_filters: int | None,
    seed: int | None,
    trace_size: int,
) -> None:
    """Trace, freeze and write a generator with cellbatch.json metadata.

    RUN is a `cellbatch train --out` folder (its source->target generator G is exported). Exactly one
    source: RUN, --state-dict FILE, or --untrained --base-filters N --seed S.
    """
    from cellbatch.export import (
        export_generator,
        generator_from_run,
        generator_from_state_dict,
        generator_metadata,
        untrained_generator,
    )
    from cellbatch.models.generator import TILE_MULTIPLE

    sources = [
        name
        for name, given in (("RUN", run), ("--state-dict", state_dict), ("--untrained", untrained))
        if given
    ]
    if len(sources) != 1:
        raise ConfigError(
            "pass exactly one of RUN, --state-dict FILE or --untrained "
            f"({'none' if not sources else ' and '.join(sources)} given)"
        )
    if trace_size % TILE_MULTIPLE:
        raise ConfigError(f"--trace-size {trace_size} is not a multiple of {TILE_MULTIPLE}")
    if untrained:
        if base_filters is None or seed is None:
            raise ConfigError(
                "--untrained needs --base-filters N and --seed S, so the file can be made again"
            )
        generator = untrained_generator(base_filters=base_filters, seed=seed)
        metadata = generator_metadata(generator, trained=False, seed=seed)
    elif state_dict is not None:
        if seed is not None:
            raise ConfigError("--seed applies to --untrained only")
        generator = generator_from_state_dict(state_dict, base_filters=base_filters)
        metadata = generator_metadata(generator, trained=True, source=str(state_dict))
    else:
        if base_filters is not None or seed is not None:
            raise ConfigError("--base-filters and --seed do not apply to a RUN: its settings give the width")
        assert run is not None
        generator, metadata = generator_from_run(run)
    path = export_generator(generator, out, metadata=metadata, trace_size=trace_size)
    click.echo(
        f"wrote {path} ({metadata['parameters']:,} parameters, trained: {str(metadata['trained']).lower()})"
    )


@model.command("info")
@click.argument("path", type=click.Path(path_type=Path))
def info(path: Path) -> None:
    """Print a model file's cellbatch.json metadata and sha256 as JSON (the graph is not loaded)."""
    from cellbatch.errors import InputNotFoundError, ModelError
    from cellbatch.modelfile import read_metadata, sha256_file

    if not path.is_file():
        raise InputNotFoundError(f"model file {path} does not exist")
    metadata = read_metadata(path)
    if metadata is None:
        raise ModelError(f"{path} has no cellbatch.json: it loads with the documented defaults only")
    click.echo(json.dumps({"path": str(path), "sha256": sha256_file(path), "metadata": metadata}, indent=2))
