"""One run per folder: an exclusive lock on the run folder for the whole life of a training run.

The exclusion is `fcntl.flock` on `FOLDER/.lock`; the kernel drops it when its process ends in any way, kill -9
included, so a crashed run never blocks the next one. The file's content (JSON: pid, host, started) only serves the
message that names the holder, and the warning when a new run finds a record its dead owner could not remove.
Standard library only, so that it is cheap to import from any process.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path

from ..errors import RunFolderError

LOCK_FILE = ".lock"


class RunLock:
    """`with RunLock(folder):` holds the folder's lock; a second holder gets RunFolderError naming the first."""

    def __init__(self, folder: str | Path):
        """folder: the run folder (created if missing); the lock file is folder/.lock."""
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise RunFolderError(
                f"run folder {self.folder}: it, or a folder above it, is a file; give another --out"
            ) from None
        except OSError as e:
            raise RunFolderError(
                f"run folder {self.folder} cannot be created ({e.strerror}); give another --out"
            ) from None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_record(fd)
                os.close(fd)
                raise RunFolderError(
                    f"run folder {self.folder} is in use by {_describe(holder)}; wait for that "
                    f"run to finish or stop it, or give another --out"
                ) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the previous holder removed the file between our open and our lock: open the new one
        _warn_if_stale(self.folder, _read_record(fd))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def release(self):
        """Remove the lock file while still holding the lock, then let go (a waiting run re-opens the new file)."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink()
        finally:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _read_record(fd: int) -> dict:
    """The JSON record in the lock file, {} when it is empty or unreadable (a holder that has not written it yet)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _holder(record: dict) -> str:
    return f"PID {record['pid']} on host {record.get('host', '?')}, started {record.get('started', '?')}"


def _describe(record: dict) -> str:
    if not record.get("pid"):
        return "another process (it has not recorded its PID yet)"
    return f"another run ({_holder(record)})"


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _warn_if_stale(folder: Path, record: dict):
    """A record left in a lock file we could take belongs to a run that ended without removing it."""
    if not record.get("pid"):
        return
    if record.get("host") == socket.gethostname():
        gone = (
            "that process is no longer running"
            if not _pid_running(int(record["pid"]))
            else "its PID now belongs to another process"
        )
    else:
        gone = "it no longer holds the lock"
    warnings.warn(
        f"run folder {folder}: taking over a stale lock left by {_holder(record)} "
        f"({gone}); that run ended without cleaning up, check its output",
        stacklevel=3,
    )
