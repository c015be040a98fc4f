"""How many threads each library gets: one decision per command, from the cores this process may use.

Torch's intra-op pool, OpenCV's pool and Dask's workers each size themselves to every core of the
machine by default; in one process on two cores that is three pools of two threads fighting, and
OpenMP threads that spin while they wait for each other (measured: ``run`` twice and ``train`` 24x
faster with ``OMP_NUM_THREADS=1`` on the 2-core development machine). :func:`thread_budget` decides
once, :func:`apply_budget` sets the libraries, :func:`prepare_native_runtimes` how their threads wait.

Cores available, first that applies:

1. ``--threads N`` (the ``threads`` argument);
2. the CPU affinity mask (``os.sched_getaffinity``: ``taskset``, Slurm, ``docker --cpuset-cpus``),
   lowered to the cgroup CPU quota (``cpu.max`` in cgroup v2, ``cpu.cfs_quota_us`` in v1:
   ``docker --cpus``, Kubernetes limits), rounded up.

``OMP_NUM_THREADS``, when set, caps torch's and OpenCV's threads (it is the user saying how wide
one parallel region may be); it does not shrink the Dask workers, which are separate tasks.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class ThreadBudget:
    """Threads per library for one command.

    Attributes
    ----------
    cores : int
        Cores this process may use.
    source : str
        Where ``cores`` came from: ``"--threads"``, ``"affinity"`` or ``"cgroup"``.
    torch : int
        Torch intra-op threads in each thread that runs torch (each stage thread, the main thread).
    opencv : int
        OpenCV threads in this process (Dask tasks always use 1: the workers are the parallelism).
    dask_workers : int
        Local Dask worker threads (or processes) for the CPU stage; 0 for a command without one.
    command : str
        The command the budget is for (``run``, ``train``, ...).
    stage_threads : int
        Threads of a run that apply the device stages (generator, normalisers, classifier) to
        batches, each batch in one of them; 1 outside ``run`` and with a GPU.
    """

    cores: int
    source: str
    torch: int
    opencv: int
    dask_workers: int
    command: str = "run"
    stage_threads: int = 1


def available_cores(
    threads: int | None = None,
    *,
    affinity: set[int] | None = None,
    cgroup_root: Path = CGROUP_ROOT,
    proc_cgroup: Path = Path("/proc/self/cgroup"),
) -> tuple[int, str]:
    """Cores this process may use and where that figure came from (see the module docstring)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        return threads, "--threads"
    cpus = affinity if affinity is not None else os.sched_getaffinity(0)
    cores, source = max(1, len(cpus)), "affinity"
    quota = cgroup_cpu_quota(cgroup_root=cgroup_root, proc_cgroup=proc_cgroup)
    if quota is not None and quota < cores:
        cores, source = quota, "cgroup"
    return cores, source


def cgroup_cpu_quota(*, cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Whole CPUs allowed by this process's cgroup quota (rounded up), or ``None`` when unlimited.

    cgroup v2: the smallest ``cpu.max`` from this process's cgroup up to the root (a parent's limit
    applies to its children). cgroup v1: ``cpu.cfs_quota_us / cpu.cfs_period_us`` of the cpu controller.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    limits: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # v2 unified hierarchy
            folder = cgroup_root / path.lstrip("/")
            while True:
                limits.extend(_v2_limit(folder / "cpu.max"))
                if folder == cgroup_root or cgroup_root not in folder.parents:
                    break
                folder = folder.parent
        elif "cpu" in controllers.split(","):
            for base in (cgroup_root / controllers, cgroup_root / "cpu,cpuacct", cgroup_root / "cpu"):
                found = _v1_limit(base / path.lstrip("/"))
                if found is not None:
                    limits.append(found)
                    break
    if not limits and not lines:
        limits.extend(_v2_limit(cgroup_root / "cpu.max"))
    return max(1, math.ceil(min(limits) - 1e-9)) if limits else None


def _v2_limit(path: Path) -> list[float]:
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return []
    if quota == "max":
        return []
    try:
        return [int(quota) / int(period)]
    except (ValueError, ZeroDivisionError):
        return []


