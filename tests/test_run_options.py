"""What `cellbatch run` checks before reading a capture, and the guards against silent misuse:
usage errors (exit 2), one JSON object on every exit, --quiet, --crop-size, cell size against
--cell-diameter, profiles applied where they were fitted, checks that compare a crop with itself,
the unsure share of the QC gate, paths in provenance and the Python API's arguments."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from cellbatch.errors import ExitCode
from cellbatch.registry import detectors
from tests.models import Identity, Negate, save_generator
from tests.scenes import DarkBlobDetector, scene, write_slides

TOY = ["--detector", "blobs", "--cell-diameter", "60", "--quiet"]


class PieceCounter(DarkBlobDetector):
    """The toy detector, counting the captures it sees (none may be read before a usage error)."""

    seen = 0

    def __call__(self, image):
        PieceCounter.seen += 1
        return super().__call__(image)


@pytest.fixture(autouse=True)
def toy_detector():
    detectors.register("blobs", PieceCounter)
    PieceCounter.seen = 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--detector", "cellpose"], "unknown detector 'cellpose'"),
        (["--normalise", "bogus"], "unknown normaliser 'bogus'"),
        (["--normalise", "display:contrast=abc"], "contrast"),
        (["--min-agreement", "0.8"], "need --classifier"),
        (["--model-sha256", "ab" * 32], "--model-sha256 needs --model"),
        (["--crop-size", "16"], "--crop-size 16"),
        (["--processes", "many"], "neither a number of worker processes"),
        (["--processes", "-1"], "neither a number of worker processes"),
    ],
)
def test_bad_command_lines_exit_2_with_a_usage_line_before_any_capture_is_read(tmp_path, cellbatch, extra, message):
    write_slides(tmp_path / "in", slides={"s": 2})
    code, out, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", *TOY, *extra, "--json")
    assert code == ExitCode.USAGE, err
    assert err.startswith("Usage: cellbatch run") and message in err and "Traceback" not in err
    assert json.loads(out) == {"exit_code": 2, "state": "not started", "error": json.loads(out)["error"]}
    assert PieceCounter.seen == 0 and not (tmp_path / "out" / "run.json").exists()


def test_could_not_run_prints_one_json_object_too(tmp_path, cellbatch):
    code, out, err = cellbatch("run", tmp_path / "nowhere", "-o", tmp_path / "out", "--json", *TOY)
    assert code == ExitCode.COULD_NOT_RUN
    reply = json.loads(out)
    assert reply["exit_code"] == 3 and "nowhere" in reply["error"] and reply["state"] == "not started"


def test_quiet_hides_the_progress_bar_only(tmp_path, cellbatch):
    write_slides(tmp_path / "in", slides={"s": 2})
    (tmp_path / "in" / "s" / "broken.png").write_bytes(b"not a png")
    code, out, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", *TOY)
    assert code == ExitCode.INPUTS_FAILED and out == ""
    assert "1 slide(s)" in err and "failed: s: " in err and "broken.png" in err


def test_crop_size_sets_the_crop_and_the_check_uses_its_centre(tmp_path, cellbatch):
    from tests.test_check_agreement import save_classifier

    write_slides(tmp_path / "in", slides={"s": 2})
    clf = save_classifier(tmp_path / "clf.pt")
    model = save_generator(Identity(), tmp_path / "id.pt")
    code, out, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--crop-size", "320", "--model",
                               model, "--classifier", clf, "--json", *TOY)
    assert code == 0, err
    group = zarr.open_group(str(tmp_path / "out" / "s" / "cells.zarr"), mode="r")
    assert group["crop"].shape[1:] == (320, 320, 3) and group["generated"].shape[1:] == (320, 320, 3)
    assert json.loads(out)["slides"][0]["check"]["agreement"] == 1.0
    code, _, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "o2", "--crop-size", "200",
                             "--classifier", clf, *TOY)
    assert code == ExitCode.USAGE and "classifier takes 256x256" in err


class DoubleSize(DarkBlobDetector):
    """Reports every cell twice as wide as --cell-diameter, as a detector set to the wrong size does."""

    def __call__(self, image):
        detection = super().__call__(image)
        from dataclasses import replace

        return replace(detection, cells=tuple(replace(c, area_px=4 * c.area_px) for c in detection.cells))


def test_a_cell_size_far_from_cell_diameter_is_warned_about(tmp_path, cellbatch):
    detectors.register("double", DoubleSize)
    write_slides(tmp_path / "in", slides={"s": 6})
    code, out, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--detector", "double",
                               "--cell-diameter", "60", "--quiet", "--json")
    assert code == 0
    assert "warning: slide s: the detected cells are 120 px across (median) but --cell-diameter is 60" in err
    assert any("--cell-diameter 120" in note for note in json.loads(out)["notes"])
    code, _, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "same", *TOY)
    assert "warning" not in err


def test_a_profile_fitted_on_raw_captures_is_refused_after_a_generator(tmp_path, cellbatch):
    from cellbatch.normalise.fit import fit_profile_files

    write_slides(tmp_path / "in", slides={"s": 2})
    raw = fit_profile_files(tmp_path / "raw.json", method="global", source=tmp_path / "in", target=tmp_path / "in")[0]
    identity = save_generator(Identity(), tmp_path / "id.pt")
    code, _, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--model", identity,
                             "--normalise", f"global:{raw}", *TOY)
    assert code == ExitCode.USAGE and "fitted on raw captures" in err and "twice" in err
    assert cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--normalise", f"global:{raw}", *TOY)[0] == 0

    fitted = fit_profile_files(tmp_path / "after.json", method="global", source=tmp_path / "in",
                               target=tmp_path / "in", source_model=identity)[0]
    args = ("run", tmp_path / "in", "-o", tmp_path / "o2", "--normalise", f"global:{fitted}", *TOY)
    assert cellbatch(*args, "--model", identity)[0] == 0
    code, _, err = cellbatch(*args, "--model", save_generator(Negate(), tmp_path / "neg.pt"))
    assert code == ExitCode.USAGE and "fitted on the output of the model" in err
    assert cellbatch(*args)[0] == ExitCode.USAGE


def test_a_check_that_compares_each_crop_with_itself_is_warned_about(tmp_path, cellbatch):
    from tests.test_check_agreement import save_classifier

    write_slides(tmp_path / "in", slides={"s": 2})
    clf = save_classifier(tmp_path / "clf.pt")
    code, out, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--classifier", clf, "--json", *TOY)
    assert code == 0 and "100% by construction" in err
    assert any("by construction" in n for n in json.loads(out)["notes"])
    code, _, err = cellbatch("check", tmp_path / "out", "--classifier", clf, "--device", "cpu")
    assert code == 0 and "output and reference are the same pixels" in err


def test_the_qc_gate_fails_when_too_many_cells_are_unsure():
    from cellbatch.check.agreement import summarise

    matrix = np.array([[94, 0], [0, 0]])  # the 94 confident cells all agree
    left_out = summarise(matrix, ["a", "b"], cells=207, unsure=113, no_reference=0, min_agreement=0.8,
                         max_unsure=0.5)
    assert left_out["agreement"] == 1.0 and left_out["qc_failed"] is True
    few = summarise(matrix, ["a", "b"], cells=120, unsure=26, no_reference=0, min_agreement=0.8, max_unsure=0.5)
    assert few["qc_failed"] is False


def test_api_takes_a_string_and_provenance_has_absolute_paths_and_the_working_directory(tmp_path, monkeypatch):
    from cellbatch.api import convert

    write_slides(tmp_path / "slides" / "s", slides={"a": 1})
    monkeypatch.chdir(tmp_path)
    report = convert("slides", "out", detector="blobs", cell_diameter=60)
    assert [s.name for s in report.slides] == ["s/a"] and report.exit_code == 0
    prov = json.loads((tmp_path / "out" / "s" / "a" / "provenance.json").read_text())
    assert prov["parameters"]["sources"] == [str(tmp_path / "slides")]
    assert prov["parameters"]["out"] == str(tmp_path / "out") and prov["cwd"] == str(tmp_path)
    assert convert(Path("slides"), "out", detector="blobs", cell_diameter=60).slides[0].status == "skipped"


def test_a_single_array_zarr_slide_names_its_cells_after_the_store(tmp_path, cellbatch):
    rng = np.random.default_rng(0)
    frames = np.stack([scene(rng, centres=[(160, 120)]) for _ in range(2)])
    zarr.create_array(str(tmp_path / "captures.zarr"), data=frames, chunks=(1, *frames.shape[1:]))
    code, _, err = cellbatch("run", tmp_path / "captures.zarr", "-o", tmp_path / "out", *TOY)
    assert code == 0, err
    rows = (tmp_path / "out" / "captures.zarr" / "cells.csv").read_text().splitlines()[1:]
    assert rows and all(row.split(",")[1] == "captures.zarr" for row in rows)


def test_one_way_to_build_a_detector_and_one_crop_size():
    import cellbatch

    root = Path(cellbatch.__file__).parent
    sources = {p: p.read_text(encoding="utf-8") for p in root.rglob("*.py")}
    assert [p.name for p, text in sources.items() if "(DetectSettings(" in text and p.name != "registry.py"] == [
        "threshold.py"  # its docstring example builds the class directly
    ]
    assert [p.name for p, text in sources.items() if "size: int = 256" in text or "SIZE = 256" in text] == ["crop.py"]
    assert not [p.name for p, text in sources.items() if "sys.argv" in text and "cli" not in p.parts]
