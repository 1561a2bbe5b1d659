"""What every data set shares: content fingerprints for caches, subsets and the holdout split, stacking a batch.

Every data set has `fingerprint() -> str | None`: a short hash of what its items are made from (source files with
sizes and modification times, the settings that change pixels), so that caches of derived data (the latent
cache, FID reference statistics) are keyed by content and never serve stale results. `dataset_fingerprint`
extends that to any indexable set of images (see its docstring).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError

FINGERPRINT_MAX_ITEMS = 4096  # data sets without fingerprint(): hash the items of at most this many, else no key


def digest(parts) -> str:
    """A short hex key of JSON-able parts (16 hex digits of SHA-256)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_stamp(path: str | Path) -> list[int] | None:
    """[size, mtime_ns] of a file, None if there is none: a cheap proxy for its content."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def cache_home() -> Path:
    """Where every cache of ldmkit lives: $LDMKIT_CACHE (a leading ~ expanded), or ~/.cache/ldmkit when it is unset
    or set empty (an empty value used to put the caches in the current folder)."""
    value = os.environ.get("LDMKIT_CACHE", "")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "ldmkit"


def human_bytes(n: float) -> str:
    """A size in bytes for people: "812 bytes", "3.4 MiB", "1.2 GiB"."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _item_image(item) -> torch.Tensor:
    """The image of an item: a dict with "image", an (image, label) pair, or an image tensor itself."""
    if isinstance(item, dict):
        return item["image"]
    return item[0] if isinstance(item, (tuple, list)) else item


def _tensor_key(h, x) -> None:
    """Feed a tensor or array (shape, dtype and bytes) into the hash h."""
    a = x.detach().cpu().contiguous().numpy() if isinstance(x, torch.Tensor) else np.ascontiguousarray(x)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())


def dataset_fingerprint(ds) -> str | None:
    """A content key of `ds` for caches, or None when it has none (the caller then does not cache).

    - ds.fingerprint() where the data set has one (every ldmkit data set does);
    - torch.utils.data.Subset: the base's key and the indices;
    - a tensor of images: its bytes;
    - anything else indexable (a TensorDataset of tests, a user's own class) with at most FINGERPRINT_MAX_ITEMS
      items: the bytes of every item's image, label and caption, read with the global RNG saved and restored (a
      set with random augmentation then never hits the cache, which is safe); larger ones get None.
    """
    fp = getattr(ds, "fingerprint", None)
    if callable(fp):
        return fp()
    if isinstance(ds, torch.utils.data.Subset):
        base = dataset_fingerprint(ds.dataset)
        return None if base is None else digest(["subset", base, _indices_key(ds.indices)])
    h = hashlib.sha256()
    if isinstance(ds, (torch.Tensor, np.ndarray)):
        _tensor_key(h, ds)
        return h.hexdigest()[:16]
    if len(ds) > FINGERPRINT_MAX_ITEMS:
        return None
    with torch.random.fork_rng(devices=[]):
        for i in range(len(ds)):
            item = ds[i]
            _tensor_key(h, _item_image(item))
            if isinstance(item, dict):
                h.update(json.dumps([item.get("label"), item.get("caption")], default=str).encode())
            elif isinstance(item, (tuple, list)) and len(item) > 1:
                h.update(json.dumps([x if isinstance(x, (int, float, str)) else str(x) for x in item[1:]]).encode())
    return h.hexdigest()[:16]


def _indices_key(indices) -> list:
    """Indices in a compact JSON-able form: ["range", start, stop] for consecutive ones, else the list."""
    idx = [int(i) for i in indices]
    if idx and idx == list(range(idx[0], idx[0] + len(idx))):
        return ["range", idx[0], idx[0] + len(idx)]
    return idx


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

    def fingerprint(self) -> str | None:
        """The base's content key and these indices; None if the base has no key."""
        base = dataset_fingerprint(self.base)
        return None if base is None else digest(["subset", base, _indices_key(self.indices)])

    def __getitem__(self, i: int) -> dict:
        item = dict(self.base[self.indices[i]])
        item["index"] = i % len(self)
        return item

    @property
    def prepare(self):
        """The base's prepare() (an image folder's cache build), or None for a base held in memory."""
        return getattr(self.base, "prepare", None)

    @property
    def load_batch(self):
        """The base's load_batch for these indices, or None when the base has none."""
        base = getattr(self.base, "load_batch", None)
        if base is None:
            return None
        return lambda idx, generator: base([self.indices[int(i)] for i in idx], generator)


def split_holdout(ds, n: int) -> tuple[Subset, Subset]:
    """(train, holdout): the last n items are held out for evaluation, the rest train; deterministic."""
    if n < 0 or n >= len(ds):
        raise InputError(f"cannot hold out {n} of {len(ds)} images; set data.holdout between 0 and {len(ds) - 1}")
    cut = len(ds) - n
    return Subset(ds, range(cut)), Subset(ds, range(cut, len(ds)))


def prepare_dataset(ds, workers: int = 0, progress: bool = False):
    """Build the prepared-image cache of a data set read from files (an image folder, or a Subset of one) with
    `workers` decoding processes; returns its report, or None for a data set that lives in memory."""
    prepare = getattr(ds, "prepare", None)
    return prepare(workers=workers, progress=progress) if callable(prepare) else None


def reads_files(ds) -> bool:
    """Whether items of `ds` come from image files (so loading them in worker processes can pay)."""
    return callable(getattr(ds, "prepare", None))


def stack_images(dataset, idx) -> torch.Tensor:
    """The images of items `idx` of a data set in ldmkit's item format, stacked."""
    return torch.stack([dataset[int(i)]["image"] for i in idx])  # (B, C, H, W)
