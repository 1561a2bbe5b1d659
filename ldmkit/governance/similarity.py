"""The training-data similarity screen: does a generated image copy one of the model's training images?

Generative models can reproduce training images (Carlini et al. 2023; Somepalli et al. 2023). The index keeps, per
training image, a THUMB x THUMB grayscale thumbnail (uint8) and a compact descriptor; a query runs in two stages:
1. retrieval: the cosine similarity of standardised RETRIEVE x RETRIEVE grayscale descriptors (zero mean, unit
   norm: brightness and contrast changes cancel) against every entry, for the image and its mirror; the best TOP_K;
2. verification: the normalised cross-correlation (NCC) of the query's COMPARE x COMPARE thumbnail with each
   candidate under a flip and a grid of crop boxes (sides 0.8 to 1, at several offsets): the best is the similarity.
A copy, mirrored, cropped to 80%, recoloured or JPEG-compressed keeps an NCC close to 1 under its own crop box;
an image that merely resembles the training image (same kind of object, another pose) does not line up pixel for
pixel, which a global descriptor alone cannot tell (benchmarks/memorisation.py measures both).

Hand-made rather than a learned copy-detection network: nothing may be downloaded, and the TF-Inception network
that ships offline costs about 0.1 s an image on the CPU, too much to index 60,000 images or to screen every output.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..checkpoint import atomic_write, read_metadata
from ..config import DataConfig
from ..data import build_dataset
from ..errors import InputError, MissingFileError
from ..shipped import SHIPPED, resolve_model

VERSION = 1
THUMB = 32  # side of the stored thumbnails
RETRIEVE = 12  # side of the retrieval descriptor
COMPARE = 24  # side at which candidates are verified
DETAIL_BLUR = 2.0  # verification compares detail: the thumbnail minus its Gaussian blur of this radius
TOP_K = 16
DEFAULT_THRESHOLD = 0.975  # detail NCC at or above which an output counts as a copy of a training image
CROPS = [
    (s, ox, oy)
    for s, k in ((1.0, 1), (0.9, 5), (0.8, 9))
    for ox in np.linspace(0, 1 - s, k)
    for oy in np.linspace(0, 1 - s, k)
]
RETRIEVE_CROPS = [(1.0, 0.0, 0.0)] + [(0.8, ox, oy) for ox in (0.0, 0.1, 0.2) for oy in (0.0, 0.1, 0.2)]
CROPS = list(dict.fromkeys((s, round(float(x), 4), round(float(y), 4)) for s, x, y in CROPS))


@dataclass(frozen=True)
class Match:
    name: str  # the training image's name (its file, or data set/split/index)
    index: int  # its position in the index
    similarity: float  # NCC in [-1, 1]; copies score close to 1


def _gray(image) -> np.ndarray:
    """uint8 (H, W) or (H, W, C), or a float tensor (C, H, W) in [-1, 1] -> float32 gray (H, W) in [0, 255]."""
    if isinstance(image, torch.Tensor):
        x = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).numpy()  # (C, H, W)
        return (x.mean(0) if x.shape[0] != 3 else np.tensordot([0.299, 0.587, 0.114], x, 1)).astype(np.float32)
    a = np.asarray(image)
    if a.ndim == 3:
        a = (
            a[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            if a.shape[2] >= 3
            else a[..., 0]
        )
    return a.astype(np.float32)


def _resized(gray: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(gray, "F").resize((side, side), Image.Resampling.BOX), np.float32)


def _standard(x: np.ndarray) -> np.ndarray:
    """Rows of x (N, D) with zero mean and unit norm (flat rows stay zero)."""
    x = x - x.mean(1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def _crop(img: Image.Image, box: tuple[float, float, float], side: int) -> np.ndarray:
    s, ox, oy = box
    w, h = img.size
    return np.asarray(
        img.resize((side, side), Image.Resampling.BILINEAR, box=(ox * w, oy * h, (ox + s) * w, (oy + s) * h))
    )


def _descriptors(thumbs: np.ndarray, boxes=((1.0, 0.0, 0.0),)) -> np.ndarray:
    """(N, THUMB, THUMB) thumbnails -> (N * len(boxes), RETRIEVE**2) standardised descriptors of each crop box, in
    that order (image-major). Vectorised: the thumbnails are box-filtered to half size, then each crop box is
    sampled bilinearly at RETRIEVE x RETRIEVE (an index of 60,000 images takes about a second)."""
    if not len(thumbs):
        return np.zeros((0, RETRIEVE * RETRIEVE), np.float32)
    out = []
    for start in range(0, len(thumbs), 4096):
        x = torch.from_numpy(np.array(thumbs[start : start + 4096], np.float32))[:, None]  # (n, 1, THUMB, THUMB)
        x = torch.nn.functional.avg_pool2d(x, 2)  # the antialiasing of the downsampling
        views = []
        for s, ox, oy in boxes:
            lin = (torch.arange(RETRIEVE, dtype=torch.float32) + 0.5) / RETRIEVE  # cell centres in [0, 1]
            gx, gy = (ox + s * lin) * 2 - 1, (oy + s * lin) * 2 - 1  # in grid_sample's [-1, 1]
            grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1).expand(len(x), -1, -1, -1)
            views.append(torch.nn.functional.grid_sample(x, grid, mode="bilinear", align_corners=False))
        v = torch.stack(views, 1).reshape(len(x) * len(boxes), -1)  # (n * boxes, RETRIEVE**2), image-major
        out.append(_standard(v.numpy()))
    return np.concatenate(out)


def _detail(x: np.ndarray) -> np.ndarray:
    """What verification compares: images (N, S, S) minus their Gaussian blur (radius DETAIL_BLUR, edges
    reflected), standardised rows (N, S * S): their fine structure, which copies share and look-alikes do not."""
    r = int(np.ceil(3 * DETAIL_BLUR))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / DETAIL_BLUR) ** 2)
    k = k / k.sum()
    t = torch.from_numpy(np.array(x, np.float32))[:, None]  # (N, 1, S, S)
    p = torch.nn.functional.pad(t, (r, r, r, r), mode="reflect")
    p = torch.nn.functional.conv2d(p, k.view(1, 1, 1, -1))
    blurred = torch.nn.functional.conv2d(p, k.view(1, 1, -1, 1))
    return _standard((t - blurred).flatten(1).numpy())


def _views(thumb: np.ndarray) -> np.ndarray:
    """The detail of every crop box of a thumbnail and of its mirror at COMPARE x COMPARE: (2 * len(CROPS), D)."""
    img = Image.fromarray(thumb.astype(np.float32), "F")
    flipped = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _detail(np.stack([_crop(m, box, COMPARE) for m in (img, flipped) for box in CROPS]))


class SimilarityIndex:
    """Thumbnails and descriptors of a model's training images; query() finds each image's nearest one."""

    def __init__(self, thumbs: np.ndarray | None = None, names: list[str] | None = None, source: str = ""):
        self.thumbs = np.zeros((0, THUMB, THUMB), np.uint8) if thumbs is None else thumbs  # (N, THUMB, THUMB)
        self.names = list(names or [])
        self.source = source  # what it was built from
        self.desc = _descriptors(self.thumbs, RETRIEVE_CROPS).astype(np.float16)  # (N * crops, RETRIEVE**2)

    def __len__(self) -> int:
        return len(self.names)

    def build(self, images: Iterable, names: list[str], progress: bool = True) -> SimilarityIndex:
        """Index `images` (uint8 (H, W[, C]) arrays or (C, H, W) tensors in [-1, 1]) under `names`."""
        thumbs = [
            np.clip(np.round(_resized(_gray(im), THUMB)), 0, 255).astype(np.uint8)
            for im in tqdm(images, total=len(names), desc="similarity index", disable=not progress)
        ]
        if len(thumbs) != len(names):
            raise InputError(f"{len(thumbs)} images but {len(names)} names; give one name per image")
        self.thumbs = np.stack(thumbs) if thumbs else self.thumbs
        self.names = list(names)
        self.desc = _descriptors(self.thumbs, RETRIEVE_CROPS).astype(np.float16)
        return self

    def query(self, pixels) -> list[Match]:
        """The nearest training image of each query image (uint8 (B, H, W, 3), or a list of arrays of any size)."""
        if not len(self):
            raise InputError("the similarity index is empty; build it from the model's training images")
        grays = [_gray(p) for p in pixels]
        thumbs = np.stack([_resized(g, THUMB) for g in grays])  # (B, THUMB, THUMB)
        q = _descriptors(thumbs)
        q_flip = _descriptors(thumbs[:, :, ::-1].copy())
        desc = self.desc.astype(np.float32)
        per_view = np.maximum(q @ desc.T, q_flip @ desc.T)  # (B, N * crops)
        scores = per_view.reshape(len(grays), len(self), len(RETRIEVE_CROPS)).max(2)  # (B, N)
        k = min(TOP_K, len(self))
        out = []
        for b in range(len(grays)):
            cands = np.argpartition(-scores[b], k - 1)[:k]
            probe = _detail(_crop(Image.fromarray(thumbs[b], "F"), (1.0, 0.0, 0.0), COMPARE)[None])[0]
            best = max(((float((_views(self.thumbs[c]) @ probe).max()), int(c)) for c in cands))
            out.append(Match(self.names[best[1]], best[1], best[0]))
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez_compressed(
                    f, version=VERSION, thumbs=self.thumbs, names=np.array(self.names), source=np.array(self.source)
                )

        atomic_write(path, write)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SimilarityIndex:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"similarity index {path} does not exist; build it with `ldmkit index build`")
        try:
            with np.load(path, allow_pickle=False) as z:
                version, thumbs, names, source = (
                    int(z["version"]),
                    z["thumbs"],
                    [str(n) for n in z["names"]],
                    str(z["source"]),
                )
        except (ValueError, KeyError, OSError) as e:
            raise InputError(
                f"{path} is not an ldmkit similarity index ({e}); build it with `ldmkit index build`"
            ) from None
        if version != VERSION:
            raise InputError(
                f"{path} is a version {version} index; this ldmkit reads version {VERSION}: build it again"
            )
        if thumbs.ndim != 3 or thumbs.shape[1:] != (THUMB, THUMB) or len(thumbs) != len(names):
            raise InputError(f"{path} is damaged (thumbnails {thumbs.shape}, {len(names)} names); build it again")
        return cls(thumbs, names, source)


def index_path_for(model_path: str | Path) -> Path:
    """Where a model's index lives: `weights/emoji.safetensors` -> `weights/emoji.index.npz`."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name.removesuffix(".safetensors") + ".index.npz")


