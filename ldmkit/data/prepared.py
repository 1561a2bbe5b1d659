"""The prepared-image cache: each image of a folder decoded and resized once, kept as uint8 training pixels in
memory-mapped files under $LDMKIT_CACHE/images, and read from there by every later epoch and run.

One cache folder per image folder and pixel geometry (the folder's absolute path, the stored side, the channels,
data.max_pixels and PREPARED_VERSION):
    index.json    {"shape": [S, S, C], "entries": {relative path: {"stamp": [size, mtime_ns], "shard": name,
                  "row": r} or {"stamp": ..., "skip": reason}}}
    <name>.u8     rows of (S, S, C) uint8 pixels, written once and never changed
    .lock         flock'ed by the one process that builds (others wait), released by the kernel even on kill -9
An entry is keyed by its file's path, size and modification time, so a changed file invalidates its own entry
alone. A damaged file is recorded as skipped with its reason; a file that could not be reached (moved away during
the build, no permission, an I/O error) is reported but not recorded, so the next run tries it again. Entries whose
rows are gone (a shard deleted or cut short by hand) are decoded again. A cache folder that cannot be written (a
read-only mount, another user's) is still read when it holds every image; otherwise the build says what to change.
Writes are atomic (checkpoint.atomic_write): a shard is complete under its final name before the index that names
it replaces the old one, so a crash or a full disk leaves the previous cache whole and at most a temporary file,
which the next build removes. Images are decoded by a DataLoader's worker processes, and the index is committed
every COMMIT_S seconds, so an interrupted build keeps most of its work.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import atomic_write
from ..errors import DiskSpaceError, InputError, MissingFileError
from ..locks import FolderLock
from .common import cache_home, digest, file_stamp, human_bytes
from .decode import TooLarge, prepare_pixels

PREPARED_VERSION = 1  # bump when decode.prepare_pixels changes its output, to leave old caches unused
COMMIT_S = 20.0  # seconds between commits of a build (a shard and the index naming it)
COMMIT_BYTES = 512 * 2**20  # and at most this many bytes of pixels per shard
COMPACT_MIN_DEAD = 64  # rows of changed or removed files tolerated before compaction, beyond one per live row
SPACE_MARGIN = 64 * 2**20  # free bytes a build leaves on the disk beyond what it writes


def cache_root() -> Path:
    return cache_home() / "images"


def make_folder(path: Path) -> None:
    """mkdir -p `path`; a file in the way (LDMKIT_CACHE pointing at a file) is an InputError that names it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next(p for p in (path, *path.parents) if p.exists() and not p.is_dir())
        where = f"LDMKIT_CACHE={blocker}" if blocker == cache_home() else str(blocker)
        raise InputError(
            f"cannot make the image cache folder {path}: {where} is a file, not a folder; set LDMKIT_CACHE to a "
            f"folder (it is made if missing) or move that file"
        ) from None


@dataclass(frozen=True)
class Geometry:
    """What the stored pixels of one folder depend on; each distinct value has its own cache folder."""

    root: str  # the image folder, absolute
    size: int  # the side of the stored squares
    channels: int  # 1 or 3
    max_pixels: int  # data.max_pixels: decides which files are refused as too large

    @property
    def row_bytes(self) -> int:
        return self.size * self.size * self.channels

    def folder(self) -> Path:
        key = digest(["prepared", PREPARED_VERSION, self.root, self.size, self.channels, self.max_pixels])
        return cache_root() / f"{Path(self.root).name[:40]}-{self.size}px-{key}"


@dataclass
class Report:
    """What a build did: images in the data set, files decoded now (failed ones included, `failed` of them), skipped
    (relative path -> reason), left out at the header check before (the same), bytes on disk."""

    folder: Path
    images: int = 0
    decoded: int = 0
    failed: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)
    bytes: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        kinds: dict[str, int] = {}
        for why in [*self.left_out.values(), *self.skipped.values()]:
            kind = "above data.max_pixels" if "data.max_pixels" in why else "unreadable"
            kinds[kind] = kinds.get(kind, 0) + 1
        skipped = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "none"
        now = f"{self.decoded - self.failed} decoded now"
        if self.decoded:
            now += f" in {self.seconds:.1f} s ({self.decoded / max(self.seconds, 1e-9):.0f} images/s)"
        return (
            f"image cache {self.folder}: {self.images - len(self.skipped)} images ready, {now}; skipped: {skipped} "
            f"(see the warnings); {human_bytes(self.bytes)} on disk"
        )


