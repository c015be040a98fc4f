"""OUT/ro-crate-metadata.json (cellbatch.crate): a Process Run Crate that the rocrate package reads back."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import zarr
from rocrate.rocrate import ROCrate

from cellbatch import __version__
from cellbatch.api import convert
from cellbatch.crate import PROCESS_PROFILE
from cellbatch.synth import write_synth


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """slide-a (two synthetic captures) and wrong.zarr (float32, fails as a slide)."""
    folder = tmp_path_factory.mktemp("crate-src")
    synth = write_synth(folder / "synth", count=2, seed=2, looks=("dm1200",))
    shutil.copytree(synth / "dm1200", folder / "in" / "slide-a")
    zarr.create_array(str(folder / "in" / "wrong.zarr"), shape=(1, 64, 64, 3), dtype="float32", fill_value=0)
    return folder / "in"


def _id(value: object) -> str:
    """The @id of a reference as rocrate returns it: an entity, a {"@id": ...} dict or the bare id."""
    if isinstance(value, dict):
        return value["@id"]
    return getattr(value, "id", value)


def _actions(crate: ROCrate) -> dict[str, object]:
    return {a.id: a for a in crate.get_by_type("CreateAction")}


def test_run_writes_a_process_run_crate_that_rocrate_reads(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert([src], out, device="cpu", workers=1)
    crate = ROCrate(out)  # reading it back validates the JSON-LD structure the package expects

    profiles = [_id(p) for p in crate.root_dataset["conformsTo"]]
    assert PROCESS_PROFILE in profiles
    tool = crate.dereference("#cellbatch")
    assert tool.type == "SoftwareApplication" and tool["softwareVersion"] == __version__

    actions = _actions(crate)
    assert set(actions) == {"#slide/slide-a", "#slide/wrong.zarr"}
    done, failed = actions["#slide/slide-a"], actions["#slide/wrong.zarr"]
    for action in (done, failed):
        assert action["instrument"].id == "#cellbatch"
        assert action["object"][0].id.startswith("file://")
    assert _id(done["actionStatus"]) == "http://schema.org/CompletedActionStatus"
    assert _id(failed["actionStatus"]) == "http://schema.org/FailedActionStatus"
    assert "float32" in failed["error"] and "result" not in failed.properties()
    assert done["startTime"] and done["endTime"]
    assert done["object"][0].id == (src / "slide-a").resolve().as_uri() + "/"

    (result,) = done["result"]
    assert result.id == "slide-a/"
    parts = {p.id for p in result["hasPart"]}
    assert {"slide-a/cells.csv", "slide-a/cells.zarr/", "slide-a/provenance.json"} <= parts
    local = [e for e in crate.data_entities if not e.id.startswith("file://")]
    assert local and all((out / e.id).exists() for e in local), "every local data entity is in OUT"
    assert crate.dereference("run.json") is not None


def test_rerun_keeps_skipped_slides_as_completed_actions(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert([src], out, device="cpu", workers=1)
    report = convert([src], out, device="cpu", workers=1)
    assert [s.status for s in report.slides if s.name == "slide-a"] == ["skipped"]
    actions = _actions(ROCrate(out))
    assert _id(actions["#slide/slide-a"]["actionStatus"]) == "http://schema.org/CompletedActionStatus"
    assert actions["#slide/slide-a"]["result"][0].id == "slide-a/"