def _v1_limit(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def omp_threads(environ: Mapping[str, str] | None = None) -> int | None:
    """``OMP_NUM_THREADS`` as a positive int (its first value when it lists nesting levels), else None."""
    value = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "")
    try:
        threads = int(value.split(",")[0])
    except ValueError:
        return None
    return threads if threads >= 1 else None


def thread_budget(
    threads: int | None = None,
    *,
    command: str = "run",
    device: str = "cpu",
    remote: bool = False,
    workers: int | None = None,
    processes: int = 0,
    environ: Mapping[str, str] | None = None,
    affinity: set[int] | None = None,
    cgroup_root: Path = CGROUP_ROOT,
    proc_cgroup: Path = Path("/proc/self/cgroup"),
) -> ThreadBudget:
    """Decide the threads of every library for ``command`` (``run``, ``train``, ``classifier``, ``fit``).

    ``run``: the CPU stage (Dask) gets one worker per core (``workers`` overrides); its tasks run
    OpenCV single-threaded. With the device stages on the CPU (the slower side there), every core
    goes to them, as :data:`CPU_STAGE_THREADS` stage threads (fewer on fewer cores) that each apply
    the stages to a whole batch with their share of the cores as torch threads. With a GPU there is one
    stage thread, with one torch thread (torch only feeds the device), or with every core when the
    CPU stage runs on a remote cluster (``remote``). With the CPU stage in ``processes`` local worker
    processes (:func:`worker_processes`) those take a core each, and the device stages on the CPU share
    the cores left. Other commands have no
    Dask stage: torch and OpenCV get every core. ``OMP_NUM_THREADS`` caps torch (per stage thread)
    and OpenCV.
    """
    cores, source = available_cores(threads, affinity=affinity, cgroup_root=cgroup_root, proc_cgroup=proc_cgroup)
    stage_threads = 1
    if command == "run":
        dask_workers = 0 if remote else (processes or workers or cores)
        if device.startswith("cuda"):
            torch_threads = cores if remote else 1
        else:
            # worker processes on (nearly) every core leave the stage threads one core each to share
            left = max(min(CPU_STAGE_THREADS, cores), cores - processes)
            stage_threads = min(CPU_STAGE_THREADS, left)
            torch_threads = left // stage_threads
    else:
        dask_workers, torch_threads = 0, cores
    cap = omp_threads(environ)
    if cap is not None:
        torch_threads = min(torch_threads, cap)
    # cv2.setNumThreads is process-wide: with the CPU stage in local threads, its tasks' 1 is everyone's
    opencv = 1 if dask_workers else min(cores, cap or cores)
    return ThreadBudget(cores=cores, source=source, torch=torch_threads, opencv=opencv, dask_workers=dask_workers,
                        command=command, stage_threads=stage_threads)


# Device stages on a CPU run in this many threads, a whole batch each, rather than one batch at a
# time over every core: torch's threads wait for each other at the end of every operation, so while
# one of them shares its core with the CPU stage or the writer the others idle (a run kept 1.55-1.64
# of 2 cores busy). Two stage threads of one torch thread each, measured on the 2-core machine
# (400-capture runs, thesis-size generator, bf16, HM, display, classifier; six alternated rounds,
# docs/devices.md): whole run 15.8-21.1 against 18.8-25.3 ms a cell, 1.79-1.89 cores busy; the
# stages alone 10.7-10.9 against 12.0-12.9 ms a cell. Two, not one per core: each thread holds a
# batch's activations (about 0.7 GB for a thesis-size generator at bf16), and larger machines are
# unmeasured.
CPU_STAGE_THREADS = 2


def prepare_native_runtimes(command: str) -> None:
    """Set how the native thread pools behave in ``command``, before they load, unless the user set it.

    In ``run`` OpenMP threads sleep, not spin, while they wait (``OMP_WAIT_POLICY=PASSIVE``): torch
    shares the cores with the CPU stage's threads there, and spinning threads take the cores those
    need (measured on the 2-core machine, a 400-capture run with the generator: 12.7-14.8 s passive
    against 16.7-17.5 s spinning, and 24-26 against 37-39 CPU-s). Every other command has torch to
    itself and keeps OpenMP's default (spin a little, then sleep): a training step of the CPU recipe
    took 115-120 ms with sleeping threads and 52-58 ms with the default, which wakes a waiting thread
    without a system call for each of a small network's hundreds of parallel regions.
    numpy's OpenBLAS gets one thread (``OPENBLAS_NUM_THREADS=1``): it only sees small matrices here
    (the detector's circle fit, HM's colour features), from every Dask task at once. This reaches
    only runtimes not yet loaded: the CLI calls it before any command imports numpy or torch.
    """
    if command == "run":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # Torch's CPU allocator asks for transparent huge pages for its large blocks: a generator's
    # activations are tens of MB, freshly mapped on every batch, and faulting them in 4 KiB pages cost
    # more than the arithmetic (measured on the 2-core machine: thesis-size generator in bf16,
    # 10.5 -> 7.5 ms a crop with 2 threads, 18 -> 14.5 with one). Read once, at the first allocation.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if command == "run":
        keep_freed_memory()