class _Decode(torch.utils.data.Dataset):
    """Item k: (k, pixels (S, S, C) uint8 or None, why it failed or None, whether that failure lasts) of the k-th
    file to decode. A failure lasts when it comes from the file's content; one of reaching the file (an OSError
    with an errno: gone, no permission, an I/O error) or of memory may not, and is tried again in the next run."""

    def __init__(self, root: Path, rels: list[str], g: Geometry):
        self.root, self.rels, self.g = root, rels, g

    def __len__(self) -> int:
        return len(self.rels)

    def __getitem__(self, k: int):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow's notes on odd files; failures are reported, not these
                g = self.g
                return k, prepare_pixels(self.root / self.rels[k], g.size, g.channels, g.max_pixels), None, True
        except TooLarge as e:
            return k, None, str(e), True
        except Exception as e:  # noqa: BLE001 - any failure to decode means the file is skipped with the reason
            lasting = not isinstance(e, MemoryError) and not (isinstance(e, OSError) and e.errno is not None)
            return k, None, f"it cannot be decoded ({type(e).__name__}: {e})", lasting


def _as_is(item):
    return item


class PreparedCache:
    """The cache folder of one Geometry: read its index, build what is missing, map its shards."""

    def __init__(self, g: Geometry):
        self.g, self.path = g, g.folder()
        self._maps: dict[str, np.ndarray] = {}

    # --- reading ------------------------------------------------------------------------------------------------

    def read_index(self) -> dict[str, dict]:
        """The entries of the committed index; {} when there is none or it is unusable (then rebuilt)."""
        try:
            data = json.loads((self.path / "index.json").read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("shape") != [self.g.size, self.g.size, self.g.channels]:
            return {}
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}

    def rows(self, entries: dict[str, dict], rels: list[str]) -> list[tuple[str, int] | None]:
        """For each of `rels`: (its shard's name, row), or None for a file that is skipped (or not in `entries`)."""
        return [(e["shard"], int(e["row"])) if "shard" in (e := entries.get(rel, {})) else None for rel in rels]

    def whole(self, entries: dict[str, dict]) -> dict[str, dict]:
        """The entries that are well formed and whose pixels are all there: those of a shard deleted or cut short
        by hand are left out (so decoded again) instead of failing every later run."""
        rows = {p.name: p.stat().st_size // self.g.row_bytes for p in self.path.glob("*.u8")}

        def ok(e) -> bool:
            if not isinstance(e, dict):
                return False
            if "shard" not in e:
                return isinstance(e.get("skip"), str)
            row = e.get("row")
            return isinstance(row, int) and 0 <= row < rows.get(e["shard"], 0)

        return {rel: e for rel, e in entries.items() if ok(e)}

    def pixels(self, shard: str, row: int) -> np.ndarray:
        """Row `row` of shard `shard`: a read-only (S, S, C) view of its memory-mapped file (mapped once a process)."""
        m = self._maps.get(shard)
        if m is None:
            try:
                n = os.path.getsize(self.path / shard) // self.g.row_bytes
                m = np.memmap(self.path / shard, np.uint8, "r", shape=(n, self.g.size, self.g.size, self.g.channels))
            except FileNotFoundError:
                raise MissingFileError(
                    f"the image cache {self.path} lost {shard} while this run was reading it (another run rebuilt it, "
                    f"or it was deleted); start this run again"
                ) from None
            self._maps[shard] = m
        return m[row]

    def __getstate__(self) -> dict:
        return {"g": self.g, "path": self.path, "_maps": {}}  # other processes map the files themselves

    # --- building -----------------------------------------------------------------------------------------------

    def prepare(self, rels: list[str], keep: set[str], workers: int, progress: bool):
        """Decode every file of `rels` the index lacks (or holds for another size or time) and commit it; drop
        entries of files not in `keep` (the folder's images now). Returns (report, rows as self.rows gives)."""
        t0 = time.time()
        root = Path(self.g.root)
        with _Lock(self.path, progress) as lock:
            if lock.writable:
                for p in self.path.glob(".*.tmp"):  # left by a writer that died: only the lock holder writes
                    p.unlink(missing_ok=True)
            entries = {k: v for k, v in self.whole(self.read_index()).items() if k in keep}
            stamps = {rel: file_stamp(root / rel) for rel in rels}
            todo = [rel for rel in rels if entries.get(rel, {}).get("stamp") != stamps[rel]]
            report = Report(self.path, images=len(rels))
            unreached: dict[str, str] = {}  # failures that are not recorded (see _Decode)
            if todo and not lock.writable:
                raise InputError(
                    f"cannot write the image cache {self.path} ({lock.why}) to add {len(todo)} images; make that "
                    f"folder writable or set LDMKIT_CACHE to a folder you can write"
                )
            if todo:
                self._check_space(len(todo))
                self._decode(todo, stamps, entries, unreached, workers, progress, report)
            if lock.writable:
                self._compact(entries)
            report.skipped = {rel: entries[rel]["skip"] for rel in rels if "skip" in entries.get(rel, {})}
            report.skipped.update(unreached)
            report.bytes = sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())
            report.seconds = time.time() - t0
            rows = self.rows(entries, rels)
            for shard in {r[0] for r in rows if r is not None}:
                self.pixels(shard, 0)  # mapped under the lock: loading processes forked later inherit the maps
            return report, rows

    def _decode(self, todo, stamps, entries, unreached, workers, progress, report):
        loader = torch.utils.data.DataLoader(
            _Decode(Path(self.g.root), todo, self.g),
            batch_size=None,
            num_workers=min(workers, len(todo)),
            collate_fn=_as_is,
        )
        items = iter(loader)
        bar = tqdm(total=len(todo), unit="img", desc="preparing images", disable=not progress, dynamic_ncols=True)
        done = 0
        try:
            while done < len(todo):
                name = f"{uuid.uuid4().hex[:12]}.u8"
                try:
                    got, failed, stop = self._write_shard(name, items, todo, stamps, entries, unreached, bar)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise self._space_error(len(todo) - done) from None
                    raise
                if got == 0 and not stop:
                    break
                done += got
                report.decoded += got
                report.failed += failed
                self._write_index(entries, len(todo) - done)
                if stop:
                    raise KeyboardInterrupt(
                        f"stopped preparing images: {report.images - len(todo) + done} of {report.images} images are "
                        f"in the image cache {self.path}; the next run decodes only the rest"
                    )
        finally:
            bar.close()
            del items

    def _write_shard(self, name, items, todo, stamps, entries, unreached, bar) -> tuple[int, int, bool]:
        """Write decoded rows to shard `name` (atomically) until COMMIT_S or COMMIT_BYTES or Ctrl-C; record the
        entries, and the failures not to record in `unreached`. Returns (files handled, how many of them failed,
        whether Ctrl-C stopped it: the rows before it are committed all the same)."""
        added: dict[str, dict] = {}
        missed: dict[str, str] = {}
        start, stop = time.time(), []

        def write(tmp):
            with open(tmp, "wb") as f:
                try:
                    rows(f)
                except KeyboardInterrupt:
                    stop.append(True)

        def rows(f):
            row = 0
            for k, pixels, why, lasting in items:
                rel = todo[k]
                if pixels is None and not lasting:
                    missed[rel] = why
                elif pixels is None:
                    added[rel] = {"stamp": stamps[rel], "skip": why}
                else:
                    self._put(f, pixels)
                    added[rel] = {"stamp": stamps[rel], "shard": name, "row": row}
                    row += 1
                bar.update(1)
                if time.time() - start > COMMIT_S or (row + 1) * self.g.row_bytes > COMMIT_BYTES:
                    break  # commit: the next row would pass COMMIT_BYTES

        atomic_write(self.path / name, write)
        if not any("shard" in e for e in added.values()):
            (self.path / name).unlink()  # only skipped files in this round: no rows
        entries.update(added)
        unreached.update(missed)
        failed = sum("skip" in e for e in added.values()) + len(missed)
        return len(added) + len(missed), failed, bool(stop)

    @staticmethod
    def _put(f, pixels: np.ndarray) -> None:
        """Append one row of pixels to an open shard file."""
        f.write(np.ascontiguousarray(pixels).data)

    def _write_index(self, entries: dict[str, dict], remaining: int):
        data = {"shape": [self.g.size, self.g.size, self.g.channels], "root": self.g.root, "entries": entries}
        text = json.dumps(data)
        try:
            atomic_write(self.path / "index.json", lambda tmp: Path(tmp).write_text(text))
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self._space_error(remaining) from None
            raise

    def _compact(self, entries: dict[str, dict]):
        """Rewrite the live rows into one shard when the shards hold more dead rows (of changed or removed files)
        than live ones, then remove the old shards; also removes shards no entry names."""
        live: dict[str, int] = {}
        for e in entries.values():
            if "shard" in e:
                live[e["shard"]] = live.get(e["shard"], 0) + 1
        shards = {p.name: p.stat().st_size // self.g.row_bytes for p in self.path.glob("*.u8")}
        dead = sum(n - live.get(name, 0) for name, n in shards.items())
        if dead <= max(sum(live.values()), COMPACT_MIN_DEAD):
            for name in set(shards) - set(live):
                (self.path / name).unlink()
            return
        name = f"{uuid.uuid4().hex[:12]}.u8"
        moved = [rel for rel, e in entries.items() if "shard" in e]
        self._check_space(len(moved))

        def write(tmp):
            with open(tmp, "wb") as f:
                for rel in moved:
                    self._put(f, self.pixels(entries[rel]["shard"], entries[rel]["row"]))

        atomic_write(self.path / name, write)
        for row, rel in enumerate(moved):
            entries[rel] = {"stamp": entries[rel]["stamp"], "shard": name, "row": row}
        self._write_index(entries, 0)
        self._maps.clear()
        for old in shards:
            (self.path / old).unlink()  # mappings of other runs stay valid: the pages live until unmapped

    def _check_space(self, n: int):
        make_folder(self.path)
        if shutil.disk_usage(self.path).free < n * self.g.row_bytes + SPACE_MARGIN:
            raise self._space_error(n)

    def _space_error(self, n: int) -> DiskSpaceError:
        need = n * self.g.row_bytes + SPACE_MARGIN
        free = shutil.disk_usage(self.path).free
        return DiskSpaceError(
            f"the image cache {self.path} needs {human_bytes(need)} more for {n} images of "
            f"{self.g.size}x{self.g.size}x{self.g.channels} pixels, but only {human_bytes(free)} are free there; "
            f"free space on that disk or set LDMKIT_CACHE to a folder on a larger one (nothing half-written was kept)"
        )


class _Lock:
    """flock on the cache folder's .lock for one build (locks.FolderLock); tells the user when it waits for another
    process. In a folder this process cannot write, `writable` is False (and `why` says why): the lock is then taken
    on the existing .lock opened for reading, or not at all where there is none, and nothing may be written."""

    def __init__(self, folder: Path, progress: bool):
        self.folder, self.progress = folder, progress
        self._lock = FolderLock(folder, wait=True, waiting=self._waiting, read_only=True, make=make_folder)

    @property
    def writable(self) -> bool:
        return self._lock.writable

    @property
    def why(self) -> str:
        return self._lock.why

    def _waiting(self):
        if self.progress:
            print(f"waiting for another process that is building the image cache {self.folder}", file=sys.stderr)

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()
        return False
