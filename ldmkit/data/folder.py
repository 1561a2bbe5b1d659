"""A folder of images as a data set, with class labels from subfolders and captions from metadata or sidecars.

Layout (all optional beyond the images themselves):
    root/
      cats/001.png ...          class "cats": the immediate subfolder under root names the class
      dogs/abc.jpg ...          classes are the sorted subfolder names -> indices 0, 1, ...
      metadata.jsonl            {"file_name": "cats/001.png", "text": "a grey cat"} per line (imagefolder style)
      dogs/abc.txt              sidecar caption for dogs/abc.jpg (same stem), used where metadata has none
Images are found recursively (.png .jpg .jpeg .webp .bmp .gif; hidden files and folders skipped) in sorted
order, so item i is the same file on every machine. Each file's header is checked once up front (unless the image
cache already knows the file); a file that is unreadable there, or larger than data.max_pixels allows, is left out
with a warning naming it and the reason. A file that fails later, when it is decoded, is reported once the same
way and replaced by the next readable item, so one bad file never stops an epoch.

Pixels: each file is decoded straight to a square of `stored_size` (decode.prepare_pixels: the resolution for
centre crops; for random crops a margin of resolution // 8 more, out of which each draw takes a random
resolution-sized window). `prepare()` builds the prepared-image cache (prepared.py) once, after which every item
is a slice of a memory-mapped file; without it each item is decoded when asked for.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator

import numpy as np
import torch

from ..config import DataConfig
from ..errors import InputError, MissingFileError
from .common import digest, file_stamp
from .decode import TooLarge, prepare_pixels, probe
from .images import IMAGE_SUFFIXES, uint8_to_tensor
from .prepared import Geometry, PreparedCache, Report

CAPTION_KEYS = ("text", "caption")  # metadata.jsonl keys read as the caption, first found wins


def find_images(root: Path) -> list[Path]:
    """Image files under root, recursively, sorted by relative path; hidden files and folders are skipped."""
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in rel.parts) and p.is_file():
            out.append(rel)
    return sorted(out, key=lambda r: r.as_posix())


def metadata_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a metadata.jsonl; InputError naming the line for one
    that is not JSON."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {n} is not valid JSON ({e.msg}); fix or delete that line") from None


def inside_folder(name: str) -> PurePosixPath | None:
    """A path a metadata.jsonl gives, relative to its folder (backslashes read as slashes); None when it leaves the
    folder (absolute, a drive, or a ".." part)."""
    rel = PurePosixPath(name.replace("\\", "/"))
    return None if rel.is_absolute() or PureWindowsPath(name).drive or ".." in rel.parts else rel


def read_metadata(path: Path) -> dict[str, tuple[int, str | None]]:
    """Rows of a metadata.jsonl: relative file name (posix) -> (line number, caption or None); a later line for
    the same file wins. A file_name that leaves the folder (absolute, or with a ".." part) is refused."""
    out: dict[str, tuple[int, str | None]] = {}
    for n, row in metadata_rows(path):
        if not isinstance(row, dict) or "file_name" not in row:
            raise InputError(
                f'{path} line {n} has no "file_name"; each line must look like '
                f'{{"file_name": "sub/img.png", "text": "a caption"}}'
            )
        name = str(row["file_name"])
        rel = inside_folder(name)
        if rel is None:
            raise InputError(
                f"{path} line {n}: file_name {name!r} points outside the data folder {path.parent}; "
                f'give the image\'s path relative to that folder, e.g. "sub/img.png"'
            )
        text = next((row[k] for k in CAPTION_KEYS if k in row), None)
        out[rel.as_posix()] = (n, None if text is None else str(text).strip())  # "./a.png" -> "a.png"
    return out


def conditioning_files(path: Path) -> set[str]:
    """The `conditioning_image` paths (posix, relative) a metadata.jsonl names: paired ControlNet data, where they
    are conditions rather than training images (data/conditions.py reads and checks them)."""
    if not path.is_file():
        return set()
    out = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue  # read_metadata reports it, with its line number
        if isinstance(row, dict) and isinstance(row.get("conditioning_image"), str):
            out.add(PurePosixPath(row["conditioning_image"].replace("\\", "/")).as_posix())
    return out


def labels_of(files: list[Path]) -> tuple[list[str], list[int]]:
    """(class names, a label per file) from the first sub-folder of each relative path (-1 for files at the top)."""
    names = sorted({f.parts[0] for f in files if len(f.parts) > 1})
    index = {c: i for i, c in enumerate(names)}
    return names, [index[f.parts[0]] if len(f.parts) > 1 else -1 for f in files]


def captions_of(root: Path, files: list[Path], meta: dict[str, tuple[int, str | None]]) -> list[str] | None:
    """A caption per file (relative to root): its metadata.jsonl text, else its sidecar .txt, else ""; None when no
    file has one."""
    caps = []
    for f in files:
        cap = meta.get(f.as_posix(), (0, None))[1]
        side = (root / f).with_suffix(".txt")
        if cap is None and side.is_file():
            cap = side.read_text(encoding="utf-8", errors="replace").strip()
        caps.append(cap or "")
    return caps if any(caps) else None


def stored_size(cfg: DataConfig) -> int:
    """The side of the square kept per image: the resolution, plus a margin for random crops to move in."""
    return cfg.resolution + (cfg.resolution // 8 if cfg.crop == "random" else 0)


class ImageFolder(torch.utils.data.Dataset):
    """Images under the folder cfg.dataset, resized (shorter side) and cropped to cfg.resolution."""

    def __init__(self, cfg: DataConfig, root: str | Path | None = None):
        """cfg: resolution, channels, crop, flip, limit and max_pixels; root: the folder (default cfg.dataset)."""
        self.cfg, self.root = cfg, Path(root if root is not None else cfg.dataset).expanduser()
        self._check_root()
        files = find_images(self.root)
        paired = conditioning_files(self.root / "metadata.jsonl")
        files = [f for f in files if f.as_posix() not in paired]  # a ControlNet's condition images are no items
        if not files:
            raise MissingFileError(
                f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {self.root}; add images "
                f"there (one subfolder per class for labels) or point data.dataset elsewhere"
            )
        self._found = {f.as_posix() for f in files}
        if cfg.limit > 0:
            files = files[: cfg.limit]
        self._warned: set[str] = set()
        self.size = stored_size(cfg)
        self.cache = PreparedCache(Geometry(str(self.root.resolve()), self.size, cfg.channels, cfg.max_pixels))
        self._rows: list | None = None  # (cache shard, row) per item once prepare() ran
        known = self.cache.read_index()
        self.files = []
        self._left_out: dict[str, str] = {}  # relative path -> why, for the files the header check refused
        for f in files:
            entry = known.get(f.as_posix())
            why = None
            if entry is None or entry.get("stamp") != file_stamp(self.root / f):
                why = probe(self.root / f, self.size, cfg.max_pixels)
            if why is None:
                self.files.append(f)
            else:
                self._left_out[f.as_posix()] = why
                self._warn(f, why, replaced=False)
        if not self.files:
            raise InputError(
                f"none of the {len(files)} images under {self.root} could be read; check the files "
                f"or point data.dataset at another folder"
            )
        self._labels()
        self._captions(self._found)

    def _check_root(self) -> None:
        if not self.root.exists():
            raise MissingFileError(f"data folder {self.root} does not exist; set data.dataset to a folder of images")
        if not self.root.is_dir():
            raise InputError(f"data.dataset={self.root} is a file, not a folder; give the folder that holds the images")

    def _labels(self) -> None:
        """Class of each file: its first path component when images live in subfolders, else none (-1)."""
        self.class_names, self.labels = labels_of(self.files)

    def _captions(self, found: set[str]) -> None:
        """Caption of each file: metadata.jsonl first, then a sidecar .txt with the same stem; None if none.

        found: every image under root (before data.limit), to warn about metadata rows that name none of them.
        """
        meta_path = self.root / "metadata.jsonl"
        meta = read_metadata(meta_path) if meta_path.is_file() else {}
        orphans = [(n, name) for name, (n, _) in meta.items() if name not in found]
        if orphans:
            shown = ", ".join(f"line {n} ({name!r})" for n, name in sorted(orphans)[:5])
            more = f" and {len(orphans) - 5} more" if len(orphans) > 5 else ""
            warnings.warn(
                f"{meta_path} {shown}{more}: no such image under {self.root}, so the caption is "
                f"unused; fix the file_name or delete the line",
                stacklevel=3,
            )
        self.captions = captions_of(self.root, self.files, meta)

    def fingerprint(self) -> str:
        """A short content key for caches: the absolute folder, the settings that change pixels, and for every
        image its relative path, size and modification time (ns), with its sidecar caption's and metadata.jsonl's.
        Read from the disk when called, as the images are read when loaded."""
        c = self.cfg
        files = [
            [f.as_posix(), file_stamp(self.root / f), file_stamp((self.root / f).with_suffix(".txt"))]
            for f in self.files
        ]
        return digest(
            [
                "folder",
                str(self.root.resolve()),
                c.resolution,
                c.channels,
                c.crop,
                c.flip,
                c.limit,
                c.max_pixels,
                file_stamp(self.root / "metadata.jsonl"),
                files,
            ]
        )

    def _warn(self, rel: Path, why: str, replaced: bool = True) -> None:
        if str(rel) not in self._warned:
            self._warned.add(str(rel))
            instead = "another image is used in its place" if replaced else "it is left out"
            warnings.warn(
                f"skipping image {self.root / rel}: {why}; {instead}. Delete or replace the file to silence "
                f"this warning",
                stacklevel=3,
            )

    def __len__(self) -> int:
        return len(self.files)

    # --- the prepared-image cache -----------------------------------------------------------------------------

    def prepare(self, workers: int = 0, progress: bool = False) -> Report:
        """Build (or update) the prepared-image cache of this folder with `workers` decoding processes, then serve
        every item from it. Files that fail to decode are warned about and replaced by the next readable item.
        Returns the build's report; with progress, shows a progress bar and prints the report's line."""
        rels = [f.as_posix() for f in self.files]
        report, rows = self.cache.prepare(rels, self._found, workers, progress)
        report.left_out = dict(self._left_out)
        for rel, why in report.skipped.items():
            self._warn(Path(rel), why)
        if all(r is None for r in rows):
            raise InputError(f"no image under {self.root} could be decoded; check the files (see the warnings above)")
        self._rows = rows
        if progress:
            print(report.line(), file=sys.stderr)
        return report

    def _pixels(self, j: int) -> np.ndarray:
        """The stored (S, S, C) uint8 square of file j: from the cache after prepare(), else decoded now."""
        if self._rows is not None:
            return self.cache.pixels(*self._rows[j])
        return prepare_pixels(self.root / self.files[j], self.size, self.cfg.channels, self.cfg.max_pixels)

    def _load(self, i: int) -> tuple[int, np.ndarray]:
        """(j, pixels of file j): item i's file, else the next readable one (a failure is warned about once)."""
        for k in range(len(self)):
            j = (i + k) % len(self)
            rel = self.files[j]
            if str(rel) in self._warned:
                continue
            try:
                return j, self._pixels(j)
            except TooLarge as e:
                self._warn(rel, str(e))
            except Exception as e:  # noqa: BLE001 - a damaged file must not stop an epoch
                self._warn(rel, f"it cannot be decoded ({type(e).__name__}: {e})")
        raise InputError(f"no image under {self.root} could be decoded; check the files (see the warnings above)")

    def _window(self, arr: np.ndarray, top: int, left: int, flip: bool) -> np.ndarray:
        """The resolution-sized square of `arr` at (top, left), mirrored left-right if flip: (R, R, C)."""
        r = self.cfg.resolution
        out = arr[top : top + r, left : left + r]
        return out[:, ::-1] if flip else out

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} is out of range for {len(self)} images in {self.root}")
        i = i % len(self)
        j, arr = self._load(i)
        top = left = 0
        if self.size > self.cfg.resolution:  # random crops: the offset from torch's global RNG
            top, left = (int(torch.randint(0, self.size - self.cfg.resolution + 1, ()).item()) for _ in range(2))
        flip = bool(self.cfg.flip and torch.rand(()) < 0.5)
        x = uint8_to_tensor(np.array(self._window(arr, top, left, flip)))  # (C, R, R); a copy, not the cache's pages
        cap = self.captions[j] if self.captions is not None else ""
        return {"image": x, "label": self.labels[j], "caption": cap, "index": i}

    def load_batch(self, idx, generator: torch.Generator) -> torch.Tensor:
        """The images of items idx as uint8 (B, C, R, R), crops and flips drawn from `generator` alone (not the
        global RNG), so a batch is a pure function of its indices and the generator's seed."""
        b, r, extra = len(idx), self.cfg.resolution, self.size - self.cfg.resolution
        offsets = torch.randint(0, extra + 1, (b, 2), generator=generator) if extra else torch.zeros(b, 2, dtype=int)
        flips = torch.rand(b, generator=generator) < 0.5 if self.cfg.flip else torch.zeros(b, dtype=torch.bool)
        out = np.empty((b, self.cfg.channels, r, r), np.uint8)  # (B, C, R, R)
        for p, i in enumerate(idx):
            _, arr = self._load(int(i) % len(self))
            out[p] = self._window(arr, int(offsets[p, 0]), int(offsets[p, 1]), bool(flips[p])).transpose(2, 0, 1)
        return torch.from_numpy(out)
