"""End-to-end runs of ``cellbatch run`` in this process (toy detector, tiny models)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import zarr

from cellbatch.errors import ExitCode
from cellbatch.registry import detectors
from tests.models import Identity, Negate, ReturnsNaN, save_generator
from tests.scenes import DarkBlobDetector, write_slides

TOY = ["--detector", "blobs", "--cell-diameter", "60", "--quiet"]


@pytest.fixture(autouse=True)
def toy_detector():
    detectors.register("blobs", DarkBlobDetector)


@pytest.fixture
def cellbatch(capsys):
    from cellbatch.cli import main

    def invoke(*args: str):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        captured = capsys.readouterr()
        return exit_info.value.code, captured.out, captured.err

    return invoke


def read_cells(slide_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(slide_dir / "cells.csv")))


def test_negating_generator_writes_255_minus_crop(tmp_path, cellbatch):
    write_slides(tmp_path / "in", slides={"slide1": 3})
    model = save_generator(Negate(), tmp_path / "neg.pt")
    code, _, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--model", model, *TOY)
    assert code == 0, err
    group = zarr.open_group(str(tmp_path / "out" / "slide1" / "cells.zarr"), mode="r")
    assert group["crop"].shape[0] == len(read_cells(tmp_path / "out" / "slide1")) >= 3
    assert np.array_equal(group["generated"][:], 255 - group["crop"][:])
    assert "normalised" not in group


def test_without_model_generation_is_skipped_and_said(tmp_path, cellbatch):
    write_slides(tmp_path / "in", slides={"s": 2})
    code, out, _ = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--json", *TOY)
    summary = json.loads(out)
    assert code == 0 and summary["generation"].startswith("skipped")
    group = zarr.open_group(str(tmp_path / "out" / "s" / "cells.zarr"), mode="r")
    assert set(group.array_keys()) == {"crop", "mask"}


def test_directory_and_zarr_inputs_give_the_same_cells(tmp_path, cellbatch):
    paths = write_slides(tmp_path / "in", slides={"slide": 4})
    stack = np.stack([iio.imread(p) for p in paths])
    zarr.create_array(str(tmp_path / "slides.zarr"), data=stack, chunks=(1, *stack.shape[1:]))
    assert cellbatch("run", tmp_path / "in", "-o", tmp_path / "out_dir", *TOY)[0] == 0
    assert cellbatch("run", tmp_path / "slides.zarr", "-o", tmp_path / "out_zarr", *TOY)[0] == 0
    from_dir = read_cells(tmp_path / "out_dir" / "slide")
    from_zarr = read_cells(tmp_path / "out_zarr" / "slides.zarr")
    strip = ("source", "frame")
    assert [{k: v for k, v in r.items() if k not in strip} for r in from_dir] == \
           [{k: v for k, v in r.items() if k not in strip} for r in from_zarr]
    assert [int(r["frame"]) for r in from_zarr] == [int(p.stem[-1]) for p in paths for r in from_dir
                                                    if r["source"].endswith(p.name)]
    a = zarr.open_group(str(tmp_path / "out_dir" / "slide" / "cells.zarr"), mode="r")["crop"][:]
    b = zarr.open_group(str(tmp_path / "out_zarr" / "slides.zarr" / "cells.zarr"), mode="r")["crop"][:]
    assert np.array_equal(a, b)


def test_provenance_hashes_match_the_files(tmp_path, cellbatch):
    paths = write_slides(tmp_path / "in", slides={"s": 2})
    model = save_generator(Identity(), tmp_path / "id.pt")
    assert cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--model", model, "--device", "cpu", *TOY)[0] == 0
    prov = json.loads((tmp_path / "out" / "s" / "provenance.json").read_text())
    assert prov["model"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    by_path = {i["path"]: i for i in prov["inputs"]}
    for p in paths:
        entry = by_path[f"s/{p.name}"]
        assert entry["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
        assert entry["bytes"] == p.stat().st_size and entry["cells"] >= 1
    for key in ("cellbatch_version", "command", "parameters", "environment", "started", "finished", "content_key"):
        assert key in prov
    assert prov["environment"]["device"] == "cpu"


def test_bad_capture_fails_alone_and_the_slide_goes_on(tmp_path, cellbatch):
    write_slides(tmp_path / "in", slides={"s": 2})
    (tmp_path / "in" / "s" / "broken.png").write_bytes(b"not a png")
    code, out, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--json", *TOY)
    summary = json.loads(out)
    assert code == ExitCode.INPUTS_FAILED
    assert summary["slides"][0]["status"] == "done" and summary["failed_captures"] == 1
    assert "broken.png" in summary["failures"][0]["path"]
    assert len({r["source"] for r in read_cells(tmp_path / "out" / "s")}) == 2
    assert "Traceback" not in err


def test_unusable_model_stops_the_run_with_one_line(tmp_path, cellbatch):
    write_slides(tmp_path / "in", slides={"s": 1})
    bad = tmp_path / "model.pt"
    bad.write_text("not a model")
    code, _, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--model", bad, *TOY)
    assert code == ExitCode.COULD_NOT_RUN
    assert err.strip().count("\n") == 0 and "model.pt" in err and "Traceback" not in err


def test_model_returning_nan_stops_the_run_and_leaves_no_slide(tmp_path, cellbatch):
    write_slides(tmp_path / "in", slides={"s": 1})
    model = save_generator(ReturnsNaN(), tmp_path / "nan.pt")
    code, _, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--model", model, *TOY)
    assert code == ExitCode.COULD_NOT_RUN and "NaN" in err
    assert not (tmp_path / "out" / "s").exists()


def test_rerun_skips_unchanged_slides_and_redoes_changed_ones(tmp_path, cellbatch):
    paths = write_slides(tmp_path / "in", slides={"a": 2, "b": 2})
    args = ("run", tmp_path / "in", "-o", tmp_path / "out", "--json", *TOY)
    assert cellbatch(*args)[0] == 0
    status = {s["name"]: s["status"] for s in json.loads(cellbatch(*args)[1])["slides"]}
    assert status == {"a": "skipped", "b": "skipped"}
    iio.imwrite(paths[0], np.flipud(iio.imread(paths[0])))
    status = {s["name"]: s["status"] for s in json.loads(cellbatch(*args)[1])["slides"]}
    assert status == {"a": "done", "b": "skipped"}
    status = {s["name"]: s["status"] for s in json.loads(cellbatch(*args, "--force")[1])["slides"]}
    assert status == {"a": "done", "b": "done"}


def test_normalise_none_writes_no_normalised_array(tmp_path, cellbatch):
    write_slides(tmp_path / "in", slides={"s": 1})
    assert cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--normalise", "none", *TOY)[0] == 0
    assert "normalised" not in zarr.open_group(str(tmp_path / "out" / "s" / "cells.zarr"), mode="r")


def test_unknown_normaliser_is_a_one_line_error(tmp_path, cellbatch):
    write_slides(tmp_path / "in", slides={"s": 1})
    code, _, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--normalise", "sepia", *TOY)
    assert code == ExitCode.COULD_NOT_RUN and "sepia" in err and "display" in err


def test_missing_input_is_a_one_line_error(tmp_path, cellbatch):
    code, _, err = cellbatch("run", tmp_path / "nowhere", "-o", tmp_path / "out", *TOY)
    assert code != 0 and "nowhere" in err and "Traceback" not in err


def test_full_disk_stops_the_run_with_one_line(tmp_path, cellbatch, monkeypatch):
    import errno

    from cellbatch.write import SlideWriter

    write_slides(tmp_path / "in", slides={"s": 2})

    def disk_full(self, rows, arrays):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SlideWriter, "_write", disk_full)
    code, _, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", *TOY)
    assert code == ExitCode.COULD_NOT_RUN
    assert "no space left" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "out" / "s").exists()


def test_second_run_on_the_same_out_is_refused(tmp_path, cellbatch):
    import subprocess
    import sys

    write_slides(tmp_path / "in", slides={"s": 1})
    (tmp_path / "out").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from cellbatch.lock import RunLock;"
         "lock = RunLock(Path(sys.argv[1])); lock.acquire(); print('held', flush=True); time.sleep(60)",
         str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", *TOY)
        assert code == ExitCode.COULD_NOT_RUN and str(holder.pid) in err
    finally:
        holder.kill()
        holder.wait()
    assert cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", *TOY)[0] == 0  # a dead holder blocks nothing


def test_model_sha256_mismatch_refuses_the_model(tmp_path, cellbatch):
    write_slides(tmp_path / "in", slides={"s": 1})
    model = save_generator(Identity(), tmp_path / "id.pt")
    code, _, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--model", model,
                             "--model-sha256", "ab" * 32, *TOY)
    assert code == ExitCode.COULD_NOT_RUN and "sha256" in err
    good = hashlib.sha256(model.read_bytes()).hexdigest()
    assert cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--model", model, "--model-sha256", good,
                     *TOY)[0] == 0


def test_hostile_slide_names_never_write_outside_out(tmp_path, cellbatch):
    write_slides(tmp_path / "in", slides={"evil": 1})
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "evil").symlink_to(outside, target_is_directory=True)
    code, out, _ = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--json", *TOY)
    assert not any(outside.iterdir())
    summary = json.loads(out)
    assert summary["slides"][0]["status"] == "failed" and "symlink" in summary["slides"][0]["reason"]


def test_untrained_model_is_marked_in_provenance_and_run_json(tmp_path, cellbatch):
    write_slides(tmp_path / "in", slides={"s": 1})
    model = save_generator(Identity(), tmp_path / "fresh.pt", trained=False)
    code, out, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--model", model, "--json", *TOY)
    assert code == 0 and "UNTRAINED" in err
    assert any("UNTRAINED" in n for n in json.loads(out)["notes"])
    prov = json.loads((tmp_path / "out" / "s" / "provenance.json").read_text())
    assert prov["model"]["trained"] is False


@pytest.mark.gpu
def test_run_on_cuda_matches_the_cpu_run(tmp_path, cellbatch):
    write_slides(tmp_path / "in", slides={"s": 2})
    model = save_generator(Negate(), tmp_path / "neg.pt")
    for device in ("cpu", "cuda"):
        code, _, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / device, "--model", model,
                                 "--device", device, *TOY)
        assert code == 0, err
    groups = [zarr.open_group(str(tmp_path / d / "s" / "cells.zarr"), mode="r") for d in ("cpu", "cuda")]
    assert np.array_equal(groups[0]["generated"][:], groups[1]["generated"][:])
    prov = json.loads((tmp_path / "cuda" / "s" / "provenance.json").read_text())
    assert prov["environment"]["device"] == "cuda" and prov["environment"]["device_name"] != "cpu"


def test_agreement_check_in_the_run_and_its_qc_gate(tmp_path, cellbatch):
    from tests.models import SwapRedBlue
    from tests.test_check_agreement import save_classifier

    write_slides(tmp_path / "in", slides={"s": 3})
    clf = save_classifier(tmp_path / "clf.pt")
    identity = save_generator(Identity(), tmp_path / "id.pt")
    code, out, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "same", "--model", identity,
                               "--classifier", clf, "--min-agreement", "0.9", "--json", *TOY)
    summary = json.loads(out)
    assert code == 0, err
    assert summary["slides"][0]["check"]["agreement"] == 1.0 and summary["check"]["agreement"] == 1.0
    rows = read_cells(tmp_path / "same" / "s")
    assert {r["agree"] for r in rows} == {"1"} and (tmp_path / "same" / "s" / "confusion.png").is_file()

    swap = save_generator(SwapRedBlue(), tmp_path / "swap.pt")
    code, out, _ = cellbatch("run", tmp_path / "in", "-o", tmp_path / "swapped", "--model", swap,
                             "--classifier", clf, "--min-agreement", "0.9", "--json", *TOY)
    summary = json.loads(out)
    assert code == ExitCode.QC_FAILED
    assert summary["slides"][0]["status"] == "qc_failed" and summary["slides"][0]["check"]["agreement"] < 0.9
    assert (tmp_path / "swapped" / "s" / "cells.zarr").is_dir()  # output kept
    prov = json.loads((tmp_path / "swapped" / "s" / "provenance.json").read_text())
    assert prov["check"]["qc_failed"] is True and prov["classifier"]["sha256"]


def test_several_sources_name_their_slides_apart(tmp_path, cellbatch):
    write_slides(tmp_path / "a" / "day1", slides={"s": 1})
    write_slides(tmp_path / "b" / "day1", slides={"s": 1})
    write_slides(tmp_path / "c", slides={"leaf": 1})
    code, out, err = cellbatch("run", tmp_path / "a" / "day1", tmp_path / "b" / "day1", tmp_path / "c" / "leaf",
                               "-o", tmp_path / "out", "--json", *TOY)
    assert code == 0, err
    names = sorted(s["name"] for s in json.loads(out)["slides"])
    assert names == ["day1-2/s", "day1/s", "leaf"]
    assert all((tmp_path / "out" / n / "cells.csv").is_file() for n in names)
