"""JSON Schemas (draft 2020-12) of the documents cellbatch writes: the contract for workflows.

``run`` is ``OUT/run.json``, ``summary`` what ``cellbatch run --json`` prints, ``provenance`` each
``OUT/<slide>/provenance.json``; ``check`` holds the agreement figures the other three share. Each file
here has an ``urn:cellbatch:schema:NAME`` id; :func:`bundled` embeds the schemas one refers to, so the
result stands alone (``cellbatch schema NAME`` prints it).

Examples
--------
>>> from cellbatch.schemas import validate
>>> validate({"cellbatch_version": "0.1.0"}, "run")  # doctest: +SKIP
Traceback (most recent call last):
cellbatch.errors.InputFormatError: ... is not valid against the cellbatch run schema: 'command' is a required property
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from cellbatch.errors import ConfigError, InputFormatError

NAMES = ("run", "summary", "provenance", "check")
_PREFIX = "urn:cellbatch:schema:"


@cache
def _load(name: str) -> str:
    if name not in NAMES:
        raise ConfigError(f"no schema named {name!r}: choose one of {', '.join(NAMES)}")
    return resources.files(__package__).joinpath(f"{name}.schema.json").read_text(encoding="utf-8")


def load(name: str) -> dict[str, Any]:
    """The schema ``name`` as stored (references to the others by their ``urn:cellbatch:schema:`` id)."""
    return json.loads(_load(name))


def bundled(name: str) -> dict[str, Any]:
    """The schema ``name`` with every cellbatch schema it refers to embedded under ``$defs``.

    Embedded schemas keep their ``$id``, so the references resolve inside the one document (a
    compound schema document, JSON Schema 2020-12 section 9.3); no resolver or network is needed.
    """
    schema = load(name)
    embedded: dict[str, Any] = {}
    todo = _references(schema)
    while todo:
        other = todo.pop()
        if other == name or other in embedded:
            continue
        embedded[other] = load(other)
        todo |= _references(embedded[other])
    if embedded:
        schema.setdefault("$defs", {}).update({f"cellbatch-{k}": v for k, v in sorted(embedded.items())})
    return schema


def validate(document: Any, name: str, *, where: str = "document") -> None:
    """Check ``document`` against schema ``name``; raise one line naming the first problem.

    Raises
    ------
    InputFormatError
        The document does not follow the schema (``where`` names it in the message).
    """
    import jsonschema

    validator = jsonschema.Draft202012Validator(bundled(name), format_checker=jsonschema.FormatChecker())
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is not None:
        at = "/".join(str(p) for p in error.absolute_path) or "(top)"
        raise InputFormatError(f"{where} is not valid against the cellbatch {name} schema at {at}: {error.message}")


def _references(node: Any) -> set[str]:
    """Names of the cellbatch schemas that ``node`` refers to."""
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(_PREFIX):
            found.add(ref[len(_PREFIX):].split("#", 1)[0])
        for value in node.values():
            found |= _references(value)
    elif isinstance(node, list):
        for value in node:
            found |= _references(value)
    return found
