"""Model files: TorchScript or ONNX weights + ``cellbatch.json`` + a self-test (contract: docs/model-files.md).

Saving and loading live together so what ``cellbatch model export`` and ``cellbatch classifier train``
write is exactly what ``cellbatch run`` reads. Every load validates the metadata, then runs the file's
self-test on the device in use (:mod:`cellbatch.selftest`) before anything else touches the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellbatch.errors import InputNotFoundError, ModelError, TorchScriptDeprecated
from cellbatch.modelschema import MAX_METADATA_BYTES, parse_metadata
from cellbatch.selftest import MAX_SELFTEST_BYTES, SELFTEST_NAME, run_selftest

METADATA_NAME = "cellbatch.json"
ONNX_SUFFIX = ".onnx"

# What a file without cellbatch.json is taken to be (documented in the README).
DEFAULT_GENERATOR_METADATA: dict[str, Any] = {
    "kind": "generator",
    "input_range": [-1, 1],
    "output_range": [-1, 1],
    "tile_multiple": 128,
}
DEFAULT_CLASSIFIER_METADATA: dict[str, Any] = {"kind": "classifier", "input_range": [0, 1]}

TORCHSCRIPT_NOTE = (
    "torch {version} deprecates TorchScript; cellbatch still loads .pt model files, each checked by its "
    "self-test. `cellbatch model convert FILE --to onnx` writes one that does not need torch (docs/model-files.md)"
)


_noted_torchscript = False


@contextlib.contextmanager
def torchscript_calls() -> Iterator[None]:
    """Around ``torch.jit`` calls: swallow torch's per-call deprecation warnings and say it once, clearly."""
    global _noted_torchscript
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        yield
    for item in caught:
        if issubclass(item.category, DeprecationWarning) and "torch.jit" in str(item.message):
            if not _noted_torchscript:
                import torch

                _noted_torchscript = True
                warnings.warn(TORCHSCRIPT_NOTE.format(version=torch.__version__), TorchScriptDeprecated, stacklevel=3)
        else:
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_format(path: str | Path) -> str:
    """``onnx`` for a ``.onnx`` file, else ``torchscript``."""
    return "onnx" if Path(path).suffix.lower() == ONNX_SUFFIX else "torchscript"


@dataclass
class ModelFile:
    """A loaded model: ``module`` maps a float32 tensor (N, 3, H, W) to the output tensor on the same device.

    For a TorchScript file it is the ``torch.jit.ScriptModule``; for an ONNX file an
    :class:`~cellbatch.onnxfile.OnnxModule` that runs ONNX Runtime behind the same call.
    """

    path: Path
    module: Any
    metadata: dict[str, Any]
    sha256: str
    has_metadata: bool = True
    format: str = "torchscript"
    self_test: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    # Another copy of ``module`` from the same bytes, never run (TorchScript files): what
    # :func:`cellbatch.precision.prepare_module` recasts, since ``module`` has run its self-test.
    fresh_module: Callable[[], Any] | None = field(default=None, repr=False)

    def provenance(self) -> dict[str, Any]:
        return {
            "path": str(Path(self.path).resolve()),
            "sha256": self.sha256,
            "format": self.format,
            "runtime": self.runtime,
            "self_test": self.self_test,
            "metadata": self.metadata,
        }


def encode_metadata(metadata: dict[str, Any], path: str | Path) -> str:
    """``metadata`` as the ``cellbatch.json`` text, checked as loading will check it."""
    text = json.dumps(metadata, indent=2)
    parse_metadata(text.encode(), source=path)  # never write a file that loading would refuse
    return text


def save_model(module: Any, path: str | Path, metadata: dict[str, Any], *, selftest: bytes | None = None) -> Path:
    """Save a TorchScript module with ``cellbatch.json`` (and the self-test data); records torch's version."""
    import torch

    meta = dict(metadata)
    meta.setdefault("torch_version", torch.__version__)
    path = Path(path)
    extra = {METADATA_NAME: encode_metadata(meta, path)}
    if selftest is not None:
        extra[SELFTEST_NAME] = selftest
    path.parent.mkdir(parents=True, exist_ok=True)
    with torchscript_calls():
        torch.jit.save(module, str(path), _extra_files=extra)
    return path