def training_data(source: str) -> DataConfig:
    """The data a source names: a shipped model's or checkpoint's training data, a built-in data set, or a folder."""
    if source in SHIPPED or source.endswith(".safetensors"):
        meta = read_metadata(resolve_model(source))
        data = (meta.get("config") or {}).get("data")
        if not isinstance(data, dict):
            raise InputError(f"{source} does not say what it was trained on; index its data set or folder instead")
        known = {k: v for k, v in data.items() if k in DataConfig.__dataclass_fields__}
        return DataConfig(**known)
    if source in ("fashion-mnist", "emoji") or os.path.isdir(source):
        return DataConfig(dataset=source)
    raise InputError(f"{source!r} is neither a model (a shipped name or .safetensors) nor a data set or folder")


def build_index(source: str, out: str | Path, progress: bool = True) -> SimilarityIndex:
    """Index every training image of `source` (see training_data) and write the index to `out`."""
    data = training_data(source)
    ds = build_dataset(replace(data, limit=0, holdout=0, crop="center", flip=False))
    paths = getattr(ds, "files", None)
    names = (
        [str(p) for p in paths] if paths is not None else [f"{data.dataset}/{data.split}/{i}" for i in range(len(ds))]
    )
    images = (ds[i]["image"] for i in range(len(ds)))
    index = SimilarityIndex(source=source).build(images, names, progress)
    index.save(out)
    return index
