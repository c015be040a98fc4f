"""One run per output folder at a time.

:class:`RunLock` takes an exclusive ``flock`` on ``OUT/.cellbatch.lock``. The operating system drops
the lock when the holding process ends, however it ends (even ``kill -9`` or a crash), so a lock left
by a dead run never blocks the next one; the pid, host and start time written into the file only
serve the message a second run prints while the first is alive.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from cellbatch.errors import LockedError, OutputError
from cellbatch.safepath import output_error, output_errors

LOCK_NAME = ".cellbatch.lock"

# Opening, then locking, can race with the previous holder removing the file on release: we would
# hold a lock on a file nobody else can see. Re-open a few times until the locked file is the one
# at the path; more than a handful of losses in a row means something keeps deleting it.
_ATTEMPTS = 5


class RunLock:
    """Context manager that holds OUT for one run.

    Parameters
    ----------
    out : Path
        The output folder; created if missing.
    name : str
        The lock file's name inside ``out`` (per-slide claims use one each; see :mod:`cellbatch.shard`).
    shared : bool
        Take a shared lock: any number of shared holders (``--shard`` runs) may hold OUT together,
        while an exclusive holder (a run without ``--shard``) excludes them all.

    Raises
    ------
    LockedError
        On entry, when another live process (or another ``RunLock`` in this one) holds OUT.
    OutputError
        On entry, when the lock file cannot be created or locked (read-only OUT, no locks on the
        file system, ...).

    Notes
    -----
    ``flock`` locks belong to the open file, so processes forked while the lock is held (for example
    by a process-based scheduler) share it and keep it alive until they exit too. On NFS, Linux maps
    ``flock`` to POSIX byte-range locks, which work across hosts; a host that dies holding one may keep
    it until the server notices, which is what the "remove the lock file" advice is for.

    Examples
    --------
    >>> with RunLock(out):  # doctest: +SKIP
    ...     run_all_slides(out)
    """

    def __init__(self, out: Path, *, name: str = LOCK_NAME, shared: bool = False) -> None:
        self.out = Path(out)
        self.path = self.out / name
        self.shared = shared
        self.holder: dict[str, object] | None = None  # who held it, after a LockedError
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock without waiting; see the class for what is raised."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        with output_errors(self.out, doing="create the output folder"):
            self.out.mkdir(parents=True, exist_ok=True)
        for _ in range(_ATTEMPTS):
            fd = self._open()
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                self.holder = _read_info(fd)
                os.close(fd)
                raise LockedError(self._message(self.holder)) from None
            except OSError as exc:
                os.close(fd)
                raise output_error(exc, path=self.path, doing="lock") from exc
            if _is_current(fd, self.path):
                break
            os.close(fd)
        else:
            raise LockedError(
                f"{self.path} keeps being replaced while cellbatch locks it: is another tool "
                f"cleaning {self.out}? Stop it and retry"
            )
        try:
            with output_errors(self.path, doing="write"):
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps(_own_info()).encode() + b"\n")
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _open(self) -> int:
        # O_NOFOLLOW: a link planted at the lock's name would make the truncate and write below hit
        # its target, any file the user can write.
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OutputError(
                    f"{self.path} is a symlink; cellbatch never follows links in OUT: remove it"
                ) from exc
            raise output_error(exc, path=self.path, doing="create the lock file") from exc

    def release(self) -> None:
        """Remove the lock file and drop the lock; does nothing when the lock is not held."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # unlink while still locked, so no one can lock the old file after we let go of it; a
            # shared holder leaves it to the others that may still hold it
            if not self.shared:
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def _message(self, holder: dict[str, object] | None) -> str:
        if holder:
            who = (
                f"run pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('started', '?')}"
            )
        else:
            who = "another run (it has not written its details yet)"
        return f"{self.out} is in use by {who}: wait for it or remove {self.path} if that run is gone"


def _own_info() -> dict[str, object]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _read_info(fd: int) -> dict[str, object] | None:
    try:
        data = os.pread(fd, 4096, 0)
        info = json.loads(data.decode("utf-8"))
    except (OSError, ValueError):  # empty (holder still starting) or not ours: show what we can
        return None
    return info if isinstance(info, dict) else None


def _is_current(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.lstat(path).st_ino
    except FileNotFoundError:
        return False
