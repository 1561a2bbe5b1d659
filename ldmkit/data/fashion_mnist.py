"""Fashion-MNIST from Debian's dataset-fashion-mnist package: 60k train / 10k test 28x28 grayscale clothing images.

The IDX files (big-endian header: magic, dimension sizes, then raw uint8) are parsed with numpy and kept in memory.
For resolution 32 the 28x28 images are padded by 2 px of background (black, value 0) on every side, which keeps
the pixels unresampled; for other resolutions they are padded to 32 and then resized (LANCZOS).
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import DataConfig
from ..errors import InputError, MissingFileError
from .common import digest, file_stamp
from .images import resize_and_crop, to_tensor, uint8_to_tensor

ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_PREFIX = {"train": "train", "test": "t10k"}


def split_files(split: str, root: str | Path = ROOT) -> tuple[Path, Path]:
    """The images and labels IDX files of one split."""
    if split not in _PREFIX:
        raise InputError(f"data.split={split!r} is not a Fashion-MNIST split; use 'train' or 'test'")
    base = Path(root)
    return base / f"{_PREFIX[split]}-images-idx3-ubyte.gz", base / f"{_PREFIX[split]}-labels-idx1-ubyte.gz"


def read_idx(path: Path) -> np.ndarray:
    """Parse an (optionally gzipped) IDX file: 0x0000, type byte 0x08 (uint8), ndim, big-endian int32 sizes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise InputError(
            f"{path} is not a uint8 IDX file; reinstall it with apt-get install --reinstall dataset-fashion-mnist"
        )
    ndim = data[3]
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise InputError(
            f"{path} is truncated ({arr.size} values for shape {shape}); reinstall it with "
            f"apt-get install --reinstall dataset-fashion-mnist"
        )
    return arr.reshape(shape)


@lru_cache(maxsize=2)
def load_arrays(split: str, root: str = str(ROOT)) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of one split, read once per process."""
    img_path, lab_path = split_files(split, root)
    for p in (img_path, lab_path):
        if not p.is_file():
            raise MissingFileError(
                f"Fashion-MNIST file {p} is missing; install it with "
                f"`apt-get install dataset-fashion-mnist` (or set data.dataset to a folder)"
            )
    images, labels = read_idx(img_path), read_idx(lab_path).astype(np.int64)
    if len(images) != len(labels):
        raise InputError(
            f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels; "
            f"reinstall with apt-get install --reinstall dataset-fashion-mnist"
        )
    return images, labels


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST items {"image", "label", "caption" (the class name), "index"} at cfg.resolution."""

    def __init__(self, cfg: DataConfig, root: str | Path = ROOT):
        """cfg: resolution, channels (3 replicates gray), split, limit, crop/flip; root: folder of the IDX files."""
        if cfg.channels not in (1, 3):
            raise InputError(f"data.channels={cfg.channels} is not supported; use 1 (grayscale) or 3 (RGB)")
        images, labels = load_arrays(cfg.split, str(root))
        n = min(cfg.limit, len(images)) if cfg.limit > 0 else len(images)
        self.images = np.pad(images[:n], ((0, 0), (2, 2), (2, 2)))  # (N, 32, 32), black background
        self.labels = labels[:n]
        self.cfg = cfg
        self.class_names = list(CLASS_NAMES)
        self.captions = [CLASS_NAMES[int(y)] for y in self.labels]
        # the arrays are read once here, so the key describes the files as they were then
        c = cfg
        self._fingerprint = digest(
            [
                "fashion-mnist",
                c.split,
                c.resolution,
                c.channels,
                c.crop,
                c.flip,
                n,
                [[str(f.resolve()), file_stamp(f)] for f in split_files(c.split, root)],
            ]
        )

    def fingerprint(self) -> str:
        """Content key for caches: the split's IDX files (path, size, mtime) and the settings that change pixels."""
        return self._fingerprint

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} is out of range for {len(self)} Fashion-MNIST images")
        i = i % len(self)
        arr = self.images[i]  # (32, 32) uint8
        if self.cfg.resolution == 32 and self.cfg.crop == "center":
            x = uint8_to_tensor(arr)  # (1, 32, 32)
        else:
            img = Image.fromarray(arr, "L")
            x = to_tensor(resize_and_crop(img, self.cfg.resolution, self.cfg.crop))  # (1, R, R)
        if self.cfg.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        if self.cfg.channels == 3:
            x = x.expand(3, -1, -1).contiguous()  # (3, R, R)
        label = int(self.labels[i])
        return {"image": x, "label": label, "caption": CLASS_NAMES[label], "index": i}
