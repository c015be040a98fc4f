"""How a run reads its inputs: once per capture, hashed where decoded, skipped on a rerun without a read.

Also: what a Dask task carries (references, never the whole slide) and a lost worker in each phase.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest

import cellbatch.extract
import cellbatch.pipeline
import cellbatch.read
from cellbatch.api import convert
from cellbatch.detect.base import DetectSettings
from cellbatch.errors import ExitCode
from cellbatch.registry import detectors
from tests.scenes import DarkBlobDetector, write_slides

TOY = {"detector": "blobs", "cell_diameter": 60.0, "device": "cpu", "workers": 2}


@pytest.fixture(autouse=True)
def toy_detector():
    detectors.register("blobs", DarkBlobDetector)


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Every capture file a run reads, in the order read (hashing and extraction alike)."""
    seen: list[str] = []
    original = cellbatch.extract.read_capture_bytes

    def counting(path, **kwargs):
        seen.append(Path(path).name)
        return original(path, **kwargs)

    monkeypatch.setattr(cellbatch.extract, "read_capture_bytes", counting)
    return seen


@pytest.fixture
def trust_fresh_stats(monkeypatch):
    """Files written by a test are seconds old; let their stat count as settled."""
    monkeypatch.setattr(cellbatch.read, "RACY_SECONDS", 0.0)


def statuses(report) -> dict[str, str]:
    return {s.name: s.status for s in report.slides}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_first_run_reads_each_capture_once(tmp_path, reads):
    paths = write_slides(tmp_path / "in", slides={"a": 3, "b": 2})
    report = convert([tmp_path / "in"], tmp_path / "out", **TOY)
    assert report.exit_code == 0
    assert sorted(reads) == sorted(p.name for p in paths)


def test_capture_swapped_after_planning_gets_the_provenance_of_what_was_decoded(
    tmp_path, monkeypatch, trust_fresh_stats
):
    paths = write_slides(tmp_path / "in", slides={"s": 2})
    first = paths[0]
    other = tmp_path / "other.png"
    image = iio.imread(first)
    iio.imwrite(other, np.ascontiguousarray(image[:, ::-1]))  # the cell moves: other crop windows
    before = sha(first)
    plan_slide = cellbatch.pipeline.plan_slide

    def plan_then_swap(*args, **kwargs):
        plan = plan_slide(*args, **kwargs)
        os.replace(other, first)
        return plan

    monkeypatch.setattr(cellbatch.pipeline, "plan_slide", plan_then_swap)
    assert convert([tmp_path / "in"], tmp_path / "out", **TOY).exit_code == 0
    monkeypatch.setattr(cellbatch.pipeline, "plan_slide", plan_slide)
    prov = json.loads((tmp_path / "out" / "s" / "provenance.json").read_text())
    entry = next(i for i in prov["inputs"] if i["path"] == f"s/{first.name}")
    assert entry["sha256"] == sha(first) != before
    assert entry["bytes"] == first.stat().st_size
    rows = [r for r in csv.DictReader(open(tmp_path / "out" / "s" / "cells.csv")) if r["source"].endswith(first.name)]
    decoded = DarkBlobDetector(DetectSettings(cell_diameter=60.0))(iio.imread(first))
    assert sorted(float(r["cx"]) for r in rows) == pytest.approx(sorted(c.cx for c in decoded.cells), abs=1e-3)
    # the file now holds what was decoded: a rerun keeps it, even though its stat is not the planned one
    assert statuses(convert([tmp_path / "in"], tmp_path / "out", **TOY)) == {"s": "skipped"}


def test_unchanged_rerun_skips_without_reading_a_capture(tmp_path, reads, trust_fresh_stats):
    write_slides(tmp_path / "in", slides={"a": 3, "b": 2})
    convert([tmp_path / "in"], tmp_path / "out", **TOY)
    reads.clear()
    assert statuses(convert([tmp_path / "in"], tmp_path / "out", **TOY)) == {"a": "skipped", "b": "skipped"}
    assert reads == []


def test_recently_written_inputs_are_hashed_before_a_skip(tmp_path, reads, monkeypatch):
    """A stat taken within RACY_SECONDS of a write is not trusted: the rerun reads, then skips."""
    monkeypatch.setattr(cellbatch.read, "RACY_SECONDS", 3600.0)  # however slow the machine, "recent"
    write_slides(tmp_path / "in", slides={"a": 2})
    convert([tmp_path / "in"], tmp_path / "out", **TOY)
    reads.clear()
    assert statuses(convert([tmp_path / "in"], tmp_path / "out", **TOY)) == {"a": "skipped"}
    assert len(reads) == 2


def test_copied_inputs_are_hashed_and_skipped_when_their_content_is_unchanged(tmp_path, reads, trust_fresh_stats):
    write_slides(tmp_path / "in", slides={"a": 2})
    convert([tmp_path / "in"], tmp_path / "out", **TOY)
    shutil.copytree(tmp_path / "in", tmp_path / "copy", copy_function=shutil.copy2)
    shutil.rmtree(tmp_path / "in")
    (tmp_path / "copy").rename(tmp_path / "in")
    reads.clear()
    assert statuses(convert([tmp_path / "in"], tmp_path / "out", **TOY)) == {"a": "skipped"}
    assert len(reads) == 2  # hashed once to compare, never decoded


