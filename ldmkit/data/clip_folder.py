"""A folder of clips for video training: video files (mp4, webm, mkv, mov, avi, gif) or folders of frame images,
each with an optional caption in metadata.jsonl ({"file_name": "walk.mp4", "text": "a dog walking"}) or a sidecar
.txt, and a label from its first subfolder, as an image folder has.

Each item is `data.frames` frames sampled at `data.fps` from the clip's start (data/clips.py: decoding stops at the
last frame needed, so an hour-long clip costs what a short one does), resized and centre-cropped to the resolution.
A data folder is read as clips when data.frames is set (> 0). Building the data set only lists the folder; a clip
that cannot be decoded is skipped with its name when it is first read (a warning), and the next readable clip takes
its place, as a damaged image in an image folder.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import InputError, MissingFileError
from .clips import VIDEO_SUFFIXES, ClipError, read_frames
from .common import digest, file_stamp
from .folder import captions_of, labels_of, read_metadata
from .images import IMAGE_SUFFIXES, resize_and_crop, to_mode, uint8_to_tensor
from .motion import DEFAULT_FRAMES


def find_clips(root: Path) -> list[Path]:
    """Clips under root, sorted by relative path: video files, and folders whose files are all frame images (the
    frames of one clip); hidden files and folders are skipped."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES and p.parent.suffix.lower() not in IMAGE_SUFFIXES:
            out.append(rel)
        elif p.is_dir() and _frame_folder(p):
            out.append(rel)
    return sorted(out, key=lambda r: r.as_posix())


def _frame_folder(p: Path) -> bool:
    files = [f for f in p.iterdir() if not f.name.startswith(".")]
    return bool(files) and all(f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES for f in files)


class ClipFolder(torch.utils.data.Dataset):
    """Clip items {"image": (F, C, R, R) in [-1, 1], "label", "caption", "index"} of the folder cfg.dataset."""

    def __init__(self, cfg: DataConfig, root: str | Path | None = None):
        """cfg: resolution, channels, limit, frames (0: 8) and fps; root: the folder (default cfg.dataset)."""
        self.cfg, self.root = cfg, Path(root if root is not None else cfg.dataset).expanduser()
        if not self.root.is_dir():
            raise MissingFileError(f"data folder {self.root} does not exist or is not a folder; give a folder of clips")
        self.frames = cfg.frames or DEFAULT_FRAMES
        files = find_clips(self.root)
        if not files:
            raise MissingFileError(
                f"no clips ({', '.join(VIDEO_SUFFIXES)}, or folders of frame images) found under {self.root}"
            )
        self.files = files[: cfg.limit] if cfg.limit > 0 else files
        self._warned: set[str] = set()
        self.class_names, self.labels = labels_of(self.files)
        meta_path = self.root / "metadata.jsonl"
        meta = read_metadata(meta_path) if meta_path.is_file() else {}
        self.captions = captions_of(self.root, self.files, meta)

    def fingerprint(self) -> str:
        """A content key for caches: the folder, the settings that change the frames, every clip's size and mtime."""
        c = self.cfg
        stamps = [[f.as_posix(), file_stamp(self.root / f)] for f in self.files]
        settings = [c.resolution, c.channels, self.frames, c.fps, c.limit]
        return digest(["clips", str(self.root.resolve()), settings, file_stamp(self.root / "metadata.jsonl"), stamps])

    def __len__(self) -> int:
        return len(self.files)

    def clip(self, j: int) -> torch.Tensor:
        """Clip j's frames (F, C, R, R) in [-1, 1] (ClipError when it cannot give them)."""
        frames = read_frames(self.root / self.files[j], self.frames, self.cfg.fps)
        r, c = self.cfg.resolution, self.cfg.channels
        return torch.stack(
            [uint8_to_tensor(np.array(to_mode(resize_and_crop(f, r, "center"), c))) for f in frames]
        )  # (F, C, R, R)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} is out of range for {len(self)} clips in {self.root}")
        i = i % len(self)
        for k in range(len(self)):
            j = (i + k) % len(self)
            rel = self.files[j].as_posix()
            if rel in self._warned:
                continue
            try:
                x = self.clip(j)
            except (ClipError, OSError, ValueError) as e:
                self._warned.add(rel)
                warnings.warn(
                    f"skipping clip {self.root / rel}: {e}; another clip is used in its place. Delete or replace the "
                    f"file to silence this warning",
                    stacklevel=2,
                )
                continue
            cap = self.captions[j] if self.captions is not None else ""
            return {"image": x, "label": self.labels[j], "caption": cap, "index": i}
        raise InputError(f"no clip under {self.root} could be decoded; check the files (see the warnings above)")
