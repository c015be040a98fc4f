"""One run per OUT: a live holder blocks with a message naming it; a killed holder blocks nothing."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cellbatch.errors import LockedError, OutputError
from cellbatch.lock import LOCK_NAME, RunLock

HOLDER = """
import sys, time
from cellbatch.lock import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path):
    """A separate process that holds the lock on tmp_path/out until killed."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1]
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield out, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()


def test_lock_file_records_pid_host_and_start_while_held_and_goes_after(tmp_path):
    out = tmp_path / "out"
    with RunLock(out) as lock:
        assert lock.held
        info = json.loads((out / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid()
        assert info["host"] == socket.gethostname()
        assert info["started"].endswith("+00:00")
    assert not lock.held
    assert not (out / LOCK_NAME).exists()


@pytest.mark.timeout(30)
def test_second_run_is_refused_while_another_process_holds_out(holder):
    out, proc = holder
    with pytest.raises(LockedError) as info:
        RunLock(out).acquire()
    message = str(info.value)
    assert f"pid {proc.pid}" in message
    assert f"host {socket.gethostname()}" in message
    assert str(out / LOCK_NAME) in message and "wait for it" in message
    assert "\n" not in message


@pytest.mark.timeout(30)
def test_lock_of_a_killed_run_does_not_block_the_next(holder):
    out, proc = holder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert (out / LOCK_NAME).exists()  # the dead run left its file behind
    with RunLock(out):
        info = json.loads((out / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid()


def test_second_lock_in_the_same_process_is_refused(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # and free again after release
        pass


def test_holder_that_has_not_written_its_details_is_still_reported(tmp_path):
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(LockedError, match="another run"):
            RunLock(tmp_path).acquire()
    finally:
        os.close(fd)


def test_stale_lock_file_with_garbage_is_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text("left over by something else, long ago")
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_acquiring_twice_with_one_object_is_a_programming_error(tmp_path):
    lock = RunLock(tmp_path)
    with lock, pytest.raises(RuntimeError):
        lock.acquire()


def test_unwritable_out_is_an_output_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="part of the path is a file"):
        RunLock(tmp_path / "file" / "out").acquire()


def test_file_system_without_locks_is_an_output_error(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(OutputError, match="does not support file locks"):
        RunLock(tmp_path).acquire()


def test_lock_file_replaced_between_open_and_lock_is_reopened(tmp_path, monkeypatch):
    real_flock = fcntl.flock
    calls = []

    def flock_after_replacement(fd, op):
        calls.append(fd)
        if len(calls) == 1:  # a previous holder releases (removes the file) just before we lock it
            os.unlink(tmp_path / LOCK_NAME)
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_replacement)
    with RunLock(tmp_path):
        assert len(calls) == 2
        fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                real_flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the visible file is the locked one
        finally:
            os.close(fd)


def test_a_symlink_planted_at_the_lock_is_refused_and_its_target_left_alone(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(precious, out / LOCK_NAME)
    with pytest.raises(OutputError, match="is a symlink") as info:
        RunLock(out).acquire()
    assert "\n" not in str(info.value)
    assert precious.read_text() == "keep me"
