"""``cellbatch schema``: print the JSON Schema of a document cellbatch writes, or check one against it."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cellbatch.schemas import NAMES


@click.command("schema")
@click.argument("name", type=click.Choice(NAMES))
@click.option("--validate", "document", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Check this file against the schema instead of printing it (exit 0 valid, 3 not).")
def schema(name: str, document: Path | None) -> None:
    """Print the JSON Schema NAME (run = OUT/run.json, summary = run --json, provenance = each slide's).

    The printed schema stands alone: the schemas it refers to are embedded in it.
    """
    from cellbatch.errors import InputFormatError
    from cellbatch.schemas import bundled, validate

    if document is None:
        click.echo(json.dumps(bundled(name), indent=2))
        return
    try:
        data = json.loads(document.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputFormatError(f"{document} is not readable JSON: {exc}") from exc
    validate(data, name, where=str(document))
    click.echo(f"{document}: valid {name}", err=True)
