"""``--shard I/N`` and per-slide claims (cellbatch.shard): several real processes fill one OUT."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cellbatch.errors import ConfigError
from cellbatch.schemas import validate
from cellbatch.shard import parse_shard, shard_of
from cellbatch.synth import write_synth

SLIDES = [f"slide-{i}" for i in range(6)]


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six slides of two synthetic captures each."""
    folder = tmp_path_factory.mktemp("shard")
    synth = write_synth(folder / "synth", count=2 * len(SLIDES), seed=4, looks=("dm1200",))
    captures = sorted((synth / "dm1200").glob("*.png"))
    for i, name in enumerate(SLIDES):
        (folder / "in" / name).mkdir(parents=True)
        for path in captures[2 * i : 2 * i + 2]:
            shutil.copy(path, folder / "in" / name / path.name)
    return folder / "in"


@pytest.fixture(scope="module")
def single(src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same slides converted by one ordinary run."""
    out = tmp_path_factory.mktemp("single") / "out"
    done = _run(src, out).communicate(timeout=600)
    assert json.loads(done[0])["exit_code"] == 0, done[1]
    return out


def _run(src: Path, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cellbatch", "run", str(src), "-o", str(out), "-q", "--json",
                             "--workers", "1", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen]) -> list[dict]:
    summaries = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
        summaries.append(json.loads(stdout))
    return summaries


def _status(summary: dict) -> dict[str, str]:
    return {s["name"]: s["status"] for s in summary["slides"]}


def test_shard_is_parsed_and_splits_names_deterministically() -> None:
    assert parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ConfigError, match="not I/N"):
            parse_shard(bad)
    names = [f"patient{i}/slide{j}" for i in range(20) for j in range(5)]
    shards = [shard_of(n, 4) for n in names]
    assert shards == [shard_of(n, 4) for n in names]  # the same every time
    assert sorted(set(shards)) == [0, 1, 2, 3] and max(shards.count(s) for s in range(4)) < 40


def test_two_concurrent_shards_fill_one_out_like_a_single_run(src: Path, single: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first, second = _finish([_run(src, out, "--shard", "0/2"), _run(src, out, "--shard", "1/2")])
    assert set(_status(first)) | set(_status(second)) == set(SLIDES)
    assert not set(_status(first)) & set(_status(second))
    assert {shard_of(n, 2) for n in _status(first)} == {0}

    merged = json.loads((out / "run.json").read_text())
    validate(merged, "run")
    assert _status(merged) == dict.fromkeys(SLIDES, "done") and merged["exit_code"] == 0
    for name in SLIDES:
        assert (out / name / "cells.csv").read_bytes() == (single / name / "cells.csv").read_bytes()
        key = json.loads((out / name / "provenance.json").read_text())["content_key"]
        assert key == json.loads((single / name / "provenance.json").read_text())["content_key"]
    crate = json.loads((out / "ro-crate-metadata.json").read_text())
    actions = {e["@id"] for e in crate["@graph"] if e.get("@type") == "CreateAction"}
    assert actions == {f"#slide/{name}" for name in SLIDES}


def test_two_concurrent_runs_of_one_shard_never_write_a_slide_twice(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summaries = _finish([_run(src, out, "--shard", "0/1"), _run(src, out, "--shard", "0/1")])
    done = [{n for n, s in _status(summary).items() if s == "done"} for summary in summaries]
    assert done[0] | done[1] == set(SLIDES)
    assert not done[0] & done[1], "a slide was written by both runs"
    for summary in summaries:  # the other run's slides: claimed by it, or already done by it
        assert all(s == "skipped" for n, s in _status(summary).items() if s != "done")
    assert _status(json.loads((out / "run.json").read_text())) == dict.fromkeys(SLIDES, "done")


HOLD_CLAIM = textwrap.dedent("""
    import sys, time
    from cellbatch.shard import SlideClaims
    with SlideClaims(sys.argv[1], (0, 1)) as claims:
        assert claims.claim(sys.argv[2]) is None
        print("held", flush=True)
        time.sleep(600)
""")


def test_a_live_claim_is_left_alone_and_a_dead_one_is_taken_over(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_CLAIM, str(out), "slide-3"], stdout=subprocess.PIPE,
                              text=True, env={**os.environ})
    try:
        assert holder.stdout.readline().strip() == "held"
        (summary,) = _finish([_run(src, out, "--shard", "0/1")])
        entry = next(s for s in summary["slides"] if s["name"] == "slide-3")
        assert entry["status"] == "skipped" and f"pid {holder.pid}" in entry["reason"]
        assert not (out / "slide-3").exists()
        assert sum(s == "done" for s in _status(summary).values()) == len(SLIDES) - 1
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    (again,) = _finish([_run(src, out, "--shard", "0/1")])
    assert _status(again)["slide-3"] == "done"  # the killed holder's claim was released by the OS
    assert (out / "slide-3" / "cells.csv").is_file()


def test_a_run_without_shard_refuses_an_out_that_shards_are_filling(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    script = ("import sys, time\nfrom cellbatch.lock import RunLock\nwith RunLock(sys.argv[1], shared=True):\n"
              "    print('held', flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = _run(src, out)
        _, stderr = refused.communicate(timeout=600)
        assert refused.returncode == 3 and "is in use by" in stderr
        (summary,) = _finish([_run(src, out, "--shard", "0/1")])  # another shard is welcome
        assert set(_status(summary).values()) == {"done"}
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
