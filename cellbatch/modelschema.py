"""The schema of a model file's ``cellbatch.json``, with size limits (contract: docs/model-files.md).

A model file comes from outside (a colleague, a vendor, a download), so its metadata is checked before
anything uses it: the document as a whole is bounded in bytes and nesting, the fields cellbatch acts
on are typed and bounded, and ranges must be non-empty. Anything else a file records (training
settings, validation figures) is kept as it is, within the size limit, because provenance copies it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cellbatch.errors import ModelError

# Generator metadata with full training settings and validation figures is about 2 KB; a classifier's
# with per-class accuracy and history a few KB. 256 KiB leaves room and keeps provenance small.
MAX_METADATA_BYTES = 256 * 1024
# The generator halves seven times (128); a tile multiple past the 256-pixel crop only pads.
MAX_TILE_MULTIPLE = 256
MAX_CLASSES = 1000
# Range ends are pixel scales such as [-1, 1], [0, 1] or [0, 255].
MAX_RANGE_MAGNITUDE = 1e6

_RANGE = {
    "type": "array",
    "items": {"type": "number", "minimum": -MAX_RANGE_MAGNITUDE, "maximum": MAX_RANGE_MAGNITUDE},
    "minItems": 2,
    "maxItems": 2,
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "cellbatch.json",
    "type": "object",
    "properties": {
        "kind": {"enum": ["generator", "classifier"]},
        "input_range": _RANGE,
        "output_range": _RANGE,
        "tile_multiple": {"type": "integer", "minimum": 1, "maximum": MAX_TILE_MULTIPLE},
        "classes": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 200},
            "minItems": 1,
            "maxItems": MAX_CLASSES,
            "uniqueItems": True,
        },
        "torch_version": {"type": "string", "maxLength": 100},
        "onnx_opset": {"type": "integer", "minimum": 7, "maximum": 100},
        "self_test": {
            "type": "object",
            "required": ["sha256", "tolerance"],
            "properties": {
                "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "tolerance": {
                    "type": "object",
                    "required": ["absolute", "relative", "mismatched_per_million"],
                    "properties": {
                        name: {"type": "number", "minimum": 0, "maximum": MAX_RANGE_MAGNITUDE}
                        for name in ("absolute", "relative", "mismatched_per_million")
                    },
                    "additionalProperties": False,
                },
            },
        },
        "trained": {"type": "boolean"},
    },
}


def parse_metadata(raw: bytes, *, source: str | Path) -> dict[str, Any]:
    """Decode and validate the bytes of a ``cellbatch.json`` (at most :data:`MAX_METADATA_BYTES`).

    Raises :class:`ModelError` with one line naming the file, the offending field and the fix.

    Examples
    --------
    >>> parse_metadata(b'{"kind": "generator", "tile_multiple": 128}', source="g.pt")["tile_multiple"]
    128
    """
    if len(raw) > MAX_METADATA_BYTES:
        raise ModelError(
            f"{source}: cellbatch.json is {len(raw):,} bytes, over the {MAX_METADATA_BYTES:,}-byte limit: "
            "re-export the model with `cellbatch model export`"
        )
    try:
        document = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelError(
            f"{source}: cellbatch.json is not valid JSON ({_first_line(exc)}): re-export the model"
        ) from exc
    except RecursionError as exc:
        raise ModelError(f"{source}: cellbatch.json is nested too deeply: re-export the model") from exc
    validate_metadata(document, source=source)
    return document


def validate_metadata(document: Any, *, source: str | Path) -> None:
    """Check a decoded ``cellbatch.json`` against :data:`SCHEMA` and the rules a schema cannot say."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(SCHEMA)
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "the document"
        raise ModelError(f"{source}: cellbatch.json {where}: {_shorten(error.message)}; re-export the model")
    for name in ("input_range", "output_range"):
        if name in document:
            lo, hi = document[name]
            if not lo < hi:
                raise ModelError(
                    f"{source}: cellbatch.json {name} {[lo, hi]} is empty: it needs low < high, e.g. [-1, 1]"
                )


def _reject_constant(name: str) -> float:
    # json accepts NaN and Infinity, which no range or figure may hold.
    raise ValueError(f"{name} is not a number JSON allows")


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _shorten(message: str, limit: int = 120) -> str:
    # jsonschema quotes the offending value, which may be huge.
    message = message.splitlines()[0]
    return message if len(message) <= limit else message[: limit - 3] + "..."
