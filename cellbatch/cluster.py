"""An existing Dask cluster (``--scheduler``): its address checked, its answer bounded, its loss noticed.

Three ways a run could otherwise hang or crash:

- an address Dask cannot use (``foo``, the dashboard's ``http://`` one, ``inproc://``) raised a traceback;
  :func:`check_scheduler_address` refuses it as a bad command line;
- a port that accepts connections but does not speak Dask's protocol (the dashboard's HTTP port) made
  the client wait for a handshake forever: :func:`probe_scheduler` bounds the whole connection,
  handshake included, by Dask's own ``distributed.comm.timeouts.connect``;
- a cluster whose workers are all gone left tasks waiting forever: :func:`gather_or_lost` gives up
  after ``distributed.scheduler.no-workers-timeout`` (Dask's setting for how long a task may stay
  unrunnable; :data:`DEFAULT_NO_WORKERS_TIMEOUT` when it is unset), and also when the client lost
  its scheduler, with :class:`~cellbatch.errors.ClusterLostError`.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor
from typing import Any

from cellbatch.errors import ClusterLostError, UnavailableError, UsageError

DEFAULT_NO_WORKERS_TIMEOUT = 300.0
"""Seconds a run waits for a worker to come back when Dask's ``no-workers-timeout`` is unset (the
same 5 minutes as Dask's ``worker-ttl``, after which a silent worker counts as dead)."""

_POLL_S = 2.0  # how often a waiting run looks whether the cluster still has workers

_ADDRESS_HELP = "write tcp://HOST:PORT, the scheduler's address (port 8786 by default), not the dashboard's"


def check_scheduler_address(address: str) -> None:
    """Refuse an address no Dask scheduler can have, with :class:`UsageError` (exit code 2).

    Accepted: ``tcp://``, ``tls://``, ``ws://``, ``wss://`` and ``ucx://`` with a host and a port, or
    ``HOST:PORT`` (Dask reads it as ``tcp://``).
    """
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import backends

    scheme = address.partition("://")[0] if "://" in address else "tcp"
    if scheme == "inproc":
        raise UsageError(f"--scheduler {address}: an inproc:// scheduler lives inside one process and cannot "
                         f"be reached from cellbatch; {_ADDRESS_HELP}")
    if scheme not in backends:
        raise UsageError(f"--scheduler {address}: Dask does not speak {scheme}://; {_ADDRESS_HELP}")
    try:
        host, port = parse_host_port(parse_address(address)[1])
    except ValueError as exc:
        raise UsageError(f"--scheduler {address} is not a scheduler address ({exc}); {_ADDRESS_HELP}") from exc
    if not host or not 0 < port < 65536:
        raise UsageError(f"--scheduler {address} needs a host and a port from 1 to 65535; {_ADDRESS_HELP}")


def connect_timeout() -> float:
    """Dask's ``distributed.comm.timeouts.connect`` in seconds (set it with the usual Dask config or
    ``DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=10s``)."""
    import dask
    from dask.utils import parse_timedelta

    return float(parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="s"))


def probe_scheduler(address: str, timeout: float) -> None:
    """Connect to ``address`` and complete Dask's handshake within ``timeout`` seconds, or raise
    :class:`UnavailableError` (exit code 3) saying whether nothing answered or something that is not a scheduler.

    ``distributed.Client`` bounds the connection but not the handshake that follows it, so a service
    that accepts the connection and then waits for an HTTP request would keep it waiting forever.
    """
    from distributed.comm import connect

    async def handshake() -> None:
        comm = await asyncio.wait_for(connect(address, timeout=timeout), timeout)
        await comm.close()

    # A fresh thread has no event loop of its own yet, whatever the caller's thread runs.
    with ThreadPoolExecutor(1) as pool:
        try:
            pool.submit(asyncio.run, handshake()).result()
        except (TimeoutError, asyncio.TimeoutError) as exc:
            raise UnavailableError(
                f"{address} did not answer as a Dask scheduler within {timeout:g} s (is it the dashboard's "
                f"HTTP port, or another service?): start a scheduler there, check --scheduler, or drop it"
            ) from exc
        except OSError as exc:
            raise UnavailableError(
                f"no Dask scheduler answers at {address}: start one or drop --scheduler ({exc})"
            ) from exc


def no_workers_timeout() -> float:
    """Dask's ``distributed.scheduler.no-workers-timeout`` in seconds, or :data:`DEFAULT_NO_WORKERS_TIMEOUT`."""
    import dask
    from dask.utils import parse_timedelta

    value = dask.config.get("distributed.scheduler.no-workers-timeout", None)
    return DEFAULT_NO_WORKERS_TIMEOUT if value is None else float(parse_timedelta(value, default="s"))


def result_or_lost(client: Any, future: Any, *, timeout: float | None = None) -> Any:
    """``future.result()``, unless the cluster is lost while it waits (see :func:`gather_or_lost`)."""
    return gather_or_lost(client, [future], timeout=timeout)[0]


def gather_or_lost(client: Any, futures: list[Any], *, timeout: float | None = None) -> list[Any]:
    """``client.gather(futures)``, unless the cluster is lost while it waits.

    Raises
    ------
    ClusterLostError
        The client lost its scheduler (its futures were cancelled), or the cluster has had no
        worker for ``timeout`` seconds (default :func:`no_workers_timeout`).
    Exception
        Whatever a task raised (a lost worker's ``KilledWorker`` too): the caller decides.
    """
    from distributed import wait

    limit = no_workers_timeout() if timeout is None else timeout
    alone_since: float | None = None
    while True:
        try:
            wait(futures, timeout=min(_POLL_S, limit))
            return client.gather(futures)
        except TimeoutError:
            pass
        except CancelledError as exc:
            if client.status != "running":
                raise ClusterLostError(_lost(client, "lost its scheduler")) from exc
            raise
        if client.status != "running":
            raise ClusterLostError(_lost(client, "lost its scheduler"))
        if _worker_count(client):
            alone_since = None
        elif alone_since is None:
            alone_since = time.monotonic()
        elif time.monotonic() - alone_since >= limit:
            raise ClusterLostError(_lost(client, f"has had no workers for {limit:g} s"))


def _worker_count(client: Any) -> int:
    try:
        return int(client.scheduler_info(n_workers=0).get("n_workers", 0))
    except (OSError, TimeoutError):
        return 0


def _lost(client: Any, what: str) -> str:
    address = getattr(client.scheduler, "address", None) or "the scheduler"
    return (f"the Dask cluster at {address} {what}: the run stopped; slides already committed are kept "
            "(see run.json) and a rerun resumes with the rest")
