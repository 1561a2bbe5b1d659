"""PIL <-> tensor helpers shared across the project: loading, resizing and cropping, and labelled sample grids.

Tensors are float images in [-1, 1], shaped (C, H, W) or (B, C, H, W). Every file is written atomically: to a
temporary file in the target folder first, then `os.replace`d over the destination, so a crash never leaves a
half-written PNG behind.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from PIL.PngImagePlugin import PngInfo

from ..checkpoint import atomic_write
from ..errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to "L" (channels=1) or "RGB" (channels=3); transparency is composited on white."""
    if channels not in (1, 3):
        raise InputError(f"channels={channels} is not supported; use 1 (grayscale) or 3 (RGB)")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("RGB", "L") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr / max(arr.max(), 1.0) * 255.0, 0, 255).astype(np.uint8), "L")
    return img.convert("L" if channels == 1 else "RGB")


def load_image(path: str | Path, channels: int = 3) -> Image.Image:
    """Open an image file fully (first frame of an animation, EXIF-upright) as "L" or "RGB"; OSError if unreadable."""
    with Image.open(path) as img:
        img.seek(0)
        img.load()
        return to_mode(ImageOps.exif_transpose(img), channels)  # camera photos: apply the EXIF rotation


def resize_and_crop(img: Image.Image, size: int, crop: str = "center") -> Image.Image:
    """Resize the shorter side to `size` (LANCZOS, antialiased) then crop a size x size square.

    crop="random" draws the offset from torch's global RNG, so a seeded DataLoader reproduces it.
    """
    if crop not in ("center", "random"):
        raise InputError(f"crop={crop!r} is not supported; use 'center' or 'random'")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    if crop == "random":
        left = int(torch.randint(0, nw - size + 1, ()).item())
        top = int(torch.randint(0, nh - size + 1, ()).item())
    else:
        left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL image ("L" or "RGB") as a float tensor (C, H, W) in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)  # (H, W) or (H, W, C)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)  # (C, H, W)


def uint8_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 array (H, W) or (H, W, C) -> float (C, H, W) in [-1, 1]."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_pil(x: torch.Tensor) -> Image.Image | list[Image.Image]:
    """(C, H, W) in [-1, 1] -> one PIL image; (B, C, H, W) -> a list. Values are clamped; C is 1 or 3."""
    if x.ndim == 4:
        return [to_pil(t) for t in x]
    if x.ndim != 3 or x.shape[0] not in (1, 3, 4):
        raise InputError(f"to_pil expects (C, H, W) or (B, C, H, W) with C in 1, 3, 4; got {tuple(x.shape)}")
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (C, H, W)
    arr = arr.permute(1, 2, 0).numpy()  # (H, W, C)
    if arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], "L")
    return Image.fromarray(arr, "RGB" if arr.shape[2] == 3 else "RGBA")


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Shorten `text` with an ellipsis until it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, labels: list[str] | None = None,
              metadata: dict[str, str] | None = None, padding: int = 2) -> Path:
    """Tile images (B, C, H, W) in [-1, 1] into one PNG, with a text label under each tile and `metadata`
    stored as PNG text chunks; written atomically. Returns the path."""
    if images.ndim == 3:
        images = images[None]
    b, c, h, w = images.shape
    if labels is not None and len(labels) != b:
        raise InputError(f"save_grid got {b} images but {len(labels)} labels; pass one label per image or None")
    nrow = max(1, min(nrow, b))
    rows = math.ceil(b / nrow)
    font = ImageFont.load_default()
    label_h = 12 if labels is not None and any(labels) else 0
    cell_w, cell_h = w + padding, h + label_h + padding
    canvas = Image.new("RGB", (nrow * cell_w + padding, rows * cell_h + padding), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, tile in enumerate(to_pil(images)):
        x0, y0 = padding + (i % nrow) * cell_w, padding + (i // nrow) * cell_h
        canvas.paste(tile.convert("RGB"), (x0, y0))
        if label_h and labels[i]:
            draw.text((x0 + 1, y0 + h), _fit_text(draw, str(labels[i]), font, w - 2), fill=(0, 0, 0), font=font)
    info = PngInfo()
    for k, v in (metadata or {}).items():
        info.add_itxt(str(k), str(v))
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG", pnginfo=info))
