"""The JSON Schemas in cellbatch/schemas hold for real outputs, and catch documents that drift from them."""

from __future__ import annotations

import copy
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zarr

from cellbatch.errors import InputFormatError
from cellbatch.schemas import NAMES, bundled, validate
from cellbatch.synth import write_synth
from tests.models import Identity, save_generator
from tests.test_check_agreement import save_classifier

RealRun = tuple[Path, dict, list[str]]


def _cellbatch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellbatch", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> RealRun:
    """A run with every optional part: generator, normaliser, classifier, a bad capture, a failed slide.

    Returns OUT, the ``--json`` summary it printed and its options after ``-o OUT``.
    """
    tmp = tmp_path_factory.mktemp("schema-run")
    src = tmp / "src"
    synth = write_synth(tmp / "synth", count=3, seed=3, looks=("dm1200",))
    shutil.copytree(synth / "dm1200", src / "slide-a")
    (src / "slide-b").mkdir()
    shutil.copy(synth / "dm1200" / "capture_00000.png", src / "slide-b" / "good.png")
    (src / "slide-b" / "broken.png").write_bytes(b"not a png at all")
    zarr.create_array(str(src / "wrong.zarr"), shape=(2, 64, 64, 3), dtype="float32", fill_value=0)
    model = save_generator(Identity(), tmp / "identity.pt")
    classifier = save_classifier(tmp / "clf.pt")
    out = tmp / "out"
    options = ["--model", str(model), "--normalise", "display", "--classifier", str(classifier),
               "--min-agreement", "0", "--quiet", "--json"]
    done = _cellbatch("run", str(src), "-o", str(out), *options)
    assert done.returncode == 4, done.stderr  # the broken capture and the float Zarr slide
    return out, json.loads(done.stdout), options


def test_printed_schemas_are_valid_and_stand_alone() -> None:
    import jsonschema

    for name in NAMES:
        schema = bundled(name)
        jsonschema.Draft202012Validator.check_schema(schema)
        printed = _cellbatch("schema", name)
        assert printed.returncode == 0, printed.stderr
        assert json.loads(printed.stdout) == schema


def test_run_json_and_json_output_follow_their_schemas(real_run: RealRun) -> None:
    out, summary, _ = real_run
    validate(summary, "summary", where="--json output")
    run = json.loads((out / "run.json").read_text())
    validate(run, "run", where="run.json")
    statuses = {s["name"]: s["status"] for s in run["slides"]}
    assert statuses == {"slide-a": "done", "slide-b": "done", "wrong.zarr": "failed"}
    assert run["check"] is not None and all(s["check"] for s in run["slides"] if s["status"] == "done")


def test_every_provenance_follows_its_schema_and_counts_the_written_cells(real_run: RealRun) -> None:
    out, _, _ = real_run
    for slide in ("slide-a", "slide-b"):
        provenance = json.loads((out / slide / "provenance.json").read_text())
        validate(provenance, "provenance", where=f"{slide}/provenance.json")
        with open(out / slide / "cells.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert provenance["cells"] == len(rows) == sum(i["cells"] or 0 for i in provenance["inputs"]) > 0
    assert json.loads((out / "slide-b" / "provenance.json").read_text())["failures"][0]["path"] == "slide-b/broken.png"


def test_cli_validate_accepts_real_output_and_refuses_a_drifted_one(real_run: RealRun, tmp_path: Path) -> None:
    out, _, _ = real_run
    assert _cellbatch("schema", "run", "--validate", str(out / "run.json")).returncode == 0
    drifted = json.loads((out / "run.json").read_text())
    drifted["slides"][0]["status"] = "half-done"
    (tmp_path / "run.json").write_text(json.dumps(drifted))
    refused = _cellbatch("schema", "run", "--validate", str(tmp_path / "run.json"))
    assert refused.returncode == 3
    assert "slides/0/status" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.parametrize("change", ["new top-level field", "check of the wrong shape", "bad input hash"])
def test_schemas_catch_drift(real_run: RealRun, change: str) -> None:
    out, _, _ = real_run
    run = json.loads((out / "run.json").read_text())
    provenance = json.loads((out / "slide-a" / "provenance.json").read_text())
    if change == "new top-level field":
        document, name = copy.deepcopy(run), "run"
        document["undocumented"] = 1
    elif change == "check of the wrong shape":  # through the reference into the check schema
        document, name = copy.deepcopy(provenance), "provenance"
        document["check"]["agreement"] = 1.5
    else:
        document, name = copy.deepcopy(provenance), "provenance"
        document["inputs"][0]["sha256"] = "xyz"
    with pytest.raises(InputFormatError, match=f"cellbatch {name} schema"):
        validate(document, name)


def test_rerun_that_skips_everything_still_follows_the_schema(real_run: RealRun, tmp_path: Path) -> None:
    out, _, options = real_run
    again = tmp_path / "out"
    shutil.copytree(out, again)
    rerun = _cellbatch("run", str(out.parent / "src"), "-o", str(again), *options)
    summary = json.loads(rerun.stdout)
    validate(summary, "summary")
    validate(json.loads((again / "run.json").read_text()), "run")
    assert sorted(s["status"] for s in summary["slides"]) == ["failed", "skipped", "skipped"]
