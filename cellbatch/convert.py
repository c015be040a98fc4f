"""``cellbatch model convert``: an existing TorchScript model file to ONNX, or re-saved with a self-test.

Conversion starts from the file, not from a network: what was validated is the file, so the ONNX graph
is exported from the loaded TorchScript graph and must pass the same self-test. A file that already
has a self-test must pass it here before anything is written; a file without one gets a new test made
from its present outputs, and the test's ``made_with`` says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cellbatch.errors import ConfigError, ModelError
from cellbatch.export import TRACE_SIZE, write_model_files
from cellbatch.modelfile import load_model, model_format, read_extra_file, read_metadata
from cellbatch.selftest import MAX_SELFTEST_BYTES, SELFTEST_NAME, make_selftest


def convert_model(
    path: str | Path, *, out: str | Path | None = None, formats: Sequence[str] = ("onnx",), size: int | None = None
) -> dict[str, Path]:
    """Write the TorchScript file ``path`` as ``formats`` at ``out`` (default: beside ``path``).

    Returns the files written by format. Raises :class:`ConfigError` when a written file would replace
    ``path`` itself.
    """
    import torch

    path = Path(path)
    if model_format(path) != "torchscript":
        raise ConfigError(f"{path} is not a TorchScript file: convert starts from a .pt model file")
    stored = read_metadata(path) if path.is_file() else None
    kind = (stored or {}).get("kind", "generator")
    loaded = load_model(path, kind=kind)  # runs the file's own self-test, when it has one
    target = Path(out) if out is not None else path
    if "torchscript" in formats and target.with_suffix(".pt").resolve() == path.resolve():
        raise ConfigError(f"converting {path} to torchscript would replace it: pass --out NEW.pt")
    metadata = {
        **loaded.metadata,
        "torch_version": torch.__version__,
        "converted_from": {
            "file": path.name,
            "sha256": loaded.sha256,
            "torch_version": loaded.metadata.get("torch_version"),
        },
    }
    if loaded.self_test["status"] == "passed":
        raw = read_extra_file(path, SELFTEST_NAME, limit=MAX_SELFTEST_BYTES)
        assert raw is not None
        selftest = (raw, dict(metadata["self_test"]))
    else:
        raw, entry = make_selftest(loaded.module, metadata)
        entry["made_with"] += f", at conversion of {path.name} (which had no self-test)"
        selftest = (raw, entry)
    if size is None:
        size = 256 if kind == "classifier" else int((metadata.get("trace") or {}).get("size", TRACE_SIZE))
    if kind == "generator" and size % int(metadata.get("tile_multiple", 1)):
        raise ModelError(f"--size {size} is not a multiple of the file's tile_multiple {metadata['tile_multiple']}")
    return write_model_files(
        loaded.module, target, metadata=metadata, formats=formats, example_size=size, selftest=selftest
    )
