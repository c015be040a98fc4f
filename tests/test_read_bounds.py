"""Zarr slides whose declared shape or chunks would exhaust memory fail alone, before any frame is read."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from cellbatch.api import convert
from cellbatch.errors import ExitCode, InputFormatError
from cellbatch.read import ReadLimits, discover_slides, validate_slide
from cellbatch.registry import detectors
from tests.scenes import DarkBlobDetector, scene


@pytest.fixture(autouse=True)
def toy_detector():
    detectors.register("blobs", DarkBlobDetector)


def test_a_trillion_declared_frames_fail_the_slide_before_any_is_listed(tmp_path):
    zarr.create_array(str(tmp_path / "huge.zarr"), shape=(10**12, 240, 320, 3), chunks=(1, 240, 320, 3), dtype="u1")
    slide = discover_slides(tmp_path / "huge.zarr")[0]
    with pytest.raises(InputFormatError, match="declares 1000000000000 frames"):
        validate_slide(slide)


def test_one_frame_in_a_giant_chunk_fails_the_slide(tmp_path):
    zarr.create_array(str(tmp_path / "big.zarr"), shape=(1, 480, 640, 3), chunks=(1, 20000, 20000, 3), dtype="u1")
    with pytest.raises(InputFormatError, match="rechunk"):
        validate_slide(discover_slides(tmp_path / "big.zarr")[0])
    validate_slide(discover_slides(tmp_path / "big.zarr")[0], limits=ReadLimits(max_chunk_bytes=2 * 10**9))


def test_bounded_slides_fail_alone_and_the_run_ends_with_run_json(tmp_path):
    root = tmp_path / "in.zarr"
    group = zarr.open_group(str(root), mode="w")
    rng = np.random.default_rng(0)
    good = np.stack([scene(rng, centres=[(160, 120)]) for _ in range(2)])
    group.create_array("good", data=good, chunks=(1, 240, 320, 3))
    group.create_array("huge", shape=(10**12, 240, 320, 3), chunks=(1, 240, 320, 3), dtype="u1")
    group.create_array("chunky", shape=(1, 240, 320, 3), chunks=(1, 20000, 20000, 3), dtype="u1")
    report = convert([root], tmp_path / "out", detector="blobs", cell_diameter=60.0, device="cpu", workers=1)
    assert {s.name: s.status for s in report.slides} == {"good": "done", "huge": "failed", "chunky": "failed"}
    saved = json.loads((tmp_path / "out" / "run.json").read_text())
    assert saved["exit_code"] == ExitCode.INPUTS_FAILED


def test_a_hundred_thousand_absent_frames_are_one_failure_line(tmp_path):
    rng = np.random.default_rng(1)
    array = zarr.create_array(str(tmp_path / "sparse.zarr"), shape=(10**5, 240, 320, 3), chunks=(1, 240, 320, 3),
                              dtype="u1")
    array[0] = scene(rng, centres=[(160, 120)])
    array[1] = scene(rng, centres=[(100, 100)])
    report = convert([tmp_path / "sparse.zarr"], tmp_path / "out", detector="blobs", cell_diameter=60.0,
                     device="cpu", workers=1)
    (slide,) = report.slides
    assert (slide.status, slide.failed_captures, slide.cells) == ("done", 10**5 - 2, 2)
    saved = (tmp_path / "out" / "run.json").read_text()
    assert len(saved) < 20_000
    (failure,) = json.loads(saved)["failures"]
    assert "frames 2-99999 (99998 frames) missing" in failure["reason"]
