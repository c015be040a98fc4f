"""examples/snakemake runs as it is, with the real Snakemake, and a rerun redoes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _snakemake(workdir: Path) -> subprocess.CompletedProcess:
    # `snakemake --cores 2` as the README says, from this interpreter's environment, where `cellbatch` lives.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_snakemake_example_runs_from_a_fresh_checkout_and_reruns_nothing(tmp_path: Path) -> None:
    for name in ("snakemake", "demo-model"):
        shutil.copytree(EXAMPLES / name, tmp_path / name, ignore=shutil.ignore_patterns("slides", "results",
                                                                                         ".snakemake"))
    workdir = tmp_path / "snakemake"

    first = _snakemake(workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    for slide in ("slide-a", "slide-b"):
        summary = json.loads((workdir / "results" / f"{slide}.json").read_text())
        assert summary["exit_code"] == 0
        assert summary["slides_by_status"] == {"done": 1}
        assert summary["cells"] > 0
        assert (workdir / "results" / slide / slide / "cells.csv").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in (workdir / "results").rglob("*") if p.is_file()}

    second = _snakemake(workdir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Nothing to be done" in second.stdout + second.stderr
    assert {p: p.stat().st_mtime_ns for p in (workdir / "results").rglob("*") if p.is_file()} == stamps
