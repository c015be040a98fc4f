"""The device-stage interface: generator and normalisers as stages, the numpy adapter, transfers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from cellbatch.generate import Generator
from cellbatch.normalise.display import DisplayNormaliser
from cellbatch.pipeline import Stages
from cellbatch.stages import Batch, NormaliserStage, Stage, Transfer, run_stages
from tests.models import Negate, save_generator


class DarkenOnHost:
    """A plugin normaliser with only the numpy contract."""

    name = "darken"

    def __init__(self, arg: str | None = None) -> None:
        self.seen_masks: np.ndarray | None = None

    def __call__(self, crops: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
        self.seen_masks = masks
        return (crops // 2).astype(np.uint8)

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name}


@pytest.fixture
def crops_and_masks():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (3, 96, 96, 3), dtype=np.uint8), rng.integers(0, 4, (3, 96, 96), dtype=np.uint8)


def test_generator_and_normalisers_are_stages(tmp_path):
    gen = Generator.load(save_generator(Negate(), tmp_path / "neg.pt"))
    assert isinstance(gen, Stage) and gen.output == "generated"
    assert isinstance(NormaliserStage(DisplayNormaliser()), Stage)


def test_a_numpy_only_plugin_normaliser_runs_through_the_host_adapter(crops_and_masks):
    crops, masks = crops_and_masks
    plugin = DarkenOnHost()
    stage = NormaliserStage(plugin)
    out = run_stages([stage], Transfer("cpu").upload(crops, masks))
    assert stage.provenance()["implementation"] == "numpy"
    assert np.array_equal(out.arrays["normalised"].numpy(), crops // 2)
    assert np.array_equal(plugin.seen_masks, masks)


@pytest.mark.parametrize("name", ["none", "display", "hm", "global", "reinhard", "macenko"])
def test_every_built_in_normaliser_runs_on_the_device(name):
    from cellbatch.registry import normalisers

    assert callable(getattr(normalisers.get(name), "apply_tensors", None))


def test_on_cuda_built_in_normalisers_take_the_torch_version_and_plugins_the_host_one():
    assert NormaliserStage(DisplayNormaliser(), device="cuda").implementation == "torch"
    assert NormaliserStage(DarkenOnHost(), device="cuda").implementation == "numpy"
    assert NormaliserStage(DisplayNormaliser(), device="cpu").implementation == "numpy"


def test_stages_chain_in_order_and_write_each_output_once(tmp_path, crops_and_masks):
    crops, masks = crops_and_masks
    stages = Stages(generator=Generator.load(save_generator(Negate(), tmp_path / "neg.pt")),
                    normalisers=[NormaliserStage(DarkenOnHost()), NormaliserStage(DarkenOnHost())])
    arrays = stages.process(crops, masks)
    assert set(arrays) == {"crop", "mask", "generated", "normalised"}
    assert np.array_equal(arrays["generated"], 255 - crops)
    assert np.array_equal(arrays["normalised"], (255 - crops) // 4)
    assert arrays["crop"] is crops and arrays["mask"] is masks


def test_a_batch_keeps_its_crops_while_the_image_moves_on(crops_and_masks):
    crops, masks = crops_and_masks
    batch = Transfer("cpu").upload(crops, masks)
    moved = batch.with_output(255 - batch.image, "generated")
    assert isinstance(moved, Batch) and len(moved) == 3
    assert torch.equal(moved.crops, batch.crops) and torch.equal(moved.arrays["generated"], 255 - batch.crops)
    assert batch.arrays == {}


@pytest.mark.gpu
def test_cuda_transfer_uploads_from_pinned_memory_and_downloads_the_same_bytes(crops_and_masks):
    crops, masks = crops_and_masks
    transfer = Transfer("cuda")
    batch = transfer.upload(crops, masks)
    assert batch.crops.is_cuda and batch.masks.dtype == torch.uint8
    back = transfer.download({"generated": 255 - batch.image, "mask": batch.masks}).wait()
    assert np.array_equal(back["generated"], 255 - crops) and np.array_equal(back["mask"], masks)


@pytest.mark.gpu
def test_a_cuda_chain_of_torch_stages_matches_the_cpu_chain_within_a_grey_level(tmp_path, crops_and_masks):
    crops, masks = crops_and_masks
    model = save_generator(Negate(), tmp_path / "neg.pt")
    outputs = {}
    for device in ("cpu", "cuda"):
        stages = Stages(generator=Generator.load(model, device=device), device=device,
                        normalisers=[NormaliserStage(DisplayNormaliser(), device=device)])
        outputs[device] = stages.process(crops, masks)["normalised"].astype(np.int16)
    assert (np.abs(outputs["cpu"] - outputs["cuda"]).max(axis=-1) <= 1).mean() >= 0.999


class MeetInPairs:
    """A normaliser that returns only once another batch is inside it too, and notes its torch threads."""

    name = "pairs"

    def __init__(self) -> None:
        import threading

        self.meeting = threading.Barrier(2, timeout=10)
        self.torch_threads: list[int] = []

    def __call__(self, crops: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
        self.torch_threads.append(torch.get_num_threads())
        self.meeting.wait()
        return crops

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name}


def test_stage_threads_compute_batches_at_once_and_return_them_in_order(tmp_path):
    rng = np.random.default_rng(1)
    batches = [(rng.integers(0, 256, (2, 96, 96, 3), dtype=np.uint8), np.zeros((2, 96, 96), np.uint8))
               for _ in range(4)]
    pairs = MeetInPairs()
    stages = Stages(generator=Generator.load(save_generator(Negate(), tmp_path / "neg.pt")),
                    normalisers=[NormaliserStage(pairs)], threads=2, torch_threads=1)
    assert stages.in_flight == 2
    main_threads = torch.get_num_threads()
    try:
        in_flight = [stages.submit(crops, masks) for crops, masks in batches]  # would time out one at a time
        for (crops, _), batch in zip(batches, in_flight, strict=True):
            assert np.array_equal(batch.arrays()["generated"], 255 - crops)
    finally:
        stages.close()
    assert pairs.torch_threads == [1, 1, 1, 1] and torch.get_num_threads() == main_threads


class Fails:
    name = "fails"

    def __call__(self, crops: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
        raise ValueError("profile does not fit")

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name}


def test_a_stage_threads_error_reaches_the_caller_with_its_batch(crops_and_masks):
    crops, masks = crops_and_masks
    stages = Stages(normalisers=[NormaliserStage(Fails())], threads=2, torch_threads=1)
    try:
        batch = stages.submit(crops, masks)
        with pytest.raises(ValueError, match="profile does not fit"):
            batch.arrays()
    finally:
        stages.close()


def test_on_cuda_one_batch_is_in_flight_whatever_the_threads():
    assert Stages(device="cuda", threads=2).in_flight == 1
    assert Stages(device="cpu", threads=1).in_flight == 1
