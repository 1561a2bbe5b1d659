"""locks.FolderLock, the one folder lock: two holders in two processes, a holder killed with -9, a read-only folder."""

import errno
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ldmkit import locks
from ldmkit.locks import LOCK_FILE, FolderLock

HOLDER = (
    "import sys, time\nfrom ldmkit.locks import FolderLock\n"
    "with FolderLock(sys.argv[1], record=sys.argv[2] == 'record'):\n"
    "    print('locked', flush=True)\n    sys.stdin.readline()\n"
)


class Busy(Exception):
    pass


def _busy(holder: dict) -> Busy:
    return Busy(holder)


def hold(folder: Path, record: bool = True) -> subprocess.Popen:
    """Another process that takes the folder's lock and keeps it until a line arrives on its stdin."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), "record" if record else "plain"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def let_go(proc: subprocess.Popen):
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(timeout=30) == 0


def test_a_second_process_fails_at_once_with_the_holders_record(tmp_path):
    proc = hold(tmp_path)
    try:
        with pytest.raises(Busy) as err:
            FolderLock(tmp_path, busy=_busy).acquire()
        holder = err.value.args[0]
        assert holder["pid"] == proc.pid and holder["host"] and holder["started"]
        with pytest.raises(BlockingIOError):  # no `busy`: the plain error
            FolderLock(tmp_path).acquire()
    finally:
        let_go(proc)
    assert not (tmp_path / LOCK_FILE).exists()  # record: the holder removed its file on release
    with FolderLock(tmp_path, busy=_busy, record=True) as lock:
        assert lock.held and lock.previous == {}  # a clean release leaves no record behind
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not lock.held and not (tmp_path / LOCK_FILE).exists()


def test_a_waiting_process_says_so_once_and_gets_the_lock_when_the_holder_lets_go(tmp_path):
    for record in (True, False):  # the holder removes its file on release, or leaves it
        proc = hold(tmp_path, record=record)
        told: list[int] = []
        lock = FolderLock(tmp_path, wait=True, waiting=functools.partial(told.append, 1))
        threading.Timer(0.3, let_go, (proc,)).start()
        t0 = time.monotonic()
        with lock:
            assert lock.held and told == [1] and time.monotonic() - t0 >= 0.25
            assert locks.same_file(lock.fd, tmp_path / LOCK_FILE)  # the file at the path, not a removed one
            with pytest.raises(Busy):
                FolderLock(tmp_path, busy=_busy).acquire()  # a second open file description conflicts, same process
        assert proc.wait(timeout=30) == 0


def test_a_holder_killed_with_minus_9_frees_the_lock(tmp_path):
    proc = hold(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    with FolderLock(tmp_path, busy=_busy, record=True) as lock:
        assert lock.previous["pid"] == proc.pid  # the record the dead holder could not remove
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    proc = hold(tmp_path, record=False)
    proc.kill()
    proc.wait(timeout=30)
    with FolderLock(tmp_path, wait=True, waiting=lambda: pytest.fail("nothing to wait for")) as lock:
        assert lock.held


def _refuse_writes(monkeypatch, folder: Path):
    """The folder as a read-only mount or another user's folder would behave (the tests may run as root, whom
    permissions do not stop): creating a file there, or opening one for writing, fails with EROFS."""
    real_open = os.open

    def open_(path, flags, *a, **kw):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and str(path).startswith(str(folder)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(locks.os, "open", open_)


def test_a_read_only_folder_is_locked_for_reading_or_refused(tmp_path, monkeypatch):
    (tmp_path / LOCK_FILE).touch()
    _refuse_writes(monkeypatch, tmp_path)
    with pytest.raises(OSError, match="Read-only"):  # not allowed unless the caller says so
        FolderLock(tmp_path).acquire()
    with FolderLock(tmp_path, read_only=True, record=True) as lock:
        assert lock.held and not lock.writable and lock.why == "OSError: Read-only file system"
        with pytest.raises(Busy):  # the lock taken on the file opened for reading still excludes
            FolderLock(tmp_path, read_only=True, busy=_busy).acquire()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # nothing written, nothing removed
    (tmp_path / LOCK_FILE).unlink()
    with FolderLock(tmp_path, read_only=True) as lock:  # no lock file and none can be made: not locked at all
        assert not lock.held and not lock.writable


def test_make_creates_the_folder_and_its_read_only_errors_count_as_a_read_only_folder(tmp_path):
    made = FolderLock(tmp_path / "a" / "b", make=lambda p: p.mkdir(parents=True)).acquire()
    assert made.held and (tmp_path / "a" / "b" / LOCK_FILE).is_file()
    made.release()

    def refused(p: Path):
        raise PermissionError(errno.EACCES, "Permission denied", str(p))

    lock = FolderLock(tmp_path / "c", read_only=True, make=refused).acquire()
    assert not lock.held and not lock.writable and lock.why == "PermissionError: Permission denied"
    with pytest.raises(PermissionError):
        FolderLock(tmp_path / "c", make=refused).acquire()
