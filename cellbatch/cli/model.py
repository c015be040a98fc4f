"""``cellbatch model``: export, convert, verify and inspect model files (TorchScript and ONNX)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cellbatch.cli.options import Group, device_option, model_formats_option
from cellbatch.crop import CROP_SIZE
from cellbatch.errors import ConfigError


@click.group("model", cls=Group)
def model() -> None:
    """Export, convert, verify and inspect model files (TorchScript .pt and .onnx)."""


@model.command("export")
@click.argument("run", required=False, type=click.Path(path_type=Path))
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="Model file to write (.pt; .onnx beside it)."
)
@model_formats_option(help="Which files to write; each carries cellbatch.json and the self-test.")
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
    "--trace-size", type=click.IntRange(min=128), default=CROP_SIZE, show_default=True, help="Square trace input."
)
def export(
    run: Path | None,
    out: Path,
    state_dict: Path | None,
    untrained: bool,
    base_filters: int | None,
    seed: int | None,
    trace_size: int,
    formats: str,
) -> None:
    """Trace, freeze and write a generator with cellbatch.json metadata, a self-test and MODEL.md.

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
    files = export_generator(generator, out, metadata=metadata, trace_size=trace_size, formats=format_list(formats))
    card = card_beside(files)
    click.echo(
        f"wrote {', '.join(str(p) for p in files.values())} and {card} "
        f"({metadata['parameters']:,} parameters, trained: {str(metadata['trained']).lower()})"
    )


def format_list(formats: str) -> tuple[str, ...]:
    return ("torchscript", "onnx") if formats == "both" else (formats,)


def card_beside(files: dict[str, Path]) -> Path:
    """Measure the written files and write MODEL.md beside them."""
    from cellbatch.modelcard import measure_speed, write_model_card
    from cellbatch.modelfile import read_metadata

    metadata = read_metadata(next(iter(files.values())))
    assert metadata is not None
    return write_model_card(files, metadata, measure_speed(files, metadata["kind"]))


@model.command("convert")
@click.argument("path", type=click.Path(path_type=Path))
@model_formats_option("--to", default="onnx", help="Format(s) to write; torchscript re-saves it with a self-test.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Where to write (suffix set by format) [default: beside PATH; a .pt is never overwritten].",
)
@click.option("--size", type=click.IntRange(min=1), help="Side of the square trace input [default: from the metadata].")
def convert(path: Path, formats: str, out: Path | None, size: int | None) -> None:
    """Convert a TorchScript model file (generator or classifier) to ONNX, or add a self-test to it.

    Writes MODEL.md beside the new files, as export does.

    The self-test of PATH is kept when it has one and PATH passes it here; a file without one gets
    a new self-test from its current outputs (the note in cellbatch.json says so).
    """
    from cellbatch.convert import convert_model

    files = convert_model(path, out=out, formats=format_list(formats), size=size)
    card = card_beside(files)
    click.echo(f"wrote {', '.join(str(p) for p in files.values())} and {card}")


@model.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@device_option
def verify(path: Path, device: str) -> None:
    """Run a model file's self-test on this device (exit 3 when its outputs moved or it has none)."""
    from cellbatch.errors import ModelError
    from cellbatch.generate import resolve_device
    from cellbatch.modelfile import load_model, read_metadata

    device = resolve_device(device)
    stored = read_metadata(path) if path.is_file() else None
    kind = (stored or {}).get("kind", "generator")
    loaded = load_model(path, kind=kind, device=device)
    test = loaded.self_test
    if test["status"] != "passed":
        raise ModelError(f"{path} has no self-test to verify: add one with `cellbatch model convert {path} --to both`")
    click.echo(
        f"{path}: self-test passed on {test['device']} at {test['precision']} with {loaded.runtime['name']}: "
        f"max difference {test['max_abs_diff']:.3g}, {test['elements_beyond_tolerance']} of {test['elements']} "
        f"elements beyond the tolerance (allowed {test['elements_allowed_beyond']})"
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
