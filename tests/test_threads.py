"""One thread budget for every command: where the core count comes from and how it is shared out."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cellbatch.threads import (
    PROCESS_MIN_CAPTURES,
    PROCESS_MIN_CORES_BESIDE_CPU_GENERATOR,
    available_cores,
    cgroup_cpu_quota,
    omp_threads,
    thread_budget,
    worker_processes,
)

FOUR = {0, 1, 2, 3}


def v2(tmp_path: Path, limits: dict[str, str], path: str = "/user.slice/job") -> dict:
    root = tmp_path / "cgroup"
    for folder, limit in limits.items():
        (root / folder.lstrip("/")).mkdir(parents=True, exist_ok=True)
        (root / folder.lstrip("/") / "cpu.max").write_text(limit + "\n")
    (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"0::{path}\n")
    return {"cgroup_root": root, "proc_cgroup": proc}


def test_affinity_gives_the_cores_without_a_quota(tmp_path):
    files = v2(tmp_path, {"/": "max 100000"})
    assert available_cores(affinity=FOUR, **files) == (4, "affinity")


def test_cgroup_v2_quota_lowers_the_cores_rounded_up(tmp_path):
    files = v2(tmp_path, {"/user.slice/job": "150000 100000"})
    assert cgroup_cpu_quota(**files) == 2
    assert available_cores(affinity=FOUR, **files) == (2, "cgroup")


def test_a_parent_cgroup_limit_applies_to_its_children(tmp_path):
    files = v2(tmp_path, {"/user.slice": "100000 100000", "/user.slice/job": "max 100000"})
    assert available_cores(affinity=FOUR, **files) == (1, "cgroup")


def test_a_quota_above_the_affinity_changes_nothing(tmp_path):
    files = v2(tmp_path, {"/user.slice/job": "800000 100000"})
    assert available_cores(affinity=FOUR, **files) == (4, "affinity")


def test_cgroup_v1_quota_is_read(tmp_path):
    root = tmp_path / "cgroup"
    folder = root / "cpu,cpuacct" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("300000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n")
    assert cgroup_cpu_quota(cgroup_root=root, proc_cgroup=proc) == 3
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(cgroup_root=root, proc_cgroup=proc) is None


def test_unreadable_cgroup_files_mean_no_quota(tmp_path):
    assert cgroup_cpu_quota(cgroup_root=tmp_path / "absent", proc_cgroup=tmp_path / "absent") is None


def test_threads_option_wins_over_affinity_and_quota(tmp_path):
    files = v2(tmp_path, {"/user.slice/job": "100000 100000"})
    assert available_cores(3, affinity=FOUR, **files) == (3, "--threads")
    with pytest.raises(ValueError):
        available_cores(0)


@pytest.mark.parametrize(("value", "expected"), [("1", 1), ("4,2", 4), ("", None), ("0", None), ("x", None)])
def test_omp_num_threads_is_parsed(value, expected):
    assert omp_threads({"OMP_NUM_THREADS": value}) == expected


def test_run_gives_the_stages_every_core_on_a_cpu_and_one_beside_a_gpu(tmp_path):
    files = v2(tmp_path, {"/": "max 100000"})
    cpu = thread_budget(command="run", device="cpu", environ={}, affinity=set(range(8)), **files)
    # two stage threads of four torch threads: every core, in threads that do not wait for each other
    assert (cpu.cores, cpu.dask_workers, cpu.stage_threads, cpu.torch, cpu.opencv) == (8, 8, 2, 4, 1)
    gpu = thread_budget(command="run", device="cuda:0", environ={}, affinity=set(range(8)), **files)
    assert (gpu.dask_workers, gpu.stage_threads, gpu.torch) == (8, 1, 1)
    remote = thread_budget(command="run", remote=True, environ={}, affinity=set(range(8)), **files)
    assert (remote.dask_workers, remote.stage_threads, remote.torch, remote.opencv) == (0, 2, 4, 8)
    remote_gpu = thread_budget(command="run", device="cuda", remote=True, environ={}, affinity=FOUR, **files)
    assert (remote_gpu.stage_threads, remote_gpu.torch) == (1, 4)
    two = thread_budget(command="run", environ={}, affinity={0, 1}, **files)
    assert (two.dask_workers, two.stage_threads, two.torch) == (2, 2, 1)  # the stages are the slower side
    one = thread_budget(command="run", environ={}, affinity={0}, **files)
    assert (one.dask_workers, one.stage_threads, one.torch) == (1, 1, 1)
    assert thread_budget(command="run", workers=3, environ={}, affinity=FOUR, **files).dask_workers == 3
    assert thread_budget(command="train", environ={}, affinity=FOUR, **files).stage_threads == 1


def test_worker_processes_take_their_cores_from_the_device_stages_on_a_cpu(tmp_path):
    files = v2(tmp_path, {"/": "max 100000"})
    sixteen = set(range(16))
    split = thread_budget(command="run", processes=4, environ={}, affinity=sixteen, **files)
    assert (split.dask_workers, split.stage_threads, split.torch) == (4, 2, 6)  # 4 + 2 x 6: every core, once
    # processes on every core: the stage threads still run, a core's worth each, as beside threads
    every = thread_budget(command="run", processes=2, environ={}, affinity={0, 1}, **files)
    assert (every.dask_workers, every.stage_threads, every.torch) == (2, 2, 1)
    gpu = thread_budget(command="run", device="cuda", processes=16, environ={}, affinity=sixteen, **files)
    assert (gpu.dask_workers, gpu.stage_threads, gpu.torch) == (16, 1, 1)  # torch only feeds the device


def test_omp_num_threads_caps_torch_and_opencv_not_the_workers(tmp_path):
    files = v2(tmp_path, {"/": "max 100000"})
    train = thread_budget(command="train", environ={"OMP_NUM_THREADS": "2"}, affinity=set(range(8)), **files)
    assert (train.torch, train.opencv, train.dask_workers) == (2, 2, 0)
    run = thread_budget(command="run", environ={"OMP_NUM_THREADS": "1"}, affinity=set(range(8)), **files)
    assert (run.torch, run.stage_threads, run.dask_workers) == (1, 2, 8)
    option = thread_budget(6, command="train", environ={"OMP_NUM_THREADS": "2"}, affinity=FOUR, **files)
    assert (option.cores, option.source, option.torch) == (6, "--threads", 2)


def test_run_records_the_budget_and_uses_it(tmp_path):
    from cellbatch.api import convert
    from cellbatch.registry import detectors
    from tests.scenes import DarkBlobDetector, write_slides

    detectors.register("blobs", DarkBlobDetector)
    write_slides(tmp_path / "in", slides={"s": 1})
    convert([tmp_path / "in"], tmp_path / "out", detector="blobs", cell_diameter=60.0, device="cpu", threads=1)
    parameters = json.loads((tmp_path / "out" / "s" / "provenance.json").read_text())["parameters"]
    assert (parameters["threads"], parameters["workers"]) == (1, 1)
    import torch

    assert torch.get_num_threads() == 1


def test_native_pools_are_quietened_unless_the_user_chose(monkeypatch):
    from cellbatch.threads import prepare_native_runtimes

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    prepare_native_runtimes("run")
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and os.environ["OPENBLAS_NUM_THREADS"] == "4"


def test_openmp_threads_keep_their_default_wait_where_torch_has_the_cores_to_itself(monkeypatch):
    from cellbatch.threads import prepare_native_runtimes

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    prepare_native_runtimes("train")
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the user's choice stands
    prepare_native_runtimes("train")
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_the_cli_sets_the_wait_policy_for_the_command_it_runs():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    policies = {}
    for command in ("run", "train"):
        code = (
            "import os\n"
            "from cellbatch.cli import cli\n"
            "try:\n"
            f"    cli.main(args=['{command}', '--help'], standalone_mode=False)\n"
            "except SystemExit:\n"
            "    pass\n"
            "print(os.environ.get('OMP_WAIT_POLICY', 'unset'))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        policies[command] = out.stdout.strip().splitlines()[-1]
    assert policies == {"run": "PASSIVE", "train": "unset"}


def _refault_count(command: str, **env: str) -> int:
    """Page faults of allocating a block again after freeing it (64 MiB in the main thread, 40 MiB beside
    another in a second thread), the larger of the two, in a fresh process set up for ``command``."""
    import subprocess
    import sys

    code = (
        "import resource, sys\n"
        "import numpy as np\n"
        "from cellbatch.threads import prepare_native_runtimes\n"
        "prepare_native_runtimes(sys.argv[1])\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "def refaults(size):\n"
        "    block = np.ones(size, np.uint8)\n"
        "    del block\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    block = np.ones(size, np.uint8)\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "def refaults_beside(size, keep):\n"
        "    kept = np.ones(keep, np.uint8)\n"
        "    return refaults(size)\n"
        "print(refaults(64 * 2**20))\n"
        # in another thread, a block beside another (as a stage thread's activations): glibc's arena for
        # that thread holds at most 64 MiB a region, unmapped again as soon as its blocks are freed
        "print(ThreadPoolExecutor(1).submit(refaults_beside, 40 * 2**20, 40 * 2**20).result())\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code, command], env={**clean, **env}, capture_output=True,
                         text=True, check=True)
    main, thread = out.stdout.strip().splitlines()[-2:]
    return max(int(main), int(thread))


def test_a_run_reuses_freed_memory_unless_the_user_tuned_malloc():
    """glibc unmaps a freed large block (or trims a thread's arena) and faults a new one in page by page;
    a run keeps it for reuse, in every thread."""
    from cellbatch.threads import glibc

    if glibc() is None:
        pytest.skip("malloc tuning applies to glibc on Linux only")
    # 40 MiB is at least 20 faults however large the pages (2 MiB transparent huge pages at most)
    assert _refault_count("run") <= 4
    assert _refault_count("train") >= 16  # torch has the cores to itself there: left as it is
    assert _refault_count("run", MALLOC_TRIM_THRESHOLD_="131072") >= 16  # the user's own tuning stands


MALLOC_NAMES = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                "MALLOC_ARENA_MAX")


def test_worker_processes_keep_freed_memory_as_the_run_does(monkeypatch):
    """Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536: every capture faulted its memory in again."""
    from cellbatch.api import dask_client
    from cellbatch.threads import glibc

    if glibc() is None:
        pytest.skip("malloc tuning applies to glibc on Linux only")
    for name in MALLOC_NAMES:  # also undoes what Dask's nanny writes into this process's environment
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    with dask_client(None, None, processes=1) as client:
        seen = client.run(lambda: {name: os.environ.get(name) for name in MALLOC_NAMES})
    assert list(seen.values()) == [{"MALLOC_MMAP_MAX_": "0", "MALLOC_MMAP_THRESHOLD_": None,
                                    "MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_TOP_PAD_": None,
                                    "MALLOC_ARENA_MAX": "1"}]


def test_a_users_malloc_tuning_reaches_the_workers_as_it_is(monkeypatch):
    from cellbatch.threads import worker_malloc_environ

    for name in MALLOC_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert worker_malloc_environ() == {}
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")
    assert worker_malloc_environ() == {}


def _processes(processes="auto", *, cores=2, remote=False, generator_on_cpu=False, importable=True, captures=5000):
    def count():
        if captures is None:
            raise AssertionError("the inputs were listed although nothing else favoured processes")
        return captures

    return worker_processes(processes, cores=cores, remote=remote, generator_on_cpu=generator_on_cpu,
                            detector_importable=importable, captures=count)[0]


def test_auto_processes_only_when_the_cpu_stage_sets_the_pace_of_a_large_run():
    assert _processes() == 2
    assert _processes(cores=16) == 16
    assert _processes(captures=PROCESS_MIN_CAPTURES - 1) == 0  # start-up would eat the gain
    assert _processes(generator_on_cpu=True, captures=None) == 0  # the generator sets the pace on 2 cores
    assert _processes(cores=1, captures=None) == 0
    assert _processes(remote=True, captures=None) == 0
    assert _processes(importable=False, captures=None) == 0  # a run-time plugin is not there in a new process
    assert _processes(3, captures=None) == 3 and _processes(0, captures=None) == 0


def test_beside_a_cpu_generator_auto_processes_take_a_quarter_of_many_cores():
    # GIL-bound detection in threads sets the pace once the generator has the other cores
    assert _processes(cores=16, generator_on_cpu=True) == 4
    assert _processes(cores=PROCESS_MIN_CORES_BESIDE_CPU_GENERATOR, generator_on_cpu=True) == 2
    assert _processes(cores=PROCESS_MIN_CORES_BESIDE_CPU_GENERATOR - 1, generator_on_cpu=True, captures=None) == 0
    assert _processes(cores=16, generator_on_cpu=True, captures=PROCESS_MIN_CAPTURES - 1) == 0


def test_a_detector_registered_at_run_time_is_not_importable_in_workers():
    from cellbatch.registry import Registry

    registry = Registry("detectors")
    assert registry.importable_everywhere("threshold")
    registry.register("mine", "somewhere:Detector")
    assert not registry.importable_everywhere("mine")
    registry.register("threshold", "cellbatch.detect.threshold:ThresholdDetector")
    assert not registry.importable_everywhere("threshold")  # replaced at run time


def test_a_run_limits_a_blas_loaded_before_it_and_gives_it_back(tmp_path, monkeypatch):
    """numpy loaded its BLAS before the run (as in any program that imports numpy first): the run's
    tasks still see one BLAS thread, and the program has its own setting back afterwards."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from cellbatch.api import convert
    from cellbatch.registry import detectors
    from tests.scenes import DarkBlobDetector, write_slides

    seen: list[int] = []

    class RecordsBlas(DarkBlobDetector):
        def __call__(self, image):
            seen.extend(pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas")
            return super().__call__(image)

    if not [pool for pool in threadpool_info() if pool["user_api"] == "blas"]:
        pytest.skip("no BLAS loaded by numpy here")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    detectors.register("records-blas", RecordsBlas)
    write_slides(tmp_path / "in", slides={"s": 2})
    with threadpool_limits(limits=2, user_api="blas"):
        convert([tmp_path / "in"], tmp_path / "out", detector="records-blas", cell_diameter=60.0, device="cpu")
        after = {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}
    assert seen and set(seen) == {1}
    assert after == {2}
