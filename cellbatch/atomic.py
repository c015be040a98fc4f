"""Atomic file writes: readers see the old file or the new one, never half of either.

Every file cellbatch replaces in place (``run.json``, ``provenance.json``, profiles, checkpoints,
``confusion.csv``/``.png``, training logs) goes through :func:`atomic_write`: the content is written to
a temporary file beside the target, flushed to disk, and renamed over it. The temporary file is
created with ``O_EXCL | O_NOFOLLOW``, so a link planted at its name is never followed, and it is
removed again on any error (a full disk, an interrupt), so no ``.tmp`` is left behind.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def temp_name(path: Path) -> Path:
    """The hidden temporary name :func:`atomic_write` uses beside ``path``."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


@contextmanager
def atomic_write(
    path: str | Path, mode: str = "w", *, encoding: str | None = "utf-8", newline: str | None = None
) -> Iterator[IO[Any]]:
    """Open a temporary file for writing; on a clean exit it replaces ``path``.

    Parameters
    ----------
    path
        The file to write; its folder must exist.
    mode
        ``"w"`` (text) or ``"wb"`` (bytes).
    encoding, newline
        As for :func:`open`, text mode only.

    Examples
    --------
    >>> with atomic_write(tmp / "run.json") as fh:  # doctest: +SKIP
    ...     fh.write("{}")
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes new files only (mode 'w' or 'wb'), not {mode!r}")
    path = Path(path)
    tmp = temp_name(path)
    fd = os.open(tmp, _FLAGS, 0o644)
    try:
        text = {"encoding": encoding, "newline": newline} if mode == "w" else {}
        with os.fdopen(fd, mode, **text) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block is done (a few renames that must not be split).

    The handlers are swapped for ones that only note the signal, and the first one noted is raised again
    once the old handlers are back. (Blocking the signal would not do: the kernel hands a process signal
    to any thread that does not block it, and Python then interrupts the main thread anyway.) Handlers
    can be swapped in the main thread only; elsewhere this does nothing.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not None:  # None: a handler installed outside Python, left alone
            previous[signum] = signal.signal(signum, lambda number, frame: noted.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if noted:
            signal.raise_signal(noted[0])


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    with atomic_write(path) as fh:
        fh.write(text)


def write_json_atomic(path: str | Path, data: Any, *, indent: int = 2, sort_keys: bool = False) -> None:
    """Replace ``path`` with ``data`` as JSON atomically (values JSON lacks are written as text).

    The JSON is built before the file is opened, so a value that cannot be written leaves nothing behind.
    """
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, default=str) + "\n"
    write_text_atomic(path, text)
