"""Condition images for ControlNets: the built-in detectors, paired condition files, and condition images read for
sampling.

A condition image is (B, 3, H, W) float in [0, 1] at the image's resolution (three channels, as diffusers' ControlNets
take them). Detectors take images (B, C, H, W) in [-1, 1] (C = 1 or 3; 4 with an alpha channel):
- canny: Canny edges (OpenCV) of the grey image, white on black;
- mask: the foreground, white on black: from the alpha channel where there is one, else the pixels that differ from
  the background colour (the median of the border pixels), as for images composited on white like the emoji;
- colour: a coarse colour layout, the mean colour of each cell of a cells x cells grid.
Paired data (`--condition folder`) names each image's condition in metadata.jsonl, as diffusers' ControlNet training
takes it: {"file_name": "images/1.png", "conditioning_image": "conditions/1.png", "text": "..."}.
"""

from __future__ import annotations

import sys
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..config import ControlConfig
from ..errors import InputError, MissingFileError
from .folder import inside_folder, metadata_rows

DETECTORS = ("canny", "mask", "colour")
KINDS = DETECTORS + ("raw",)  # what `--control` takes: a detector run on the image, or the condition itself


def _grey_uint8(images: torch.Tensor) -> np.ndarray:
    rgb = images[:, :3] if images.shape[1] >= 3 else images[:, :1].expand(-1, 3, -1, -1)
    grey = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]  # (B, H, W) in [-1, 1]
    return ((grey.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def canny(images: torch.Tensor, low: int = 100, high: int = 200) -> torch.Tensor:
    """Canny edges of images (B, C, H, W) in [-1, 1] -> (B, 3, H, W) in {0, 1}."""
    import cv2  # OpenCV only where an edge map is asked for: `generate` imports this module, mostly without one

    edges = np.stack([cv2.Canny(g, low, high) for g in _grey_uint8(images)])  # (B, H, W) in {0, 255}
    return torch.from_numpy(edges > 0).float().unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def foreground_mask(images: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """The foreground of images (B, C, H, W) in [-1, 1] -> (B, 3, H, W) in {0, 1}: alpha > 0.5 with 4 channels, else
    pixels farther than `threshold` (in [0, 1] units, max over channels) from the median border colour."""
    x = (images.float().clamp(-1, 1) + 1) / 2
    if x.shape[1] == 4:
        fg = x[:, 3] > 0.5
    else:
        border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)  # (B, C, 2H + 2W)
        bg = border.median(dim=-1).values[..., None, None]  # (B, C, 1, 1)
        fg = (x - bg).abs().amax(dim=1) > threshold
    return fg.float().unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def colour_layout(images: torch.Tensor, cells: int = 8) -> torch.Tensor:
    """The mean colour of each cell of a cells x cells grid of images (B, C, H, W) in [-1, 1] -> (B, 3, H, W)."""
    return F.interpolate(colour_cells(images, cells), size=images.shape[-2:], mode="nearest").contiguous()


def colour_cells(images: torch.Tensor, cells: int = 8) -> torch.Tensor:
    """The cells of colour_layout: (B, 3, min(cells, H), min(cells, W)) in [0, 1]."""
    x = (images[:, :3].float().clamp(-1, 1) + 1) / 2
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    return F.adaptive_avg_pool2d(x, (min(cells, h), min(cells, w)))


def detect(kind: str, images: torch.Tensor, cfg: ControlConfig | None = None) -> torch.Tensor:
    """The condition `kind` (a detector) of images (B, C, H, W) in [-1, 1] -> (B, 3, H, W) in [0, 1]."""
    cfg = cfg or ControlConfig()
    if kind == "canny":
        return canny(images, cfg.canny_low, cfg.canny_high)
    if kind == "mask":
        return foreground_mask(images)
    if kind == "colour":
        return colour_layout(images, cfg.colour_cells)
    raise InputError(f"unknown detector {kind!r}; use {' or '.join(DETECTORS)}, or raw for a ready condition image")


class DetectedConditions:
    """A training run's detector conditions, each item's detected the first time the item is drawn and kept: for
    data whose item is the same image every time it is drawn (a centre crop, no flip), later steps reuse it, bit for
    bit what the detector gives. Kept small: an edge map or a mask as one byte a pixel, a colour layout as its grid of
    cells; past `max_bytes` further items are detected at every draw. One cache holds one detector with one set of
    settings (a run's)."""

    def __init__(self, kind: str, cfg: ControlConfig, max_bytes: int = 2**30):
        if kind not in DETECTORS:
            raise InputError(f"unknown detector {kind!r}; use {' or '.join(DETECTORS)}")
        self.kind, self.cfg, self.max_bytes = kind, cfg, max_bytes
        self.items: dict[int, torch.Tensor] = {}
        self.bytes = 0

    def batch(self, idx, images: torch.Tensor) -> torch.Tensor:
        """The conditions (B, 3, H, W) in [0, 1] of items idx, whose images (B, C, H, W) in [-1, 1] are given."""
        keys, size = [int(i) for i in idx], tuple(images.shape[-2:])
        new = [k for k, i in enumerate(keys) if i not in self.items]
        if new:
            x = images[new].cpu()
            if self.kind == "colour":
                small = colour_cells(x, self.cfg.colour_cells)  # (N, 3, cells, cells)
            else:
                small = detect(self.kind, x, self.cfg)[:, 0].to(torch.uint8)  # (N, H, W): the 3 channels are one
            for k, s in zip(new, small):
                if self.bytes + s.numel() * s.element_size() > self.max_bytes:
                    break
                self.items[keys[k]] = s
                self.bytes += s.numel() * s.element_size()
        out = [self._expand(self.items[i], size) if i in self.items else None for i in keys]
        missing = [k for k, c in enumerate(out) if c is None]  # past max_bytes: detected at every draw
        if missing:
            for k, c in zip(missing, detect(self.kind, images[missing].cpu(), self.cfg)):
                out[k] = c
        return torch.stack(out)

    def _expand(self, small: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.kind != "colour":
            return small.float().expand(3, -1, -1)
        return F.interpolate(small[None], size=size, mode="nearest")[0]


def _read(path: Path, what: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError:
        raise MissingFileError(f"{what} {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise InputError(f"{what} {path} is empty, truncated or not an image ({e})") from None


def _fit(img: Image.Image, size: tuple[int, int], what: str) -> Image.Image:
    """img resized to size (H, W), with a note; refused when its aspect ratio differs by more than 1%."""
    h, w = size
    if img.size == (w, h):
        return img
    a, b = img.width / img.height, w / h
    if abs(a / b - 1) > 0.01:
        raise InputError(
            f"{what} is {img.width}x{img.height}, whose aspect ratio differs from the output's {w}x{h} by more "
            f"than 1%; crop it to the output's shape"
        )
    print(f"note: {what} is {img.width}x{img.height}; resized to {w}x{h}", file=sys.stderr)
    return img.resize((w, h), Image.Resampling.BICUBIC)


def condition_image(
    kind: str, path: str | Path, size: tuple[int, int], cfg: ControlConfig | None = None, note: bool = True
) -> torch.Tensor:
    """The condition (1, 3, H, W) in [0, 1] that `--control KIND:IMAGE` gives a ControlNet at output size (H, W):
    the detector `kind` run on the image, or the image itself for `raw` (a greyscale one converted with a note)."""
    if kind not in KINDS:
        raise InputError(f"unknown detector {kind!r} in --control; use {' or '.join(KINDS)}")
    return condition_of(kind, _read(Path(path), "the control image"), size, cfg, f"the control image {path}", note)


def condition_of(
    kind: str, img: Image.Image, size: tuple[int, int], cfg: ControlConfig | None = None, what: str = "", note=True
) -> torch.Tensor:
    """condition_image for an image already read (a served request's); `what` names it in notes and errors."""
    what = what or "the control image"
    img = _fit(img, size, what)
    if kind == "raw":
        if img.mode not in ("RGB", "RGBA") and note:
            print(f"note: {what} is {img.mode}, not RGB; converted to three channels", file=sys.stderr)
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()
    mode = "RGBA" if kind == "mask" and ("A" in img.mode or "transparency" in img.info) else "RGB"
    arr = np.asarray(img.convert(mode), dtype=np.float32) / 127.5 - 1.0
    return detect(kind, torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0), cfg)


class PairedConditions:
    """The condition image of each item of an image folder, from its metadata.jsonl's `conditioning_image`."""

    def __init__(self, dataset):
        """dataset: a FolderDataset (data/folder.py); its centre crops are the conditions' (no random crop, no flip,
        which would move the image away from its condition)."""
        cfg, root = dataset.cfg, Path(dataset.root)
        if cfg.crop != "center" or cfg.flip:
            raise InputError(
                "--condition folder pairs each image with its condition, so data.crop must be center and data.flip "
                "false (a random crop or flip would move the image away from its condition)"
            )
        meta = root / "metadata.jsonl"
        if not meta.is_file():
            raise MissingFileError(
                f"--condition folder reads {meta}, which does not exist; add one line per image: "
                '{"file_name": "images/1.png", "conditioning_image": "conditions/1.png", "text": "..."}'
            )
        rows: dict[str, tuple[int, str]] = {}
        for n, row in metadata_rows(meta):
            if not isinstance(row, dict) or "file_name" not in row:
                continue  # read_metadata (data/folder.py) reports it
            cond = row.get("conditioning_image")
            if not isinstance(cond, str) or not cond:
                raise InputError(f'{meta} line {n} has no "conditioning_image"; --condition folder needs one per image')
            rel = inside_folder(cond)
            if rel is None:
                raise InputError(
                    f"{meta} line {n}: conditioning_image {cond!r} points outside the data folder {root}; give its "
                    f"path relative to that folder"
                )
            if not (root / rel).is_file():
                raise MissingFileError(f"{meta} line {n}: conditioning_image {cond!r} does not exist under {root}")
            name = PurePosixPath(str(row["file_name"]).replace("\\", "/")).as_posix()
            rows[name] = (n, rel.as_posix())
        missing = [f.as_posix() for f in dataset.files if f.as_posix() not in rows]
        if missing:
            raise InputError(
                f"{meta} names no conditioning_image for {len(missing)} image(s), e.g. {missing[0]!r}; add a line "
                f"for each or remove those images"
            )
        self.root, self.rows, self.files, self.resolution = root, rows, list(dataset.files), cfg.resolution
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.files)

    def get(self, i: int) -> torch.Tensor:
        """Item i's condition (3, R, R) in [0, 1]: resized (shorter side) and centre-cropped as its image."""
        j = i % len(self.files)
        if j not in self._cache:
            n, rel = self.rows[self.files[j].as_posix()]
            img = _read(self.root / rel, f"metadata.jsonl line {n}: conditioning_image").convert("RGB")
            r = self.resolution
            s = r / min(img.size)
            img = img.resize((max(r, round(img.width * s)), max(r, round(img.height * s))), Image.Resampling.BICUBIC)
            left, top = (img.width - r) // 2, (img.height - r) // 2
            img = img.crop((left, top, left + r, top + r))
            arr = np.asarray(img, dtype=np.float32) / 255.0
            self._cache[j] = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        return self._cache[j]

    def batch(self, idx) -> torch.Tensor:
        return torch.stack([self.get(int(i)) for i in idx])  # (B, 3, R, R)
