"""One run per folder: an exclusive lock on the run folder for the whole life of a training run.

The exclusion is locks.FolderLock on `FOLDER/.lock`: an flock the kernel drops when its process ends in any way,
kill -9 included, so a crashed run never blocks the next one. A second run fails at once. The file's content (JSON:
pid, host, started) only serves the message that names the holder, and the warning when a new run finds a record its
dead owner could not remove. Standard library only, so that it is cheap to import from any process.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

from ..errors import RunFolderError
from ..locks import LOCK_FILE, FolderLock


class RunLock:
    """`with RunLock(folder):` holds the folder's lock; a second holder gets RunFolderError naming the first."""

    def __init__(self, folder: str | Path):
        """folder: the run folder (created if missing); the lock file is folder/.lock."""
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._lock = FolderLock(self.folder, name=LOCK_FILE, busy=self._busy, record=True, make=self._make)

    def _make(self, folder: Path):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise RunFolderError(
                f"run folder {folder}: it, or a folder above it, is a file; give another --out"
            ) from None
        except OSError as e:
            raise RunFolderError(f"run folder {folder} cannot be created ({e.strerror}); give another --out") from None

    def _busy(self, holder: dict) -> RunFolderError:
        return RunFolderError(
            f"run folder {self.folder} is in use by {_describe(holder)}; wait for that "
            f"run to finish or stop it, or give another --out"
        )

    def acquire(self) -> "RunLock":
        self._lock.acquire()
        try:
            _warn_if_stale(self.folder, self._lock.previous)
        except BaseException:  # a warning turned into an error: do not keep the folder locked
            self._lock.release()
            raise
        return self

    def release(self):
        """Remove the lock file while still holding the lock, then let go (a waiting run re-opens the new file)."""
        self._lock.release()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


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