def read_metadata(path: str | Path) -> dict[str, Any] | None:
    """``cellbatch.json`` of a model file without loading the graph (``None`` when absent).

    The document is validated (:mod:`cellbatch.modelschema`) and read with a size bound, so a file
    whose metadata is malformed, or inflates to gigabytes, is refused with one line before torch sees it.
    """
    if model_format(path) == "onnx":
        from cellbatch.onnxfile import read_onnx_properties

        raw = read_onnx_properties(Path(path).read_bytes(), source=path).get(METADATA_NAME)
    else:
        raw = read_extra_file(path, METADATA_NAME, limit=MAX_METADATA_BYTES)
    return None if raw is None else parse_metadata(raw, source=path)


def read_extra_file(path: str | Path, name: str, *, limit: int) -> bytes | None:
    """The bytes of extra file ``name`` of a TorchScript archive, at most ``limit`` (``None`` when absent)."""
    try:
        with zipfile.ZipFile(path) as zf:
            member = next((i for i in zf.infolist() if i.filename.endswith("/extra/" + name)), None)
            if member is None:
                return None
            if member.file_size > limit:
                raise ModelError(
                    f"{path}: {name} inflates to {member.file_size:,} bytes, over the {limit:,}-byte limit: "
                    "this is not a file cellbatch wrote; re-export the model"
                )
            with zf.open(member) as fh:
                raw = fh.read(limit + 1)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelError(f"{path}: {name} cannot be read ({type(exc).__name__}): the file is damaged") from exc
    if len(raw) > limit:
        raise ModelError(f"{path}: {name} is over the {limit:,}-byte limit: re-export the model")
    return raw


def load_model(
    path: str | Path,
    *,
    kind: str,
    device: str = "cpu",
    expected_sha256: str | None = None,
) -> ModelFile:
    """Load a ``generator`` or ``classifier`` file (TorchScript ``.pt`` or ``.onnx``), checking the contract.

    Raises :class:`ModelError` with one line naming the file and the fix: not a model file, bad
    metadata, wrong kind, hash mismatch, saved by a torch this one cannot read (both versions named), or
    a self-test whose outputs moved on ``device``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(
            f"model file {path} does not exist: pass the path of a TorchScript .pt or an .onnx model file"
        )
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if expected_sha256 is not None and digest.lower() != expected_sha256.lower():
        raise ModelError(
            f"model file {path} has sha256 {digest}, not the expected {expected_sha256}: "
            "check that the right file was deployed"
        )
    fmt = model_format(path)
    if fmt == "onnx":
        from cellbatch.onnxfile import load_onnx

        module, stored, selftest, runtime = load_onnx(raw, device=device, source=path)
    else:
        module, stored, selftest, runtime = _load_torchscript(path, raw, device=device)
    defaults = DEFAULT_GENERATOR_METADATA if kind == "generator" else DEFAULT_CLASSIFIER_METADATA
    metadata = {**defaults, **(stored or {})}
    if metadata.get("kind") != kind:
        raise ModelError(f"{path} is a {metadata.get('kind')!r} model, but a {kind} is needed here")
    self_test = run_selftest(module, selftest, metadata, device=device, source=path)
    return ModelFile(
        path=path,
        module=module,
        metadata=metadata,
        sha256=digest,
        has_metadata=stored is not None,
        format=fmt,
        self_test=self_test,
        runtime=runtime,
        fresh_module=None if fmt == "onnx" else lambda: _script_module(raw, device),
    )


def _script_module(raw: bytes, device: str) -> Any:
    import torch

    with torchscript_calls():
        return torch.jit.load(io.BytesIO(raw), map_location=device).eval()


def _load_torchscript(
    path: Path, raw: bytes, *, device: str
) -> tuple[Any, dict[str, Any] | None, bytes | None, dict[str, Any]]:
    """The module in ``raw`` (the bytes read and hashed: what runs is what provenance names), its metadata
    and self-test, and the runtime."""
    import torch

    if not zipfile.is_zipfile(path):
        raise ModelError(
            f"{path} is not a TorchScript archive: export it with `cellbatch model export` "
            "or torch.jit.save (a plain state dict is not enough)"
        )
    stored = read_metadata(path)
    selftest = read_extra_file(path, SELFTEST_NAME, limit=MAX_SELFTEST_BYTES)
    try:
        module = _script_module(raw, device)
    except Exception as exc:  # torch raises RuntimeError, ValueError, ... for unreadable graphs
        saved_by = (stored or {}).get("torch_version", "an unknown torch")
        raise ModelError(
            f"{path} cannot be loaded by torch {torch.__version__} (saved by torch {saved_by}): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; re-export it with this "
            "torch or install the torch that saved it"
        ) from exc
    return module, stored, selftest, {"name": "torch", "version": torch.__version__}
