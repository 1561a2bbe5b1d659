"""Data sets: image folders with labels and captions, and the built-ins (Fashion-MNIST, emoji).

Every data set is a `torch.utils.data.Dataset` whose item is
`{"image": (C, H, W) float in [-1, 1], "label": int (-1 if none), "caption": str ("" if none), "index": int}` and
which has `class_names: list[str]` (empty if unlabelled) and `captions: list[str] | None` (every item's caption in
item order, for caching text embeddings). `build_dataset` picks one from `DataConfig.dataset`: a built-in name in
`BUILTINS` or a path to a folder of images.
"""
from __future__ import annotations

import torch

from ..config import DataConfig
from ..errors import InputError


def _fashion_mnist(cfg: DataConfig):
    from .fashion_mnist import FashionMNIST

    return FashionMNIST(cfg)


def _emoji(styles: tuple[str, ...]):
    def build(cfg: DataConfig):
        from .emoji import EmojiDataset

        return EmojiDataset(cfg, styles)

    return build


# name -> builder(cfg); the one registry of built-in data sets
BUILTINS = {
    "fashion-mnist": _fashion_mnist,
    "emoji": _emoji(("noto",)),
    "emoji-openmoji": _emoji(("openmoji",)),
    "emoji-all": _emoji(("noto", "openmoji")),
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
    from .folder import ImageFolder

    return ImageFolder(cfg)


class Subset(torch.utils.data.Dataset):
    """Items `indices` of a data set, renumbered from 0, keeping class_names and the matching captions."""

    def __init__(self, base, indices: range | list[int]):
        """base: a data set in ldmkit's item format; indices: the base items to keep, in order."""
        self.base, self.indices = base, list(indices)
        self.class_names = list(getattr(base, "class_names", []) or [])
        caps = getattr(base, "captions", None)
        self.captions = [caps[i] for i in self.indices] if caps is not None else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.base[self.indices[i]])
        item["index"] = i % len(self)
        return item


def split_holdout(ds, n: int) -> tuple[Subset, Subset]:
    """(train, holdout): the last n items are held out for evaluation, the rest train; deterministic."""
    if n < 0 or n >= len(ds):
        raise InputError(f"cannot hold out {n} of {len(ds)} images; set data.holdout between 0 and {len(ds) - 1}")
    cut = len(ds) - n
    return Subset(ds, range(cut)), Subset(ds, range(cut, len(ds)))


def stack_images(dataset, idx) -> torch.Tensor:
    """The images of items `idx` of a data set in ldmkit's item format, stacked."""
    return torch.stack([dataset[int(i)]["image"] for i in idx])  # (B, C, H, W)


__all__ = ["BUILTINS", "Subset", "build_dataset", "split_holdout", "stack_images"]
