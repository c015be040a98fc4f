"""Export a generator as model files: TorchScript and/or ONNX, each with a self-test (docs/model-files.md).

The module is traced and frozen in eval mode rather than scripted: a traced graph holds only plain
aten operators (a scripted ``F.interpolate`` drags in Python-level control flow that older torch
releases cannot load), and freezing folds batch norm into the convolutions and inlines the weights.
Because every upsampling is by scale factor, the traced graph is shape-generic; :func:`export_generator`
checks that on sizes other than the trace size before writing anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from cellbatch.crop import CROP_SIZE
from cellbatch.errors import InputNotFoundError, ModelError
from cellbatch.modelfile import ONNX_SUFFIX, load_model, save_model, torchscript_calls
from cellbatch.models.generator import TILE_MULTIPLE, UNetGenerator, count_parameters
from cellbatch.train.checkpoint import (
    SETTINGS_NAME,
    VALIDATION_NAME,
    latest_checkpoint,
    load_checkpoint,
    read_json,
)

TRACE_SIZE = CROP_SIZE
CHECK_SIZES = (128, 384)
# Freezing folds batch norm into the convolutions, which reorders float32 sums; anything past this
# is a wrong graph, not rounding.
CHECK_ATOL = 1e-3


def trace_generator(generator: torch.nn.Module, *, size: int = TRACE_SIZE) -> torch.jit.ScriptModule:
    """Trace ``generator`` on a (1, 3, size, size) input in eval mode and freeze the result.

    A :class:`UNetGenerator` is traced in its inference form (decoders as precomputed phase
    convolutions, :meth:`UNetGenerator.for_inference`): the same function, 2.7x faster to run.
    """
    generator = generator.eval().cpu()
    if isinstance(generator, UNetGenerator):
        generator = generator.for_inference()
    example = torch.zeros(1, 3, size, size)
    with torch.no_grad(), torchscript_calls():
        traced = torch.jit.trace(generator, example, check_trace=False)
        return torch.jit.freeze(traced.eval())


def check_traced(
    traced: torch.jit.ScriptModule,
    generator: torch.nn.Module,
    *,
    sizes: Sequence[int] = CHECK_SIZES,
    seed: int = 0,
) -> float:
    """Largest difference between traced and eager outputs over square inputs of ``sizes``.

    Raises :class:`ModelError` when the traced graph gives a wrong shape or values at any size.
    """
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    generator = generator.eval().cpu()
    for size in sizes:
        x = torch.rand(2, 3, size, size, generator=gen) * 2 - 1
        with torch.no_grad():
            want = generator(x)
            got = traced(x)
        if got.shape != want.shape:
            raise ModelError(f"traced generator gives shape {tuple(got.shape)} for a {size}x{size} input")
        diff = float((got - want).abs().max())
        if not diff <= CHECK_ATOL:
            raise ModelError(f"traced generator differs from the network by {diff:.3g} at {size}x{size}")
        worst = max(worst, diff)
    return worst


def generator_metadata(
    generator: UNetGenerator,
    *,
    trained: bool,
    setup: str | None = None,
    steps: int | None = None,
    data_sha256: str | None = None,
    validation: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The ``cellbatch.json`` of a generator file."""
    return {
        "kind": "generator",
        "input_range": [-1, 1],
        "output_range": [-1, 1],
        "tile_multiple": TILE_MULTIPLE,
        "architecture": generator.architecture,
        "base_filters": generator.base_filters,
        "parameters": count_parameters(generator),
        "trained": trained,
        "setup": setup,
        "steps": steps,
        "data_sha256": data_sha256,
        "validation": dict(validation) if validation is not None else None,
        "torch_version": torch.__version__,
        **extra,
    }


FORMATS = ("torchscript", "onnx")


def export_generator(
    generator: UNetGenerator,
    path: str | Path,
    *,
    metadata: Mapping[str, Any],
    trace_size: int = TRACE_SIZE,
    check_sizes: Sequence[int] = CHECK_SIZES,
    formats: Sequence[str] = ("torchscript",),
) -> dict[str, Path]:
    """Trace, freeze, check at other sizes and write ``generator`` with ``metadata`` in ``formats``.

    Returns the written files by format (``path`` with suffix ``.pt`` and ``.onnx``).

    Examples
    --------
    >>> g = untrained_generator(base_filters=4, seed=0)
    >>> export_generator(g, "g.pt", metadata=generator_metadata(g, trained=False))  # doctest: +SKIP
    {'torchscript': PosixPath('g.pt')}
    """
    traced = trace_generator(generator, size=trace_size)
    worst = check_traced(traced, generator, sizes=check_sizes)
    trace = {"size": trace_size, "checked_sizes": list(check_sizes), "max_abs_diff": worst}
    meta = {**metadata, "trace": trace}
    return write_model_files(traced, path, metadata=meta, formats=formats, example_size=trace_size)


