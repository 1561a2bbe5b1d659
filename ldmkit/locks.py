"""One folder lock for every part that must have a folder to itself: a training run, an image-cache build, a synth.

The exclusion is `fcntl.flock` on a file in the folder (FOLDER/.lock by default); the kernel drops it when its
process ends in any way, kill -9 included, so a crashed holder never blocks the next one. Each caller chooses:
- wait or fail: wait for the holder to let go (saying so once through `waiting`), or raise the error `busy` builds
  from the holder's record;
- record: write {pid, host, started} into the file while holding it (the message that names a holder reads it) and
  remove the file on release; the record found on taking the lock is kept in `previous`;
- read_only: a folder this process cannot write is still locked where it can be (the existing file opened for
  reading), or not at all where there is no file; `writable` is then False and `why` says why.
A holder that removes the file on release may do so between another process's open and its lock, so the lock is
only held once the locked descriptor is still the file at the path (otherwise the new file is opened again).
Standard library only, so that any part may import it and it is cheap to import from any process.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

LOCK_FILE = ".lock"
READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


class FolderLock:
    """`with FolderLock(folder, ...):` holds the folder's lock; see the module's docstring for the choices."""

    def __init__(
        self,
        folder: str | Path,
        *,
        name: str = LOCK_FILE,
        wait: bool = False,
        busy: Callable[[dict], Exception] | None = None,
        waiting: Callable[[], None] | None = None,
        record: bool = False,
        read_only: bool = False,
        make: Callable[[Path], None] | None = None,
    ):
        """folder: the folder to lock (it must exist, unless `make` creates it).
        name: the lock file's name in the folder.
        wait: True waits for the holder to let go; False raises busy(the holder's record) at once.
        busy: builds the error raised when the folder is held and wait is False; its argument is the holder's
            record, {} when it wrote none (yet). None raises BlockingIOError.
        waiting: called once, before waiting for a holder (to tell the user).
        record: write this process's {pid, host, started} into the lock file and remove the file on release.
        read_only: a folder this process may not write (EACCES, EPERM, EROFS) is allowed: see `writable`, `why`.
        make: creates the folder before the lock file is opened; its read-only errors count as a read-only folder.
        """
        self.folder = Path(folder)
        self.path = self.folder / name
        self.wait, self.busy, self.waiting = wait, busy, waiting
        self.record, self.read_only, self.make = record, read_only, make
        self.writable, self.why = True, ""
        self.previous: dict = {}  # the record in the file when this process took the lock
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> "FolderLock":
        flags = os.O_RDWR | os.O_CREAT
        try:
            if self.make is not None:
                self.make(self.folder)
            fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            if not self.read_only or e.errno not in READ_ONLY_ERRNOS:
                raise
            self.writable, self.why, flags = False, f"{type(e).__name__}: {e.strerror}", os.O_RDONLY
            fd = self._reopen(flags)
        told = False
        while fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not self.wait:
                    holder = read_record(fd)
                    os.close(fd)
                    if self.busy is None:
                        raise BlockingIOError(errno.EWOULDBLOCK, f"{self.folder} is locked by {holder}") from None
                    raise self.busy(holder) from None
                if self.waiting is not None and not told:
                    self.waiting()
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if same_file(fd, self.path):
                break
            os.close(fd)  # the previous holder removed the file between our open and our lock: open the new one
            fd = self._reopen(flags)
        if fd is None:
            return self  # a read-only folder without a lock file: nothing to lock, nothing may be written
        self.previous = read_record(fd)
        if self.record and self.writable:
            own = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(own).encode(), 0)
        self.fd = fd
        return self

    def _reopen(self, flags: int) -> int | None:
        if flags & os.O_CREAT:
            return os.open(self.path, flags, 0o644)
        try:
            return os.open(self.path, flags)
        except OSError:
            return None

    def release(self):
        """Let go (a no-op when not held); with `record`, remove the lock file first, while still holding it."""
        if self.fd is None:
            return
        try:
            if self.record and self.writable and same_file(self.fd, self.path):
                self.path.unlink()
        finally:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def read_record(fd: int) -> dict:
    """The JSON record in a lock file, {} when it is empty or unreadable (a holder that has not written it yet)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def same_file(fd: int, path: Path) -> bool:
    """Whether the open descriptor is still the file at `path` (False when the path is gone)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