# glibc's mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# Free memory at the top of the heap is given back to the kernel only above this: more than a
# batch's working set (a thesis-size generator's batch of 16 peaks at about 0.7 GB in bf16).
_KEEP_FREED_BYTES = 1 << 30
_MALLOC_ENVIRONMENT = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                       "MALLOC_ARENA_MAX")


def glibc() -> ctypes.CDLL | None:
    """This process's C library when it is glibc on Linux (the one whose malloc takes these parameters), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve every block from its heap and keep freed memory for reuse; True if set.

    By default glibc maps each large block (above a threshold of at most 32 MiB) afresh and unmaps it
    when it is freed, and trims the heap's free top: every batch of a run then faults its activations,
    concatenations and crop stacks in again, page by page, while the CPU stage's threads and the
    writer fault into the same address space. Kept instead, a 400-capture run with the thesis-size
    generator on the 2-core machine took 21.6-23.7 ms a cell against 22.9-30.7, with 9-51 page faults
    a cell against 310-384 (three alternated pairs of processes, two runs each; docs/devices.md);
    training steps did not change, so ``train`` is left alone.

    Every thread allocates from that one heap (one arena): glibc would give each thread its own,
    64 MiB regions that are trimmed as blocks are freed, so the stage threads, which allocate a
    batch's activations each, faulted them in again on every batch (76 faults a cell in those
    threads, 0 with one arena; docs/devices.md, "Stage threads").

    This holds for the whole process, for as long as it runs (freed memory is reused, not returned,
    up to 1 GiB). Left alone where the user set any ``MALLOC_*`` tunable or a ``glibc.malloc`` one
    in ``GLIBC_TUNABLES``, and off glibc.
    """
    libc = glibc()
    if libc is None or _malloc_tuned_by_user():
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(option, value) for option, value in (
        (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES), (_M_ARENA_MAX, 1)))


def worker_malloc_environ() -> dict[str, int]:
    """The environment that gives a spawned worker process the malloc :func:`keep_freed_memory` gives a run.

    Dask's nanny starts each worker with ``MALLOC_TRIM_THRESHOLD_=65536``, so a worker gave its freed
    memory back after every capture and faulted it in again for the next: about 1,390 page faults a
    capture against 140-147 with this environment, and the CPU stage in worker processes read,
    detected and cropped JPEG captures 25-45 % faster (1 process 146-156 -> 182-223 captures/s,
    2 processes 245-288 -> 328-378; fresh processes alternated, 2-core machine, docs/devices.md).
    Empty where the user tuned malloc (their setting reaches the workers as it is) and off glibc.
    """
    if glibc() is None or _malloc_tuned_by_user():
        return {}
    return {"MALLOC_MMAP_MAX_": 0, "MALLOC_TRIM_THRESHOLD_": _KEEP_FREED_BYTES, "MALLOC_ARENA_MAX": 1}


def _malloc_tuned_by_user() -> bool:
    return (any(name in os.environ for name in _MALLOC_ENVIRONMENT)
            or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""))


def apply_budget(budget: ThreadBudget) -> None:
    """Set torch's and OpenCV's thread counts in this process (see :func:`prepare_native_runtimes` too)."""
    prepare_native_runtimes(budget.command)
    import cv2
    import torch

    torch.set_num_threads(budget.torch)
    cv2.setNumThreads(budget.opencv)


