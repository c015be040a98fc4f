"""``--scheduler``: the same run on a real Dask cluster (scheduler and worker processes on localhost)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr


class LocalDaskCluster:
    """A scheduler and worker processes on localhost, as ``dask scheduler`` and ``dask worker`` start them."""

    def __init__(self, folder):
        self.scheduler_file = folder / "scheduler.json"
        self.scheduler = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
             "--scheduler-file", str(self.scheduler_file), "--no-dashboard"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.workers: list[subprocess.Popen] = []
        deadline = time.monotonic() + 60
        self.address = ""
        while not self.address and time.monotonic() < deadline:
            try:  # the file may exist before the scheduler has written it
                self.address = json.loads(self.scheduler_file.read_text())["address"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.2)
        assert self.address, "the dask scheduler did not start"

    def add_worker(self) -> None:
        self.workers.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(self.scheduler_file),
             "--nthreads", "2", "--nworkers", "1", "--resources", "GPU=1", "--no-dashboard", "--no-nanny"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))
        self.wait_for_workers(1)

    def wait_for_workers(self, n: int) -> None:
        from distributed import Client

        with Client(self.address, timeout="30s") as client:
            deadline = time.monotonic() + 60
            while client.scheduler_info(n_workers=0)["n_workers"] != n and time.monotonic() < deadline:
                time.sleep(0.2)
            assert client.scheduler_info(n_workers=0)["n_workers"] == n

    def kill_workers(self) -> None:
        for proc in self.workers:
            proc.kill()
            proc.wait(timeout=20)
        self.workers.clear()
        self.wait_for_workers(0)

    def close(self) -> None:
        for proc in [*self.workers, self.scheduler]:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def live_cluster(tmp_path):
    cluster = LocalDaskCluster(tmp_path)
    try:
        cluster.add_worker()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def cluster(live_cluster):
    return live_cluster.address


def _cellbatch(*args, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellbatch", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


# Dask's own settings, for the cellbatch process only: give up on a connection, and on a cluster without
# workers, after a few seconds instead of 30 s and 5 minutes.
QUICK = {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "3s", "DASK_DISTRIBUTED__SCHEDULER__NO_WORKERS_TIMEOUT": "3s"}


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
    result = _cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--scheduler", "tcp://127.0.0.1:9", env=QUICK)
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


def test_beside_a_cpu_generator_many_cores_split_between_processes_and_the_generator(tmp_path, monkeypatch):
    """--threads 8 stands for an 8-core machine: 2 worker processes, the generator's stage threads the rest."""
    import torch

    from cellbatch import threads
    from cellbatch.api import convert
    from cellbatch.synth import write_synth
    from tests.models import Negate, save_generator

    monkeypatch.setattr(threads, "PROCESS_MIN_CAPTURES", 1)  # a small slide stands for a large run
    write_synth(tmp_path / "synth", count=3, seed=6, looks=("dm1200",))
    model = save_generator(Negate(), tmp_path / "neg.pt")
    torch_threads = torch.get_num_threads()
    try:
        report = convert(tmp_path / "synth" / "dm1200", tmp_path / "out", model=model, device="cpu", threads=8)
    finally:
        torch.set_num_threads(torch_threads)  # the budget of an 8-core machine is not this process's
    assert report.exit_code == 0
    log = (tmp_path / "out" / "run.log").read_text(encoding="utf-8")
    assert "CPU stage: 2 worker processes for 3 captures, 6 cores left to the generator" in log
    group = zarr.open_group(str(tmp_path / "out" / "dm1200" / "cells.zarr"), mode="r")
    assert group["crop"].shape[0] and np.array_equal(group["generated"][:], 255 - group["crop"][:])


@pytest.mark.parametrize("address", ["foo", "localhost", "http://127.0.0.1:8787", "inproc://x", "tcp://host:0"])
def test_scheduler_addresses_dask_cannot_use_are_bad_command_lines(tmp_path, capsys, address):
    from cellbatch.cli import main

    (tmp_path / "in").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--scheduler", address])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "tcp://HOST:PORT" in err
    assert not (tmp_path / "out").exists()


def test_a_port_that_speaks_http_times_out_with_exit_3(tmp_path):
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "in").mkdir()
    try:
        started = time.monotonic()
        result = _cellbatch("run", tmp_path / "in", "-o", tmp_path / "out", "--scheduler",
                            f"tcp://127.0.0.1:{server.server_port}", env=QUICK)
    finally:
        server.shutdown()
    assert result.returncode == 3, result.stderr
    assert "did not answer as a Dask scheduler within 3 s" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 120


def test_waiting_on_a_cluster_without_workers_ends(tmp_path):
    from distributed import Client, LocalCluster

    from cellbatch.cluster import result_or_lost
    from cellbatch.errors import ClusterLostError

    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as local, Client(local) as client:
        future = client.submit(sum, [1, 2])
        started = time.monotonic()
        with pytest.raises(ClusterLostError, match="has had no workers for 1 s"):
            result_or_lost(client, future, timeout=1)
        assert time.monotonic() - started < 30


def test_a_run_whose_cluster_lost_its_workers_ends_records_what_it_did_and_resumes(tmp_path, live_cluster):
    from cellbatch.read import RACY_SECONDS
    from tests.scenes import write_slides

    src = tmp_path / "in"
    write_slides(src, slides={"a": 2})
    # Files younger than RACY_SECONDS get no stat fingerprint, and a rerun then hashes them on the
    # cluster: wait, so that the second run skips slide a from its stat whatever the start-up time.
    time.sleep(RACY_SECONDS + 0.5)
    args = ("run", src, "-o", tmp_path / "out", "--quiet", "--scheduler", live_cluster.address, "--json")
    first = _cellbatch(*args, env=QUICK)
    assert first.returncode == 0, first.stderr
    write_slides(src, slides={"b": 2}, seed=1)
    live_cluster.kill_workers()
    lost = _cellbatch(*args, env=QUICK)
    assert lost.returncode == 3 and "Traceback" not in lost.stderr, lost.stderr
    assert "has had no workers for 3 s" in lost.stderr and lost.stderr.count("\n") == 1
    recorded = json.loads((tmp_path / "out" / "run.json").read_text())
    assert [(s["name"], s["status"]) for s in recorded["slides"]] == [("a", "skipped")]
    assert not (tmp_path / "out" / "b").exists()
    live_cluster.add_worker()
    resumed = _cellbatch(*args, env=QUICK)
    assert resumed.returncode == 0, resumed.stderr
    assert [(s["name"], s["status"]) for s in json.loads(resumed.stdout)["slides"]] == [("a", "skipped"),
                                                                                        ("b", "done")]
