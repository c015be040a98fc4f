"""End-to-end runs of ``cellbatch run`` in this process (toy detector, tiny models)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
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


def test_two_stage_threads_write_the_same_cells_in_the_same_order_as_one(tmp_path, cellbatch):
    write_slides(tmp_path / "in", slides={"slide1": 6})
    model = save_generator(Negate(), tmp_path / "neg.pt")
    groups = []
    for threads in (1, 2):  # 2 cores: two stage threads of one torch thread, several batches in flight
        out = tmp_path / f"out{threads}"
        code, _, err = cellbatch("run", tmp_path / "in", "-o", out, "--model", model, "--batch-size", "2",
                                 "--threads", str(threads), *TOY)
        assert code == 0, err
        assert json.loads((out / "slide1" / "provenance.json").read_text())["parameters"]["stage_threads"] == threads
        groups.append(zarr.open_group(str(out / "slide1" / "cells.zarr"), mode="r"))
    assert groups[0]["crop"].shape[0] >= 6
    for name in ("crop", "mask", "generated"):
        assert np.array_equal(groups[0][name][:], groups[1][name][:])
    assert np.array_equal(groups[1]["generated"][:], 255 - groups[1]["crop"][:])
    csv_files = [(tmp_path / f"out{threads}" / "slide1" / "cells.csv").read_bytes() for threads in (1, 2)]
    assert csv_files[0] == csv_files[1]


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


def test_unknown_normaliser_is_a_usage_error(tmp_path, cellbatch):
    write_slides(tmp_path / "in", slides={"s": 1})
    code, _, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--normalise", "sepia", *TOY)
    assert code == ExitCode.USAGE and "sepia" in err and "display" in err
    assert err.startswith("Usage: cellbatch run") and "Traceback" not in err


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


def _slides(summary: dict) -> list[tuple[str, str]]:
    return sorted((s["name"], s["status"]) for s in summary["slides"])


def test_a_slide_and_a_subfolder_named_like_it_both_fail_with_the_reason(tmp_path, cellbatch):
    src = tmp_path / "slides"
    write_slides(src, slides={".": 1, "slides": 1})
    for _ in range(2):  # the rerun reports the same: nothing is skipped that has no output of its own
        code, out, _ = cellbatch("run", src, "-o", tmp_path / "out", "--json", *TOY)
        summary = json.loads(out)
        assert code == ExitCode.INPUTS_FAILED
        assert _slides(summary) == [("slides", "failed"), ("slides", "failed")]
        assert all("would both be written to" in s["reason"] and str(src / "slides") in s["reason"]
                   for s in summary["slides"])
    assert not (tmp_path / "out" / "slides").exists()


def test_numbered_sources_never_take_another_sources_name(tmp_path, cellbatch):
    for i, folder in enumerate(["x/a", "y/a", "z/a-2"]):
        write_slides(tmp_path / folder, slides={".": 1}, seed=i)
    sources = [tmp_path / "x/a", tmp_path / "y/a", tmp_path / "z/a-2"]
    code, out, err = cellbatch("run", *sources, "-o", tmp_path / "out", "--json", *TOY)
    assert code == 0, err
    names = [s["name"] for s in json.loads(out)["slides"]]
    assert sorted(names) == ["a", "a-2", "a-3"]
    for name, src in [("a", "x/a"), ("a-3", "y/a"), ("a-2", "z/a-2")]:
        prov = json.loads((tmp_path / "out" / name / "provenance.json").read_text())
        assert prov["slide"] == name and prov["parameters"]["sources"] == [str(s) for s in sources]
        capture = (tmp_path / src / "capture_000.png").read_bytes()
        assert prov["inputs"][0]["sha256"] == hashlib.sha256(capture).hexdigest()


def test_subfolders_named_like_layout_files_get_their_own_folders(tmp_path, cellbatch):
    write_slides(tmp_path / "in", slides={"s": 1, "s/cells.csv": 1, "s/cells.zarr": 1, "run.json": 1,
                                          "provenance.json": 1})
    code, out, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--json", *TOY)
    assert code == 0, err
    summary = json.loads(out)
    assert all(s["status"] == "done" for s in summary["slides"]) and len(summary["slides"]) == 5
    assert (tmp_path / "out" / "run.json").is_file()
    assert (tmp_path / "out" / "s" / "cells.csv").is_file() and (tmp_path / "out" / "s" / "cells.zarr").is_dir()
    outputs = {Path(s["output"]) for s in summary["slides"]}
    assert len(outputs) == 5
    for slide in summary["slides"]:
        prov = json.loads((Path(slide["output"]) / "provenance.json").read_text())
        assert prov["slide"] == slide["name"]
    code, out, _ = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--json", *TOY)
    assert code == 0 and {s["status"] for s in json.loads(out)["slides"]} == {"skipped"}


def test_rerun_redoes_a_slide_whose_folder_holds_another_slides_results(tmp_path, cellbatch):
    write_slides(tmp_path / "in", slides={"s": 1})
    assert cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", *TOY)[0] == 0
    prov_path = tmp_path / "out" / "s" / "provenance.json"
    prov = json.loads(prov_path.read_text())
    prov["slide"] = "another slide with the same captures"
    prov_path.write_text(json.dumps(prov))
    code, out, _ = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--json", *TOY)
    assert code == 0 and _slides(json.loads(out)) == [("s", "done")]


def test_out_that_is_or_holds_an_input_is_refused_and_no_input_is_touched(tmp_path, cellbatch):
    write_slides(tmp_path / "in", slides={"s": 2})
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for sources, out in [((tmp_path / "in",), tmp_path / "in"), ((tmp_path / "in" / "s",), tmp_path / "in")]:
        code, _, err = cellbatch("run", *sources, "-o", out, *TOY)
        assert code == ExitCode.USAGE and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    code, out, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "in" / "out", "--json", *TOY)
    assert code == 0, err
    assert _slides(json.loads(out)) == [("s", "done")]  # OUT inside SRC: allowed, and not read as input
    code, out, _ = cellbatch("run", tmp_path / "in", "-o", tmp_path / "in" / "out", "--json", *TOY)
    assert code == 0 and _slides(json.loads(out)) == [("s", "skipped")]


def test_a_slide_name_too_long_fails_that_slide_or_is_shortened_never_the_run(tmp_path, cellbatch):
    # 243 bytes: fits a folder name, but not with the staging suffix main added to it
    write_slides(tmp_path / "in", slides={"n" * 243: 1, "ok": 1})
    code, out, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--json", *TOY)
    assert code == 0, err
    assert (tmp_path / "out" / ("n" * 243) / "cells.csv").is_file()
    # an OUT so deep that only the long name overflows PATH_MAX: that slide fails, "ok" is done
    deep = tmp_path.joinpath(*["d" * 250] * ((3900 - len(str(tmp_path))) // 251))
    code, out, err = cellbatch("run", tmp_path / "in", "-o", deep, "--json", *TOY)
    summary = json.loads(out)
    assert code == ExitCode.INPUTS_FAILED and "Traceback" not in err
    statuses = dict(_slides(summary))
    assert statuses == {"n" * 243: "failed", "ok": "done"}
    reason = next(s["reason"] for s in summary["slides"] if s["status"] == "failed")
    assert "over the file system's limit" in reason and "\n" not in reason


def test_a_symlink_planted_at_the_staging_folder_is_removed_not_followed(tmp_path, cellbatch):
    write_slides(tmp_path / "in", slides={"s": 1, "t": 1})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep me")
    assert cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--force", *TOY)[0] == 0
    (tmp_path / "out" / ".cellbatch-staging").rmdir()
    os.symlink(elsewhere, tmp_path / "out" / ".cellbatch-staging", target_is_directory=True)
    code, _, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--force", *TOY)
    assert code == 0, err
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]
    assert (elsewhere / "keep.txt").read_text() == "keep me"
    assert not (tmp_path / "out" / ".cellbatch-staging").is_symlink()


@pytest.mark.parametrize("option", [("--cell-diameter", "nan"), ("--cell-diameter", "inf"),
                                    ("--cell-diameter", "1e12"), ("--detector", "thresold")])
def test_impossible_cell_diameters_and_unknown_detectors_are_refused_before_any_capture(tmp_path, cellbatch, option):
    write_slides(tmp_path / "in", slides={"s": 1})
    code, _, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--quiet", *option)
    assert code == ExitCode.USAGE and ("--cell-diameter" in err or "thresold" in err) and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec", ["display:softness=1e9", "display:contrast=1e308"])
def test_absurd_display_options_are_refused_before_any_capture(tmp_path, cellbatch, spec):
    write_slides(tmp_path / "in", slides={"s": 1})
    code, _, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--normalise", spec, *TOY)
    # a bad normaliser option is a bad command line: usage line, the error, exit 2
    assert code == ExitCode.USAGE and "is not valid" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_full_disk_while_writing_run_json_is_one_line_and_exit_3(tmp_path, cellbatch, monkeypatch):
    import errno

    write_slides(tmp_path / "in", slides={"s": 1})
    assert cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", *TOY)[0] == 0

    real_fsync = os.fsync

    def full_for_run_json(fd):  # the disk fills up as run.json is written (Linux: the fd's path in /proc)
        if "run.json" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_for_run_json)  # the rerun skips every slide: run.json is all it writes
    code, _, err = cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", *TOY)
    assert code == ExitCode.COULD_NOT_RUN and err.count("\n") == 1 and "Traceback" not in err
    assert "run.json" in err and "no space left" in err
    assert not list((tmp_path / "out").glob(".*.tmp"))  # the half-written temporary file is gone
