"""A folder of images as a data set, with class labels from subfolders and captions from metadata or sidecars.

Layout (all optional beyond the images themselves):
    root/
      cats/001.png ...          class "cats": the immediate subfolder under root names the class
      dogs/abc.jpg ...          classes are the sorted subfolder names -> indices 0, 1, ...
      metadata.jsonl            {"file_name": "cats/001.png", "text": "a grey cat"} per line (imagefolder style)
      dogs/abc.txt              sidecar caption for dogs/abc.jpg (same stem), used where metadata has none
Images are found recursively (.png .jpg .jpeg .webp .bmp .gif; hidden files and folders skipped) in sorted
order, so item i is the same file on every machine. Each file's header is checked once up front; a file that is
unreadable there or later, at load time, is reported once with a warning naming it and replaced by the next
readable item, so one bad file never stops an epoch.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from PIL import Image

from ..config import DataConfig
from ..errors import InputError, MissingFileError
from .common import digest, file_stamp
from .images import IMAGE_SUFFIXES, load_image, resize_and_crop, to_tensor

CAPTION_KEYS = ("text", "caption")  # metadata.jsonl keys read as the caption, first found wins


def find_images(root: Path) -> list[Path]:
    """Image files under root, recursively, sorted by relative path; hidden files and folders are skipped."""
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in rel.parts) and p.is_file():
            out.append(rel)
    return sorted(out, key=lambda r: r.as_posix())


def read_metadata(path: Path) -> dict[str, tuple[int, str | None]]:
    """Rows of a metadata.jsonl: relative file name (posix) -> (line number, caption or None); a later line for
    the same file wins. A file_name that leaves the folder (absolute, or with a ".." part) is refused."""
    out: dict[str, tuple[int, str | None]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {n} is not valid JSON ({e.msg}); fix or delete that line") from None
        if not isinstance(row, dict) or "file_name" not in row:
            raise InputError(
                f'{path} line {n} has no "file_name"; each line must look like '
                f'{{"file_name": "sub/img.png", "text": "a caption"}}'
            )
        name = str(row["file_name"])
        rel = PurePosixPath(name.replace("\\", "/"))
        if rel.is_absolute() or PureWindowsPath(name).drive or ".." in rel.parts:
            raise InputError(
                f"{path} line {n}: file_name {name!r} points outside the data folder {path.parent}; "
                f'give the image\'s path relative to that folder, e.g. "sub/img.png"'
            )
        text = next((row[k] for k in CAPTION_KEYS if k in row), None)
        out[rel.as_posix()] = (n, None if text is None else str(text).strip())  # "./a.png" -> "a.png"
    return out


def header_ok(path: Path) -> bool:
    """A cheap check that `path` is an image Pillow can open: reads the header only, decodes no pixels."""
    try:
        with Image.open(path) as img:
            w, h = img.size
        return w > 0 and h > 0
    except Exception:  # noqa: BLE001 - any failure to parse the header means "unreadable"
        return False


class ImageFolder(torch.utils.data.Dataset):
    """Images under the folder cfg.dataset, resized (shorter side) and cropped to cfg.resolution."""

    def __init__(self, cfg: DataConfig, root: str | Path | None = None):
        """cfg: resolution, channels, crop, flip and limit; root: the folder (default cfg.dataset)."""
        self.cfg, self.root = cfg, Path(root if root is not None else cfg.dataset).expanduser()
        self._check_root()
        files = find_images(self.root)
        if not files:
            raise MissingFileError(
                f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {self.root}; add images "
                f"there (one subfolder per class for labels) or point data.dataset elsewhere"
            )
        found = {f.as_posix() for f in files}
        if cfg.limit > 0:
            files = files[: cfg.limit]
        self._warned: set[str] = set()
        bad = [f for f in files if not header_ok(self.root / f)]
        for f in bad:
            self._warn(f, "its header cannot be read")
        bad_set = set(bad)
        self.files = [f for f in files if f not in bad_set]
        if not self.files:
            raise InputError(
                f"none of the {len(files)} images under {self.root} could be read; check the files "
                f"or point data.dataset at another folder"
            )
        self._labels()
        self._captions(found)

    def _check_root(self) -> None:
        if not self.root.exists():
            raise MissingFileError(f"data folder {self.root} does not exist; set data.dataset to a folder of images")
        if not self.root.is_dir():
            raise InputError(f"data.dataset={self.root} is a file, not a folder; give the folder that holds the images")

    def _labels(self) -> None:
        """Class of each file: its first path component when images live in subfolders, else none (-1)."""
        nested = [f for f in self.files if len(f.parts) > 1]
        self.class_names = sorted({f.parts[0] for f in nested})
        index = {c: i for i, c in enumerate(self.class_names)}
        self.labels = [index[f.parts[0]] if len(f.parts) > 1 else -1 for f in self.files]

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
        caps = []
        for f in self.files:
            cap = meta.get(f.as_posix(), (0, None))[1]
            side = (self.root / f).with_suffix(".txt")
            if cap is None and side.is_file():
                cap = side.read_text(encoding="utf-8", errors="replace").strip()
            caps.append(cap or "")
        self.captions = caps if any(caps) else None

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
                file_stamp(self.root / "metadata.jsonl"),
                files,
            ]
        )

    def _warn(self, rel: Path, why: str) -> None:
        if str(rel) not in self._warned:
            self._warned.add(str(rel))
            warnings.warn(
                f"skipping image {self.root / rel}: {why}; another image is used in its place. "
                f"Delete or replace the file to silence this warning",
                stacklevel=3,
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} is out of range for {len(self)} images in {self.root}")
        i = i % len(self)
        for k in range(len(self)):  # this item, else the next readable one
            j = (i + k) % len(self)
            rel = self.files[j]
            if str(rel) in self._warned:
                continue
            try:
                img = load_image(self.root / rel, self.cfg.channels)
            except Exception as e:  # noqa: BLE001 - a damaged file must not stop an epoch
                self._warn(rel, f"it cannot be decoded ({type(e).__name__}: {e})")
                continue
            x = to_tensor(resize_and_crop(img, self.cfg.resolution, self.cfg.crop))  # (C, R, R)
            if self.cfg.flip and torch.rand(()) < 0.5:
                x = x.flip(-1)
            cap = self.captions[j] if self.captions is not None else ""
            return {"image": x, "label": self.labels[j], "caption": cap, "index": i}
        raise InputError(f"no image under {self.root} could be decoded; check the files (see the warnings above)")
