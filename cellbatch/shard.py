"""Many runs, one OUT: ``--shard I/N`` and per-slide claims.

A sharded run takes a deterministic share of the slides (those whose name hashes to ``I`` modulo
``N``), holds OUT with a *shared* lock (so other sharded runs, on this host or another host of a shared
file system, may hold it too, while a run without ``--shard`` still has OUT to itself), and claims each
slide before deciding anything about it: an exclusive ``flock`` on ``OUT/.cellbatch-claims/<hash>.lock``,
held until the slide is committed, failed or skipped. A slide another live run has claimed is skipped
with that run's pid and host; a claim whose run died is released by the operating system and taken
over. ``run.json`` is merged: each run replaces its own slides' entries under a short lock, so it
lists every slide any shard has finished.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from types import TracebackType
from typing import Any

from cellbatch.errors import ConfigError, LockedError
from cellbatch.lock import RunLock
from cellbatch.pipeline import RunReport, SlideReport
from cellbatch.safepath import output_errors

CLAIMS_DIR = ".cellbatch-claims"
RUN_JSON_LOCK = ".cellbatch-run-json.lock"


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``.

    Examples
    --------
    >>> parse_shard("1/4")
    (1, 4)
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise ConfigError(f"--shard {text!r} is not I/N with 0 <= I < N (e.g. 0/4 for the first of four array tasks)")
    return int(match.group(1)), int(match.group(2))


def shard_of(name: str, count: int) -> int:
    """The shard (0..count-1) a slide name belongs to: stable across hosts, runs and Python versions."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()[:8], "big") % count


class SlideClaims:
    """The slides of one shard and the claims this run holds on them (a context manager).

    Parameters
    ----------
    out : Path
        The output folder.
    shard : (int, int)
        ``(I, N)``: this run does the slides with ``shard_of(name, N) == I``.
    """

    def __init__(self, out: Path, shard: tuple[int, int]) -> None:
        self.out = Path(out)
        self.index, self.count = shard
        self.folder = self.out / CLAIMS_DIR
        self._held: dict[str, RunLock] = {}

    def __enter__(self) -> SlideClaims:
        with output_errors(self.folder, doing="create the claims folder"):
            self.folder.mkdir(exist_ok=True)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for name in list(self._held):
            self.release(name)

    def selects(self, name: str) -> bool:
        """Whether slide ``name`` belongs to this run's shard."""
        return shard_of(name, self.count) == self.index

    def claim(self, name: str) -> str | None:
        """Claim slide ``name``: ``None`` once held, else why not (the live run that holds it)."""
        key = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        lock = RunLock(self.folder, name=f"{key}.lock")
        try:
            lock.acquire()
        except LockedError:
            holder = lock.holder or {}
            return (f"being written by another run (pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
                    f"since {holder.get('started', '?')}); it is done by that run")
        self._held[name] = lock
        return None

    def release(self, name: str) -> None:
        """Let go of slide ``name`` (nothing happens for a slide not held)."""
        lock = self._held.pop(name, None)
        if lock is not None:
            lock.release()


class SharedRunReport(RunReport):
    """A run report whose ``save`` merges this run's slides into OUT/run.json instead of replacing it."""

    def save(self, *, every: float = 0.0) -> None:
        now = time.monotonic()
        if every and now - self._saved_at < every:
            return
        from cellbatch.write import write_json_atomic

        with _locked(self.out / RUN_JSON_LOCK):
            write_json_atomic(self.out / "run.json", merge_run_json(_read(self.out / "run.json"), self))
        self._saved_at = now

    @contextmanager
    def current(self) -> Iterator[dict[str, Any]]:
        """OUT/run.json as it is now (every shard's slides), held unchanged while the block runs.

        Whatever is made from it (the RO-Crate) is then never older than a merge that came before.
        """
        with _locked(self.out / RUN_JSON_LOCK):
            yield _read(self.out / "run.json") or self.to_dict()


def merge_run_json(old: dict[str, Any] | None, report: RunReport) -> dict[str, Any]:
    """run.json with ``report``'s slides and failures replacing those of the same names in ``old``.

    A slide this run skipped (another run holds it, or did it already) keeps the entry that run wrote.
    """
    names = {f.name for f in fields(SlideReport)}
    previous = {entry["name"]: SlideReport(**{k: v for k, v in entry.items() if k in names})
                for entry in (old or {}).get("slides", []) if isinstance(entry, dict) and "name" in entry}
    mine = {s.name: s for s in report.slides if not (s.status == "skipped" and s.name in previous)}
    slides = {**previous, **mine}
    failures = [f for f in (old or {}).get("failures", []) if isinstance(f, dict) and f.get("slide") not in mine]
    failures += [f for f in report.failures if f.get("slide") in mine]
    started = min(filter(None, [(old or {}).get("started"), report.started]))
    merged = RunReport(
        out=report.out, command=report.command, started=started,
        slides=[slides[name] for name in sorted(slides)], failures=failures,
        notes=report.notes, generation=report.generation, finished=report.finished,
        min_agreement=report.min_agreement, state=report.state, listed=report.listed,
    )
    return merged.to_dict()


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class _locked:
    """An exclusive ``flock`` held for a few milliseconds (merging run.json), waiting for other shards."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> None:
        with output_errors(self.path, doing="lock"):
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
