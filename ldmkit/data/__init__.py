"""Data sets: image folders with labels and captions, and the built-ins (Fashion-MNIST, emoji, their clip sets).

Every data set is a `torch.utils.data.Dataset` whose item is
`{"image": (C, H, W) float in [-1, 1], "label": int (-1 if none), "caption": str ("" if none), "index": int}` and
which has `class_names: list[str]` (empty if unlabelled) and `captions: list[str] | None` (every item's caption in
item order, for caching text embeddings). `build_dataset` picks one from `DataConfig.dataset`: a built-in name in
`BUILTINS` or a path to a folder of images.
Every data set also has `fingerprint()` for content-keyed caches (see `common.py`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import DataConfig
from ..errors import InputError, MissingFileError
from .clip_folder import ClipFolder
from .common import Subset, dataset_fingerprint, prepare_dataset, split_holdout, stack_images
from .emoji import EmojiDataset
from .emoji_motion import EmojiMotion
from .fashion_mnist import FashionMNIST
from .folder import ImageFolder
from .moving_fashion import MovingFashion


def _fashion_mnist(cfg: DataConfig):
    return FashionMNIST(cfg)


def _emoji(styles: tuple[str, ...]):
    def build(cfg: DataConfig):
        return EmojiDataset(cfg, styles)

    return build


# name -> builder(cfg); the one registry of built-in data sets
BUILTINS = {
    "fashion-mnist": _fashion_mnist,
    "emoji": _emoji(("noto",)),
    "emoji-openmoji": _emoji(("openmoji",)),
    "emoji-all": _emoji(("noto", "openmoji")),
    "moving-fashion": MovingFashion,  # clips (F, C, H, W): the video task's built-in sets
    "emoji-motion": EmojiMotion,
}


def build_dataset(cfg: DataConfig) -> torch.utils.data.Dataset:
    """The data set named by cfg.dataset (a built-in name or an image folder path), with cfg.limit applied."""
    if cfg.crop not in ("center", "random"):
        raise InputError(f"data.crop={cfg.crop!r} is not supported; use center or random")
    if cfg.channels not in (1, 3):
        raise InputError(f"data.channels={cfg.channels} is not supported; use 1 (grayscale) or 3 (RGB)")
    if cfg.resolution < 1:
        raise InputError(f"data.resolution={cfg.resolution} must be a positive number of pixels, e.g. 32")
    if cfg.dataset in BUILTINS:
        return BUILTINS[cfg.dataset](cfg)
    if not Path(cfg.dataset).expanduser().exists():
        raise MissingFileError(
            f"data folder {cfg.dataset} does not exist; set data.dataset to a folder of images or "
            f"to a built-in data set ({', '.join(BUILTINS)})"
        )
    if cfg.frames > 0:  # a folder of clips: video files or folders of frames
        return ClipFolder(cfg)
    return ImageFolder(cfg)


__all__ = [
    "BUILTINS",
    "Subset",
    "build_dataset",
    "dataset_fingerprint",
    "prepare_dataset",
    "split_holdout",
    "stack_images",
]
