"""A Dask cluster of SLURM jobs for ``cellbatch run --scheduler`` (dask-jobqueue).

Run it on the login node; it submits JOBS worker jobs, prints the scheduler address and keeps the
cluster up until it is stopped (Ctrl-C, or scancel of the jobs):

    python examples/slurm/cluster.py 4 > scheduler-address &
    cellbatch run /lab/slides -o /lab/converted --scheduler "$(head -1 scheduler-address)"

Read/detect/crop run on the workers; the generator runs in the `cellbatch run` process (give it the
GPU node), or on workers that declare a GPU resource. Edit CLUSTER for your site; the job script it
submits is shown in the README ("On a SLURM cluster") and checked against dask-jobqueue in
tests/test_slurm_example.py.
"""

from __future__ import annotations

import sys
import time
from typing import Any

CLUSTER: dict[str, Any] = {
    "queue": "cpu",  # SLURM partition
    "account": "lab",
    "job_name": "cellbatch-workers",
    "cores": 8,  # per job: one worker process with 8 threads
    "processes": 1,
    "memory": "32GB",
    "walltime": "04:00:00",
    "python": "python3",  # the interpreter with cellbatch installed, as seen on the compute nodes
    "scheduler_options": {"port": 8786},  # the address the workers and `cellbatch run --scheduler` use
}


def make_cluster(**overrides: Any):
    """The SLURMCluster of CLUSTER (with ``overrides``); no job is submitted until it is scaled."""
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(**{**CLUSTER, **overrides})


if __name__ == "__main__":
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    with make_cluster() as cluster:
        cluster.scale(jobs=jobs)
        print(cluster.scheduler_address, flush=True)
        while True:
            time.sleep(60)