def blas_threads_limited() -> AbstractContextManager:
    """A context in which every loaded BLAS (numpy's OpenBLAS, OpenCV's) uses ``OPENBLAS_NUM_THREADS``
    threads: one, unless the user set it.

    The variable reaches only a BLAS not yet loaded; a program that imported numpy before calling
    :func:`cellbatch.api.convert` has a BLAS thread per core beside the run's own threads (measured,
    ``benchmarks/bench_pipeline.py`` before it set the runtimes first: 20.4-21.5 ms a cell against
    15.3). Within the context the limit holds for every thread of the process; after it, the
    program's own setting is back. Torch's MKL is linked into torch, which sets its threads itself.
    """
    from threadpoolctl import threadpool_limits

    try:
        limit = max(1, int(os.environ.get("OPENBLAS_NUM_THREADS", "1")))
    except ValueError:
        limit = 1
    return threadpool_limits(limits=limit, user_api="blas")


# Below this many captures a run does not win back the worker processes' start-up (about 0.8 s on
# the 2-core machine, where 2 processes read/detect/crop 1.89x as fast as 1 and 2 threads 1.25x:
# break-even near 500 captures of 6 ms).
PROCESS_MIN_CAPTURES = 1000
# With the generator on the CPU, worker processes pay from this many cores. In threads the CPU stage
# is held by Python's GIL near one and a half cores' worth of detection (2 threads read, detected and
# cropped 1.48-1.54x as fast as 1 here; 16 threads on the 16-core H200 machine made 116 cells/s, 14
# processes 203), while the device stages, which release the GIL, take whatever cores are left: on
# 2 cores they chained 159 cells/s alone here, more than 16 threads' CPU stage. A whole run's CPU a
# cell on the 2-core machine (round 8, per thread): 5.1 core-ms in the CPU stage's tasks, about 15 in
# the rest of the run (device stages, writer, event loops). So threads hold the CPU stage to about
# 1.5 / 5.1 ms = 290 cells/s while the rest, on the other cores, makes (cores - 1.5) / 15 ms: about
# even at 6 cores, 430 cells/s at 8, where threads set the pace. Measured here only on 2 cores
# (threads faster there, docs/devices.md); unmeasured on a many-core CPU-only machine.
PROCESS_MIN_CORES_BESIDE_CPU_GENERATOR = 8
# ... and they get a quarter of the cores, the rest's share of a cell's CPU (5.1 of about 20 core-ms).
CPU_STAGE_SHARE_BESIDE_CPU_GENERATOR = 4


def worker_processes(
    processes: int | str,
    *,
    cores: int,
    remote: bool,
    generator_on_cpu: bool,
    detector_importable: bool,
    captures: Callable[[], int],
) -> tuple[int, str]:
    """Local worker processes for the CPU stage (0: threads of this process), and why.

    ``auto`` chooses processes when they pay: the run has at least :data:`PROCESS_MIN_CAPTURES`
    captures, there are at least 2 cores, and the detector can be imported in a fresh process (a
    built-in or an entry-point plugin). Without a generator on this machine's CPU they get one core
    each. With one there, it sets the pace on a few cores (on 2, threads were faster), so processes
    only from :data:`PROCESS_MIN_CORES_BESIDE_CPU_GENERATOR` cores, a quarter of them, the rest left
    to the device stages (:func:`thread_budget` with ``processes``). ``captures`` is called only when
    everything else says yes (it lists the inputs).
    """
    if processes != "auto":
        count = int(processes)
        return count, f"--processes {count}" if count else "threads (--processes 0)"
    if remote:
        return 0, "a Dask cluster (--scheduler)"
    if cores < 2:
        return 0, "threads: one core"
    if generator_on_cpu and cores < PROCESS_MIN_CORES_BESIDE_CPU_GENERATOR:
        return 0, f"threads: the generator on the CPU sets the pace on {cores} cores"
    if not detector_importable:
        return 0, "threads: the detector was registered at run time, worker processes cannot import it"
    count = captures()
    if count < PROCESS_MIN_CAPTURES:
        return 0, f"threads: {count} captures (processes pay from {PROCESS_MIN_CAPTURES})"
    if generator_on_cpu:
        share = cores // CPU_STAGE_SHARE_BESIDE_CPU_GENERATOR
        return share, f"{share} worker processes for {count} captures, {cores - share} cores left to the generator"
    return cores, f"{cores} worker processes for {count} captures"

