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
from pathlib import Path

import torch
from PIL import Image

from ..config import DataConfig
from .images import IMAGE_SUFFIXES, load_image, resize_and_crop, to_tensor
from ..errors import InputError, MissingFileError

CAPTION_KEYS = ("text", "caption")  # metadata.jsonl keys read as the caption, first found wins


def find_images(root: Path) -> list[Path]:
    """Image files under root, recursively, sorted by relative path; hidden files and folders are skipped."""
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in rel.parts) and p.is_file():
            out.append(rel)
    return sorted(out, key=lambda r: r.as_posix())


def read_metadata(path: Path) -> dict[str, str]:
    """Captions from a metadata.jsonl: relative file name (posix) -> text."""
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {n} is not valid JSON ({e.msg}); fix or delete that line") from None
        if not isinstance(row, dict) or "file_name" not in row:
            raise InputError(f"{path} line {n} has no \"file_name\"; each line must look like "
                             f"{{\"file_name\": \"sub/img.png\", \"text\": \"a caption\"}}")
        text = next((row[k] for k in CAPTION_KEYS if k in row), None)
        if text is not None:
            out[Path(str(row["file_name"])).as_posix()] = str(text).strip()  # Path drops a leading "./"
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
            raise MissingFileError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {self.root}; add images "
                                    f"there (one subfolder per class for labels) or point data.dataset elsewhere")
        if cfg.limit > 0:
            files = files[:cfg.limit]
        self._warned: set[str] = set()
        bad = [f for f in files if not header_ok(self.root / f)]
        for f in bad:
            self._warn(f, "its header cannot be read")
        bad_set = set(bad)
        self.files = [f for f in files if f not in bad_set]
        if not self.files:
            raise InputError(f"none of the {len(files)} images under {self.root} could be read; check the files "
                             f"or point data.dataset at another folder")
        self._labels()
        self._captions()

    def _check_root(self) -> None:
        if not self.root.exists():
            from . import BUILTINS

            raise MissingFileError(f"data folder {self.root} does not exist; set data.dataset to a folder of images "
                                    f"or to a built-in data set ({', '.join(BUILTINS)})")
        if not self.root.is_dir():
            raise InputError(f"data.dataset={self.root} is a file, not a folder; give the folder that "
                                     f"holds the images")

    def _labels(self) -> None:
        """Class of each file: its first path component when images live in subfolders, else none (-1)."""
        nested = [f for f in self.files if len(f.parts) > 1]
        self.class_names = sorted({f.parts[0] for f in nested})
        index = {c: i for i, c in enumerate(self.class_names)}
        self.labels = [index[f.parts[0]] if len(f.parts) > 1 else -1 for f in self.files]

    def _captions(self) -> None:
        """Caption of each file: metadata.jsonl first, then a sidecar .txt with the same stem; None if none."""
        meta_path = self.root / "metadata.jsonl"
        meta = read_metadata(meta_path) if meta_path.is_file() else {}
        caps = []
        for f in self.files:
            cap = meta.get(f.as_posix())
            side = (self.root / f).with_suffix(".txt")
            if cap is None and side.is_file():
                cap = side.read_text(encoding="utf-8", errors="replace").strip()
            caps.append(cap or "")
        self.captions = caps if any(caps) else None

    def _warn(self, rel: Path, why: str) -> None:
        if str(rel) not in self._warned:
            self._warned.add(str(rel))
            warnings.warn(f"skipping image {self.root / rel}: {why}; another image is used in its place. "
                          f"Delete or replace the file to silence this warning", stacklevel=3)

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
