"""``OUT/ro-crate-metadata.json``: the run as a Workflow Run RO-Crate (Process Run Crate profile).

Made with the ``rocrate`` package. cellbatch, with its version, is the ``SoftwareApplication``; each
slide is one ``CreateAction`` whose ``instrument`` is cellbatch, ``object`` the slide's input (a
``file://`` URI: inputs stay where they are) and ``result`` the slide's folder in OUT, with its
``actionStatus`` (completed, or failed with the reason as ``error``) and start and end times. ``run.json``
and the crate itself sit at OUT's root. The profile: https://w3id.org/ro/wfrun/process/0.5.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cellbatch import __version__
from cellbatch.read import Slide

CRATE_NAME = "ro-crate-metadata.json"
PROCESS_PROFILE = "https://w3id.org/ro/wfrun/process/0.5"
RO_CRATE_VERSION = "1.1"
_COMPLETED = "http://schema.org/CompletedActionStatus"
_FAILED = "http://schema.org/FailedActionStatus"
_SLIDE_FILES = ("cells.csv", "cells.zarr", "provenance.json", "confusion.csv", "confusion.png")


def run_crate(summary: dict[str, Any], inputs: dict[str, Slide], *, out: Path) -> dict[str, Any]:
    """The crate's JSON-LD for one run: ``summary`` is run.json's content, ``inputs`` each slide's input by name."""
    from rocrate.model.contextentity import ContextEntity
    from rocrate.rocrate import ROCrate

    crate = ROCrate(version=RO_CRATE_VERSION)
    crate.name = f"cellbatch run into {out.name or out}"
    crate.description = ("White-blood-cell captures converted to the DM96 look by cellbatch: one folder per slide "
                         "(cells.csv, cells.zarr, provenance.json); run.json lists every slide and failure.")
    profile = crate.add(ContextEntity(crate, PROCESS_PROFILE, properties={
        "@type": "CreativeWork", "name": "Process Run Crate", "version": "0.5"}))
    crate.root_dataset.append_to("conformsTo", profile)
    tool = crate.add(ContextEntity(crate, "#cellbatch", properties={
        "@type": "SoftwareApplication", "name": "cellbatch", "softwareVersion": summary.get("cellbatch_version",
                                                                                            __version__)}))
    crate.add_file(None, "run.json", properties={
        "name": "run.json", "encodingFormat": "application/json",
        "description": "Every slide of the run with its status and counts, every failure with its reason."})
    for entry in summary["slides"]:
        _add_slide(crate, tool, entry, inputs.get(entry["name"]), summary, out)
    return crate.metadata.generate()


def _add_slide(crate: Any, tool: Any, entry: dict[str, Any], source: Slide | None, summary: dict[str, Any],
               out: Path) -> None:
    name = entry["name"]
    properties: dict[str, Any] = {
        "@type": "CreateAction",
        "name": f"cellbatch on slide {name}: {entry['status']}",
        "actionStatus": {"@id": _FAILED if entry["status"] == "failed" else _COMPLETED},
        "description": entry.get("reason") or f"{entry.get('captures', 0)} captures, {entry.get('cells', 0)} cells",
    }
    if entry["status"] == "failed":
        properties["error"] = entry.get("reason", "")
    times = _slide_times(out / name / "provenance.json") if entry["status"] != "failed" else {}
    properties.update(times or {"endTime": summary.get("finished") or summary.get("started")})
    action = crate.add_action(tool, identifier=f"#slide/{name}", properties=properties)
    if source is not None:
        action["object"] = [crate.add_dataset(_input_uri(source), properties={"name": f"input of slide {name}"})]
    if entry["status"] != "failed" and (out / name).is_dir():
        folder = crate.add_dataset(None, f"{name}/", properties={"name": f"slide {name}"})
        folder["hasPart"] = [_part(crate, out, name, f) for f in _SLIDE_FILES if (out / name / f).exists()]
        action["result"] = [folder]


def _part(crate: Any, out: Path, name: str, file: str) -> Any:
    path = f"{name}/{file}"
    if (out / path).is_dir():
        return crate.add_dataset(None, f"{path}/", properties={"name": file})
    return crate.add_file(None, path, properties={"name": file})


def _slide_times(provenance: Path) -> dict[str, str]:
    import json

    try:
        data = json.loads(provenance.read_text(encoding="utf-8"))
        return {"startTime": data["started"], "endTime": data["finished"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _input_uri(slide: Slide) -> str:
    """A ``file://`` URI for the slide's input: its folder, its Zarr store, or the array inside the store."""
    if slide.kind == "dir":
        return (slide.root / slide.name).resolve().as_uri() + "/"
    uri = Path(slide.store or slide.root).resolve().as_uri() + "/"
    return uri + slide.array_path + "/" if slide.array_path else uri


def write_run_crate(out: Path, summary: dict[str, Any], inputs: Iterable[tuple[Slide, str]]) -> Path:
    """Write ``OUT/ro-crate-metadata.json`` atomically and return its path."""
    from cellbatch.write import write_json_atomic

    path = out / CRATE_NAME
    write_json_atomic(path, run_crate(summary, {name: slide for slide, name in inputs}, out=out))
    return path
