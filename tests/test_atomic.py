"""cellbatch.atomic: the one way files are replaced (run.json, provenance, profiles, checkpoints, ...)."""

from __future__ import annotations

import errno
import json

import pytest

from cellbatch import atomic
from cellbatch.atomic import atomic_write, write_bytes_atomic, write_json_atomic


def test_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "run.json"
    target.write_text("old")
    write_json_atomic(target, {"state": "finished"})
    assert json.loads(target.read_text()) == {"state": "finished"}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_a_failure_while_writing_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "run.json"
    target.write_text("old")
    with pytest.raises(OSError, match="No space"):
        with atomic_write(target) as fh:
            fh.write("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_an_interrupt_while_writing_removes_the_temporary(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(tmp_path / "p.json", "wb") as fh:
            fh.write(b"{")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_value_json_cannot_hold_leaves_nothing_behind(tmp_path):
    circular: dict = {}
    circular["self"] = circular
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "p.json", circular)
    assert list(tmp_path.iterdir()) == []


def test_a_link_planted_at_the_temporary_name_is_not_followed(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    planted = tmp_path / ".run.json.planted.tmp"
    planted.symlink_to(victim)
    monkeypatch.setattr(atomic, "temp_name", lambda path: planted)
    with pytest.raises(OSError):
        write_bytes_atomic(tmp_path / "run.json", b"new")
    assert victim.read_text() == "keep me" and not (tmp_path / "run.json").exists()
    assert planted.is_symlink(), "a file we did not create is not ours to remove"


def test_every_replaced_file_goes_through_the_helper():
    """The seven hand-written temporary-file-and-rename copies are gone (one helper, one behaviour)."""
    from pathlib import Path

    import cellbatch

    root = Path(cellbatch.__file__).parent
    offenders = [
        str(p.relative_to(root)) for p in root.rglob("*.py")
        if p.name != "atomic.py" and any(
            ".tmp" in line for line in p.read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith("#")
        )
    ]
    assert offenders == []


@pytest.mark.parametrize("receiver", ["main thread", "other thread"])
def test_signals_wait_until_a_deferred_block_is_done(receiver):
    import signal
    import threading
    import time

    from cellbatch.atomic import signals_deferred

    # In a run the kernel may hand a process signal to any thread (Dask, the writer): both cases are
    # sent explicitly, since os.kill leaves the choice to the kernel and made this test a coin toss.
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait)
    helper.start()
    target = threading.main_thread() if receiver == "main thread" else helper
    order = []
    # Python's own handler, whatever this process inherited: a shell starts background jobs with
    # SIGINT ignored, and an ignored signal is rightly still ignored after the block
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                signal.pthread_kill(target.ident, signal.SIGINT)
                time.sleep(0.2)
                order.append("block finished")
    finally:
        signal.signal(signal.SIGINT, previous)
        stop.set()
        helper.join()
    assert order == ["block finished"]


def test_a_signal_the_process_ignores_stays_ignored_after_a_deferred_block():
    import signal

    from cellbatch.atomic import signals_deferred

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup ... & from a script
    try:
        with signals_deferred():
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
