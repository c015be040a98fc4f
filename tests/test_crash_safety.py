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
    # A live run renames and removes folders while rglob walks them (pathlib lets that FileNotFoundError
    # through): look again.
    while True:
        try:
            return sorted(p.parent for p in out.rglob("cells.csv") if STAGING not in p.parts)
        except FileNotFoundError:
            time.sleep(0.01)


def _files(slide: Path) -> dict[str, bytes]:
    files = {"cells.csv": (slide / "cells.csv").read_bytes()}
    for path in sorted((slide / "cells.zarr").rglob("*")):
        if path.is_file():
            files[path.relative_to(slide).as_posix()] = path.read_bytes()
    return files


def _kill_mid_run(src: Path, out: Path, rng: random.Random, n_slides: int) -> bool:
    """Start a run and SIGKILL it once a random number of slides are done (plus a random instant),
    so every kill lands while work remains, however fast the machine. True if it was killed."""
    done_before = len(_slide_dirs(out)) if out.exists() else 0
    target = rng.randint(done_before, max(done_before, n_slides - 2))
    proc = _start(src, out)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if out.exists() and len(_slide_dirs(out)) >= target:
            time.sleep(rng.uniform(0.0, 0.15))
            break
        time.sleep(0.02)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return killed


def test_killed_runs_leave_no_partial_slide_and_the_rerun_matches(tmp_path):
    from cellbatch.synth import write_synth

    n_slides = 8
    src = tmp_path / "slides"
    src.mkdir()
    for i in range(n_slides):
        write_synth(tmp_path / f"s{i}", count=5, seed=i, looks=("dm1200",))
        (tmp_path / f"s{i}" / "dm1200").rename(src / f"slide{i}")
    reference = tmp_path / "reference"
    done = subprocess.run([sys.executable, "-m", "cellbatch", "run", str(src), "-o", str(reference), "--quiet",
                           "--batch-size", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = {p.name: _files(p) for p in _slide_dirs(reference)}
    assert len(expected) == n_slides

    out = tmp_path / "out"
    rng = random.Random(7)
    kills_with_work_left = 0
    for _ in range(4):
        killed = _kill_mid_run(src, out, rng, n_slides)
        visible = _slide_dirs(out)
        for slide in visible:  # whatever is visible is complete
            assert (slide / "provenance.json").is_file() and (slide / "cells.zarr" / "zarr.json").is_file()
        kills_with_work_left += killed and len(visible) < n_slides
        if len(visible) == n_slides:
            break
    assert kills_with_work_left >= 1, "no run was killed before it finished; the test proves nothing"
    final = subprocess.run([sys.executable, "-m", "cellbatch", "run", str(src), "-o", str(out), "--quiet",
                            "--batch-size", "2"], capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    got = {p.name: _files(p) for p in _slide_dirs(out)}
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == expected[name], f"slide {name} differs from the uninterrupted run"
    staging = out / STAGING
    assert not staging.exists() or not any(staging.iterdir())