def test_capture_rewritten_with_its_old_size_and_mtime_is_redone(tmp_path, trust_fresh_stats):
    paths = write_slides(tmp_path / "in", slides={"a": 2})
    convert([tmp_path / "in"], tmp_path / "out", **TOY)
    info = paths[0].stat()
    data = bytearray(paths[0].read_bytes())
    data[-20] ^= 0xFF  # inside the PNG's last chunk: same size, other bytes
    paths[0].write_bytes(bytes(data))
    os.utime(paths[0], ns=(info.st_atime_ns, info.st_mtime_ns))
    report = convert([tmp_path / "in"], tmp_path / "out", **TOY)
    assert statuses(report) != {"a": "skipped"}
    prov = json.loads((tmp_path / "out" / "a" / "provenance.json").read_text())
    assert prov["inputs"][0]["sha256"] == sha(paths[0])


def test_a_task_carries_its_capture_references_not_the_slide(tmp_path):
    write_slides(tmp_path / "in", slides={"big": 400})
    submitted: list[tuple] = []

    class Recorder:
        def submit(self, fn, *args, **kwargs):
            submitted.append(args)
            return None

    slide, name = next(cellbatch.pipeline.slide_names([tmp_path / "in"]))
    plan = cellbatch.pipeline.plan_slide(slide, name, tmp_path / "out", cellbatch.pipeline.RunSettings(), {})
    jobs = cellbatch.pipeline.schedule(Recorder(), iter([plan]), cellbatch.pipeline.RunSettings(), window=10**6)
    for _ in jobs:
        break
    per_task = cellbatch.pipeline.RunSettings().chunk_captures
    assert len(submitted) == 400 // per_task
    sizes = [len(pickle.dumps(args)) for args in submitted]
    # a task's own references and the settings, ~0.2 kB a reference; the slide's 400 paths would be ~30 kB
    assert max(sizes) < 1_000 + 250 * per_task
    assert not any(isinstance(a, cellbatch.read.Slide) for args in submitted for a in args)


def _killed(*args, **kwargs):
    from distributed.scheduler import KilledWorker

    raise KilledWorker("task", SimpleNamespace(address="tcp://127.0.0.1:1"), 3)


def test_lost_worker_while_hashing_redoes_the_slide(tmp_path, monkeypatch):
    paths = write_slides(tmp_path / "in", slides={"a": 2, "b": 2})
    convert([tmp_path / "in"], tmp_path / "out", **TOY)
    for path in paths:
        os.utime(path)  # a new stat: the rerun must hash to know the content is unchanged
    monkeypatch.setattr(cellbatch.pipeline, "hash_captures", _killed)
    report = convert([tmp_path / "in"], tmp_path / "out", **TOY)
    assert statuses(report) == {"a": "done", "b": "done"}
    assert json.loads((tmp_path / "out" / "run.json").read_text())["exit_code"] == 0


def test_lost_worker_while_extracting_fails_its_captures_and_the_run_goes_on(tmp_path, monkeypatch):
    write_slides(tmp_path / "in", slides={"a": 2, "b": 2})
    extract_chunk = cellbatch.extract.extract_chunk

    def killed_on_b(refs, settings):
        if refs[0].source.startswith("b/"):
            _killed()
        return extract_chunk(refs, settings)

    monkeypatch.setattr(cellbatch.pipeline, "extract_chunk", killed_on_b)
    report = convert([tmp_path / "in"], tmp_path / "out", **TOY)
    assert statuses(report) == {"a": "done", "b": "failed"}
    assert report.exit_code == ExitCode.INPUTS_FAILED
    saved = json.loads((tmp_path / "out" / "run.json").read_text())
    assert saved["exit_code"] == ExitCode.INPUTS_FAILED and "KilledWorker" in json.dumps(saved["failures"])


class _LostFuture:
    def result(self):
        _killed()


class _LostClient:
    def submit(self, *args, **kwargs):
        return _LostFuture()

    def scheduler_info(self, **kwargs):
        return {"workers": {}}


def test_lost_generator_worker_fails_its_slide_and_the_run_goes_on(tmp_path, monkeypatch):
    from cellbatch.errors import WorkerLostError
    from cellbatch.generate import ClusterGenerator, Generator
    from cellbatch.stages import Transfer
    from tests.models import Identity, save_generator

    model = Generator.load(save_generator(Identity(), tmp_path / "id.pt"), device="cpu")
    with pytest.raises(WorkerLostError, match="KilledWorker"):
        batch = Transfer("cpu").upload(np.zeros((1, 256, 256, 3), np.uint8), np.zeros((1, 256, 256), np.uint8))
        ClusterGenerator(model, _LostClient(), device="cpu")(batch)

    write_slides(tmp_path / "in", slides={"a": 2, "b": 2})
    calls = []

    def lost_on_second_slide(batch):
        calls.append(len(batch))
        if len(calls) > 1:
            raise WorkerLostError("the generator task failed on the cluster: KilledWorker: ...")
        return batch.with_output(batch.image, "generated")

    monkeypatch.setattr(Generator, "__call__", lambda self, batch: lost_on_second_slide(batch))
    report = convert([tmp_path / "in"], tmp_path / "out", model=tmp_path / "id.pt", **TOY)
    assert statuses(report) == {"a": "done", "b": "failed"}
    saved = json.loads((tmp_path / "out" / "run.json").read_text())
    assert saved["exit_code"] == ExitCode.INPUTS_FAILED
