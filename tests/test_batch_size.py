"""``--batch-size N|auto`` and out-of-memory back-off: batches shrink, cells are never lost."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
import zarr

from cellbatch.errors import ModelError
from cellbatch.pipeline import Stages
from cellbatch.registry import detectors, normalisers
from cellbatch.stages import NormaliserStage
from tests.scenes import DarkBlobDetector, write_slides
from tests.test_pipeline import read_cells


class InvertsUpTo:
    """A normaliser that runs out of memory on batches larger than ``limit`` crops (numpy and torch)."""

    name = "inverts-up-to"
    calls: list[int] = []

    def __init__(self, arg: str | None = None) -> None:
        self.limit = int(arg or 2)

    def __call__(self, crops: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
        self._allocate(len(crops))
        return 255 - crops

    def apply_tensors(self, images: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        self._allocate(len(images))
        return 255 - images

    def _allocate(self, n: int) -> None:
        InvertsUpTo.calls.append(n)
        if n > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {n} crops")

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name}


@pytest.fixture(autouse=True)
def plugins():
    detectors.register("blobs", DarkBlobDetector)
    normalisers.register("inverts-up-to", InvertsUpTo)


def batch_of(n: int, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), np.zeros((n, size, size), np.uint8)


def test_a_batch_that_runs_out_of_memory_is_halved_and_every_crop_comes_back_in_order():
    stages = Stages(normalisers=[NormaliserStage(InvertsUpTo("3"))])
    crops, masks = batch_of(10)
    arrays = stages.process(crops, masks)
    assert np.array_equal(arrays["normalised"], 255 - crops)
    assert stages.max_batch == 2 and len(stages.notes) == 2 and "no cell lost" in stages.notes[0]
    more, more_masks = batch_of(5)
    InvertsUpTo.calls.clear()
    assert np.array_equal(stages.process(more, more_masks)["normalised"], 255 - more)
    assert InvertsUpTo.calls == [2, 2, 1]  # later batches are split up front, without failing first


def test_stage_threads_that_run_out_of_memory_at_once_halve_once_and_lose_no_crop():
    stages = Stages(normalisers=[NormaliserStage(InvertsUpTo("3"))], threads=2)
    try:
        batches = [batch_of(8 + i) for i in range(4)]
        in_flight = [stages.submit(crops, masks) for crops, masks in batches]
        for (crops, _), batch in zip(batches, in_flight, strict=True):
            assert np.array_equal(batch.arrays()["normalised"], 255 - crops)
    finally:
        stages.close()
    assert stages.max_batch == 2
    halvings = [note.split(" halved to ")[1].split()[0] for note in stages.notes]
    assert len(halvings) == len(set(halvings))  # each size noted once, whichever thread ran out first


def test_a_single_crop_that_does_not_fit_is_a_model_error():
    stages = Stages(normalisers=[NormaliserStage(InvertsUpTo("0"))])
    with pytest.raises(ModelError, match="one crop does not fit"):
        stages.process(*batch_of(4))


def test_largest_batch_is_the_largest_power_of_two_that_fits():
    stages = Stages(normalisers=[NormaliserStage(InvertsUpTo("12"))])
    assert stages.largest_batch(8, limit=64) == 8
    assert stages.largest_batch(8, limit=4) == 4


def run(src, out, **options):
    from cellbatch.api import convert

    return convert([src], out, detector="blobs", cell_diameter=60, device="cpu", **options)


def test_out_of_memory_in_a_run_loses_no_cell_and_is_noted_in_run_json(tmp_path):
    write_slides(tmp_path / "in", slides={"s": 6})
    outputs = {}
    for label, limit in (("fits", "99"), ("oom", "2")):
        report = run(tmp_path / "in", tmp_path / label, normalise=[f"inverts-up-to:{limit}"], batch_size=5)
        assert report.exit_code == 0
        outputs[label] = zarr.open_group(str(tmp_path / label / "s" / "cells.zarr"), mode="r")["normalised"][:]
    assert len(outputs["oom"]) == len(read_cells(tmp_path / "oom" / "s")) >= 6
    assert np.array_equal(outputs["oom"], outputs["fits"])
    notes = json.loads((tmp_path / "oom" / "run.json").read_text())["notes"]
    # The stage threads compute two batches at once: whichever runs out of memory first is noted, the
    # batch of 5 (halved to 2) or the slide's last, smaller one (halved to 1); both keep every cell.
    halved = [int(n.split(" halved to ")[1].split()[0]) for n in notes if " halved to " in n]
    assert halved and max(halved) <= 2, notes


def test_batch_size_auto_on_cpu_is_noted_in_run_json(tmp_path):
    write_slides(tmp_path / "in", slides={"s": 2})
    assert run(tmp_path / "in", tmp_path / "out", batch_size="auto").exit_code == 0
    notes = json.loads((tmp_path / "out" / "run.json").read_text())["notes"]
    assert any("--batch-size auto: 32 crops per batch on cpu" in n for n in notes)


@pytest.mark.parametrize("bad", ["0", "many"])
def test_a_batch_size_that_is_neither_a_number_nor_auto_is_refused(bad):
    from click.testing import CliRunner

    from cellbatch.cli import cli

    result = CliRunner().invoke(cli, ["run", ".", "--batch-size", bad])
    assert result.exit_code == 2 and "neither a positive number of crops nor auto" in result.output


@pytest.mark.gpu
def test_batch_size_auto_on_cuda_finds_a_batch_that_fits(tmp_path):
    from cellbatch.api import resolve_batch_size
    from cellbatch.generate import Generator
    from tests.models import Negate, save_generator

    stages = Stages(generator=Generator.load(save_generator(Negate(), tmp_path / "neg.pt"), device="cuda"),
                    device="cuda")
    assert resolve_batch_size("auto", stages, crop_size=256) >= 16
