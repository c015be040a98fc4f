"""examples/slurm: the worker job script in the README is what dask-jobqueue makes of cluster.py's
settings, and the array job script fills one OUT from concurrent tasks."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cellbatch.synth import write_synth

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "examples" / "slurm"


def _documented_job_script() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### On a SLURM cluster"):]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return next(b for b in blocks if b.startswith("#!/usr/bin/env bash\n\n#SBATCH"))


def test_documented_worker_job_script_is_what_dask_jobqueue_makes() -> None:
    spec = importlib.util.spec_from_file_location("slurm_cluster", SLURM / "cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # any free port here (the documented 8786 may be taken on a shared machine); the host is this one
    with module.make_cluster(scheduler_options={"port": 0, "dashboard_address": ":0"}) as cluster:
        script = cluster.job_script()
    script = re.sub(r"tcp://\S+", "tcp://SCHEDULER-HOST:8786", script)
    assert script.strip() == _documented_job_script().strip()


@pytest.mark.slow
def test_array_job_tasks_run_concurrently_fill_one_out(tmp_path: Path) -> None:
    synth = write_synth(tmp_path / "synth", count=4, seed=9, looks=("dm1200",))
    for i, path in enumerate(sorted((synth / "dm1200").glob("*.png"))):
        (tmp_path / "in" / f"slide-{i}").mkdir(parents=True)
        shutil.copy(path, tmp_path / "in" / f"slide-{i}" / path.name)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_CPUS_PER_TASK": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    tasks = [subprocess.Popen(["bash", str(SLURM / "array.sbatch"), str(tmp_path / "in"), str(out)],
                              env={**env, "SLURM_ARRAY_TASK_ID": str(i)}, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for task in tasks:
        _, stderr = task.communicate(timeout=600)
        assert task.returncode == 0, stderr
    run = json.loads((out / "run.json").read_text())
    assert {s["name"]: s["status"] for s in run["slides"]} == {f"slide-{i}": "done" for i in range(4)}
    own = [json.loads(Path(f"{out}.task-{i}.json").read_text()) for i in range(2)]
    assert sorted(s["name"] for summary in own for s in summary["slides"]) == [f"slide-{i}" for i in range(4)]
