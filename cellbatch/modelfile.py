"""TorchScript model files with embedded ``cellbatch.json`` metadata (contract: DESIGN.md, README).

Saving and loading live together so the metadata written by ``cellbatch model export`` and
``cellbatch classifier train`` is exactly what ``cellbatch run`` reads.
"""

from __future__ import annotations

import hashlib
import json
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellbatch.errors import InputNotFoundError, ModelError
from cellbatch.modelschema import MAX_METADATA_BYTES, parse_metadata

METADATA_NAME = "cellbatch.json"

# What a file without cellbatch.json is taken to be (documented in the README).
DEFAULT_GENERATOR_METADATA: dict[str, Any] = {
    "kind": "generator",
    "input_range": [-1, 1],
    "output_range": [-1, 1],
    "tile_multiple": 128,
}
DEFAULT_CLASSIFIER_METADATA: dict[str, Any] = {"kind": "classifier", "input_range": [0, 1]}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ModelFile:
    """A loaded TorchScript module with its metadata and identity."""

    path: Path
    module: Any  # torch.jit.ScriptModule
    metadata: dict[str, Any]
    sha256: str
    has_metadata: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def provenance(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "metadata": self.metadata}


def save_model(module: Any, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Save a TorchScript module with ``cellbatch.json``; records the saving torch's version."""
    import torch

    meta = dict(metadata)
    meta.setdefault("torch_version", torch.__version__)
    path = Path(path)
    text = json.dumps(meta, indent=2)
    parse_metadata(text.encode(), source=path)  # never write a file that loading would refuse
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is the contract (DESIGN.md)
        torch.jit.save(module, str(path), _extra_files={METADATA_NAME: text})
    return path


def read_metadata(path: str | Path) -> dict[str, Any] | None:
    """``cellbatch.json`` of a model file without loading the graph (``None`` when absent).

    The document is validated (:mod:`cellbatch.modelschema`) and read with a size bound, so a file
    whose metadata is malformed, or inflates to gigabytes, is refused with one line before torch sees it.
    """
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
    """Load a ``generator`` or ``classifier`` file, checking the contract.

    Raises :class:`ModelError` with one line naming the file and the fix: not a TorchScript archive,
    wrong kind, hash mismatch, or saved by a torch this one cannot read (both versions named).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"model file {path} does not exist: pass the path of a TorchScript .pt file")
    digest = sha256_file(path)
    if expected_sha256 is not None and digest.lower() != expected_sha256.lower():
        raise ModelError(
            f"model file {path} has sha256 {digest}, not the expected {expected_sha256}: "
            "check that the right file was deployed"
        )
    if not zipfile.is_zipfile(path):
        raise ModelError(
            f"{path} is not a TorchScript archive: export it with `cellbatch model export` "
            "or torch.jit.save (a plain state dict is not enough)"
        )
    stored = read_metadata(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # torch raises RuntimeError, ValueError, ... for unreadable graphs
        saved_by = (stored or {}).get("torch_version", "an unknown torch")
        raise ModelError(
            f"{path} cannot be loaded by torch {torch.__version__} (saved by torch {saved_by}): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; re-export it with this "
            "torch or install the torch that saved it"
        ) from exc
    module.eval()
    defaults = DEFAULT_GENERATOR_METADATA if kind == "generator" else DEFAULT_CLASSIFIER_METADATA
    metadata = {**defaults, **(stored or {})}
    if metadata.get("kind") != kind:
        raise ModelError(f"{path} is a {metadata.get('kind')!r} model, but a {kind} is needed here")
    return ModelFile(path=path, module=module, metadata=metadata, sha256=digest, has_metadata=stored is not None)
