"""``--scheduler``: the same run on a real Dask cluster (scheduler and worker processes on localhost)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr


@pytest.fixture
def cluster(tmp_path):
    scheduler_file = tmp_path / "scheduler.json"
    common = ["--no-dashboard"]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
         "--scheduler-file", str(scheduler_file), *common],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert scheduler_file.exists(), "the dask scheduler did not start"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(scheduler_file),
             "--nthreads", "2", "--nworkers", "1", "--resources", "GPU=1", *common],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))
        address = json.loads(scheduler_file.read_text())["address"]
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(1, timeout=60)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _cellbatch(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellbatch", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_run_on_a_dask_cluster_matches_the_local_run(tmp_path, cluster):
    from cellbatch.synth import write_synth

    write_synth(tmp_path / "synth", count=6, seed=3, looks=("dm1200",))
    src = tmp_path / "synth" / "dm1200"
    local = _cellbatch("run", src, "-o", tmp_path / "local", "--quiet")
    remote = _cellbatch("run", src, "-o", tmp_path / "remote", "--quiet", "--scheduler", cluster)
    assert local.returncode == 0, local.stderr
    assert remote.returncode == 0, remote.stderr
    rows = [list(csv.DictReader(open(tmp_path / out / "dm1200" / "cells.csv"))) for out in ("local", "remote")]
    assert rows[0] == rows[1] and len(rows[0]) >= 6
    crops = [zarr.open_group(str(tmp_path / out / "dm1200" / "cells.zarr"), mode="r")["crop"][:]
             for out in ("local", "remote")]
    assert np.array_equal(*crops)
    prov = json.loads((tmp_path / "remote" / "dm1200" / "provenance.json").read_text())
    assert prov["parameters"]["scheduler"] == cluster


def test_unreachable_scheduler_is_a_one_line_error(tmp_path):
    (tmp_path / "in").mkdir()
    result = _cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--scheduler", "tcp://127.0.0.1:9")
    assert result.returncode == 3
    assert "tcp://127.0.0.1:9" in result.stderr and "Traceback" not in result.stderr


def test_generator_runs_on_the_workers_that_declare_a_gpu(tmp_path, cluster):
    from cellbatch.synth import write_synth
    from tests.models import Negate, save_generator

    write_synth(tmp_path / "synth", count=2, seed=4, looks=("dm1200",))
    model = save_generator(Negate(), tmp_path / "neg.pt")
    result = _cellbatch("run", tmp_path / "synth" / "dm1200", "-o", tmp_path / "out", "--quiet", "--model", model,
                        "--scheduler", cluster, "--device", "auto")
    assert result.returncode == 0, result.stderr
    group = zarr.open_group(str(tmp_path / "out" / "dm1200" / "cells.zarr"), mode="r")
    assert np.array_equal(group["generated"][:], 255 - group["crop"][:])
    prov = json.loads((tmp_path / "out" / "dm1200" / "provenance.json").read_text())
    assert prov["model"]["ran_on"], "the generator did not run on the GPU worker"


def test_local_worker_processes_give_the_threaded_result(tmp_path):
    from cellbatch.synth import write_synth

    write_synth(tmp_path / "synth", count=4, seed=5, looks=("dm1200",))
    src = tmp_path / "synth" / "dm1200"
    threads = _cellbatch("run", src, "-o", tmp_path / "threads", "--quiet")
    procs = _cellbatch("run", src, "-o", tmp_path / "procs", "--quiet", "--processes", "2")
    assert threads.returncode == 0 and procs.returncode == 0, procs.stderr
    rows = [(tmp_path / out / "dm1200" / "cells.csv").read_bytes() for out in ("threads", "procs")]
    assert rows[0] == rows[1]
