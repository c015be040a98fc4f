"""Kill real runs with SIGKILL at random moments; the rerun must finish the work byte for byte."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

STAGING = ".cellbatch-staging"


def _start(src: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cellbatch", "run", str(src), "-o", str(out), "--quiet",
                             "--batch-size", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _slide_dirs(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.rglob("cells.csv") if STAGING not in p.parts)


def _files(slide: Path) -> dict[str, bytes]:
    files = {"cells.csv": (slide / "cells.csv").read_bytes()}
    for path in sorted((slide / "cells.zarr").rglob("*")):
        if path.is_file():
            files[path.relative_to(slide).as_posix()] = path.read_bytes()
    return files


def test_killed_runs_leave_no_partial_slide_and_the_rerun_matches(tmp_path):
    from cellbatch.synth import write_synth

    src = tmp_path / "slides"
    for i in range(6):
        write_synth(tmp_path / f"s{i}", count=3, seed=i, looks=("dm1200",))
        (tmp_path / f"s{i}" / "dm1200").rename(src / f"slide{i}" if src.exists() else _mk(src) / f"slide{i}")
    reference = tmp_path / "reference"
    done = subprocess.run([sys.executable, "-m", "cellbatch", "run", str(src), "-o", str(reference), "--quiet",
                           "--batch-size", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = {p.name: _files(p) for p in _slide_dirs(reference)}
    assert len(expected) == 6

    out = tmp_path / "out"
    rng = random.Random(7)
    kills = 0
    for _ in range(4):
        proc = _start(src, out)
        time.sleep(rng.uniform(1.5, 6.0))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        for slide in _slide_dirs(out):  # whatever is visible is complete
            assert (slide / "provenance.json").is_file() and (slide / "cells.zarr" / "zarr.json").is_file()
    assert kills >= 2, "the runs finished before they could be killed; the test needs slower runs"
    final = subprocess.run([sys.executable, "-m", "cellbatch", "run", str(src), "-o", str(out), "--quiet",
                            "--batch-size", "2"], capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    got = {p.name: _files(p) for p in _slide_dirs(out)}
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == expected[name], f"slide {name} differs from the uninterrupted run"
    assert not any((out / STAGING).iterdir()) if (out / STAGING).exists() else True


def _mk(path: Path) -> Path:
    path.mkdir(parents=True)
    return path