def write_model_files(
    module: Any,
    path: str | Path,
    *,
    metadata: Mapping[str, Any],
    formats: Sequence[str],
    example_size: int,
    selftest: tuple[bytes, dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write a traced TorchScript ``module`` as each of ``formats``, all carrying one self-test.

    The self-test is the module's own fp32 CPU output on the fixed crops (or ``selftest``, kept from an
    older file by ``convert``); each file written is loaded back and must pass it, so an ONNX file that
    disagrees with the TorchScript graph beyond the tolerance is never left behind.
    """
    from cellbatch.selftest import make_selftest

    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ModelError(f"unknown model format {unknown}: choose from {', '.join(FORMATS)}")
    raw, entry = selftest if selftest is not None else make_selftest(module, metadata)
    meta = {**metadata, "self_test": entry}
    path = Path(path)
    written: dict[str, Path] = {}
    if "torchscript" in formats:
        written["torchscript"] = save_model(module, path.with_suffix(".pt"), meta, selftest=raw)
    if "onnx" in formats:
        from cellbatch.onnxfile import export_onnx

        written["onnx"] = export_onnx(
            module, path.with_suffix(ONNX_SUFFIX), metadata=meta, selftest=raw, example_size=example_size
        )
    for written_path in written.values():
        try:
            load_model(written_path, kind=meta["kind"])
        except ModelError:
            written_path.unlink()
            raise
    return written


def untrained_generator(*, base_filters: int, seed: int) -> UNetGenerator:
    """A freshly initialised generator, reproducible from ``seed`` (for tests and pipeline checks)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNetGenerator(base_filters=base_filters).eval()


def generator_from_state_dict(path: str | Path, *, base_filters: int | None = None) -> UNetGenerator:
    """A generator from a ``torch.save(generator.state_dict())`` file; the width is read from it."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise InputNotFoundError(f"state dict {path} does not exist") from exc
    except Exception as exc:  # torch.load raises many types for foreign files
        raise ModelError(
            f"{path} is not a torch state dict ({type(exc).__name__}): save generator.state_dict()"
        ) from exc
    first = state.get("encoders.0.conv.weight") if isinstance(state, dict) else None
    if first is None:
        raise ModelError(f"{path} is not a cellbatch U-Net generator state dict (no encoders.0.conv.weight)")
    width = int(first.shape[0])
    if base_filters is not None and base_filters != width:
        raise ModelError(
            f"{path} holds a generator with base_filters {width}, not {base_filters}: drop --base-filters"
        )
    generator = UNetGenerator(base_filters=width)
    try:
        generator.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{path} does not fit the U-Net generator: {str(exc).splitlines()[0]}") from exc
    return generator.eval()


def generator_from_run(run: str | Path) -> tuple[UNetGenerator, dict[str, Any]]:
    """The source->target generator G of a training run's newest checkpoint, with its metadata."""
    run = Path(run)
    path = latest_checkpoint(run)
    state = load_checkpoint(path)
    settings = read_json(run / SETTINGS_NAME) or state.get("settings", {})
    residual = settings.get("predict", "image") == "residual"
    generator = UNetGenerator(base_filters=int(settings["base_filters"]), residual=residual)
    # A run that kept a moving average of G validated and exports the average.
    generator.load_state_dict(state["average"]["G"] if "average" in state else state["models"]["G"])
    # The held-out names stay in the run folder; the file records the figures and how many pairs.
    validation = {k: v for k, v in (read_json(run / VALIDATION_NAME) or {}).items() if k != "val_names"}
    meta = generator_metadata(
        generator,
        trained=True,
        setup=settings.get("setup"),
        steps=int(state["step"]),
        data_sha256=settings.get("data_sha256"),
        validation=validation,
        training=settings,
    )
    return generator.eval(), meta
