"""PIL <-> tensor helpers shared across the project: loading, resizing and cropping, and labelled sample grids.

Tensors are float images in [-1, 1], shaped (C, H, W) or (B, C, H, W). Every file is written atomically: to a
temporary file in the target folder first, then `os.replace`d over the destination, so a crash never leaves a
half-written PNG behind.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import ExifTags, Image, ImageDraw, ImageFont, ImageOps
from PIL.PngImagePlugin import PngInfo

from ..checkpoint import atomic_write
from ..errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to "L" (channels=1) or "RGB" (channels=3); transparency is composited on white.

    16-bit grayscale ("I;16", "I;16B", "I;16L") is scaled by its bit depth, v * 255 / 65535, like Pillow's 16-bit
    RGB, so a dark image stays dark. Mode "I" (32-bit signed) holds 16-bit data when every value is in 0..65535
    (the usual case: Pillow opens many 16-bit files so) and is scaled the same way; otherwise by the int32 range,
    v * 255 / (2^31 - 1), negative values clipped to black.
    """
    if channels not in (1, 3):
        raise InputError(f"channels={channels} is not supported; use 1 (grayscale) or 3 (RGB)")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("RGB", "L") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)  # (H, W)
        top = 65535.0 if img.mode != "I" or arr.size == 0 or (arr.min() >= 0 and arr.max() <= 65535) else 2.0**31 - 1
        img = Image.fromarray(np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8), "L")
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
    """`text` on one line (line breaks shown as spaces), cut with an ellipsis to fit in `width` pixels. The cut is
    found by binary search on its length: a few measurements whatever the length, not one per removed character."""
    text = " ".join(text.splitlines())
    if draw.textlength(text, font=font) <= width:
        return text
    lo, hi = 0, len(text) - 1  # the longest k with text[:k] + "..." fitting lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if draw.textlength(text[:mid] + "...", font=font) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + "..."


# Image files ldmkit writes, by extension. Parameters go into PNG text chunks; in JPEG and WebP into the EXIF
# UserComment as one JSON object (ASCII; a JPEG holds at most 64 KiB of EXIF). Read them back with read_parameters.
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_ASCII_COMMENT = b"ASCII\0\0\0"  # EXIF UserComment character-code prefix
_JPEG_EXIF_MAX = 65533  # bytes in one JPEG APP1 marker, "Exif\0\0" included


def output_format(path: str | Path) -> str:
    """The Pillow format the extension of `path` names; InputError listing the supported extensions otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        what = f"the extension {suffix!r}" if suffix else "no extension"
        raise InputError(
            f"cannot write images to {path}: {what} is not an image format ldmkit writes; use one of "
            f"{', '.join(OUTPUT_FORMATS)}"
        )
    return OUTPUT_FORMATS[suffix]


def _save_options(path: str | Path, metadata: dict[str, str] | None) -> tuple[str, dict]:
    """(format, Pillow save options carrying `metadata`) for `path`; InputError when the format cannot hold it."""
    fmt = output_format(path)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if fmt == "PNG":
        info = PngInfo()
        for k, v in meta.items():
            info.add_itxt(k, v.encode("utf-8", "replace").decode("utf-8"))  # lone surrogates -> "?"
        return fmt, {"pnginfo": info}
    options = {"quality": 95}
    if meta:
        exif = Image.Exif()
        exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = _ASCII_COMMENT + json.dumps(meta).encode("ascii")
        options["exif"] = exif.tobytes()
        if fmt == "JPEG" and len(options["exif"]) > _JPEG_EXIF_MAX:
            raise InputError(
                f"the generation parameters ({len(options['exif'])} bytes) do not fit in the 64 KiB a "
                f"JPEG file holds; write {Path(path).with_suffix('.png')} or .webp instead"
            )
    return fmt, options


# sign(file bytes, metadata) -> the same file with content credentials (governance.credentials), PNG only
Sign = Callable[[bytes, dict[str, str]], bytes]


def check_writable(path: str | Path, metadata: dict[str, str] | None = None, signed: bool = False) -> None:
    """Everything write_image would check before writing, without writing: the extension, that `metadata` fits, and
    with signed=True that the format holds content credentials (PNG)."""
    fmt, _ = _save_options(path, metadata)
    if signed and fmt != "PNG":
        raise InputError(
            f"cannot sign {path}: content credentials are written into PNG files only; write "
            f"{Path(path).with_suffix('.png')} instead"
        )


def write_image(
    img: Image.Image, path: str | Path, metadata: dict[str, str] | None = None, sign: Sign | None = None
) -> Path:
    """Write `img` atomically in the format its extension names (OUTPUT_FORMATS) with `metadata`. Returns the path.
    sign: sign the file first (content credentials; the path must name a PNG)."""
    if sign is None:
        fmt, options = _save_options(path, metadata)
        return atomic_write(path, lambda tmp: img.save(tmp, format=fmt, **options))
    check_writable(path, metadata, signed=True)
    data = sign(png_bytes(img, metadata), metadata or {})
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def png_bytes(img: Image.Image, metadata: dict[str, str] | None = None) -> bytes:
    """`img` as the bytes of a PNG file carrying `metadata` (as write_image writes it to a .png)."""
    _, options = _save_options("image.png", metadata)
    buf = io.BytesIO()
    img.save(buf, format="PNG", **options)
    return buf.getvalue()


def read_parameters(path: str | Path) -> dict[str, str]:
    """The metadata write_image stored in `path`: PNG text chunks, or the JPEG / WebP EXIF UserComment object."""
    with Image.open(path) as im:
        if im.format == "PNG":
            return dict(im.text)
        raw = im.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    raw = bytes(raw or b"")
    return json.loads(raw[len(_ASCII_COMMENT) :].decode("ascii")) if raw.startswith(_ASCII_COMMENT) else {}


GRID_PADDING = 2  # pixels of white around every tile of a grid
GRID_LABEL = 12  # pixels of the caption line under each tile of a labelled grid


BOX_KEYS = ("left", "top", "right", "bottom")  # a tile's box, as a grid's record names its corners


@dataclass(frozen=True)
class GridLayout:
    """Where save_grid puts n tiles of h x w pixels: nrow tiles a row, each cell a tile, its caption line (label_h
    pixels, 0 without captions) and the padding."""

    n: int
    h: int
    w: int
    nrow: int
    label_h: int = 0
    padding: int = GRID_PADDING

    @property
    def rows(self) -> int:
        return math.ceil(self.n / self.nrow)

    @property
    def cell(self) -> tuple[int, int]:
        """(width, height) of one cell: a tile, its caption line and the padding after them."""
        return self.w + self.padding, self.h + self.label_h + self.padding

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole grid."""
        cw, ch = self.cell
        return self.nrow * cw + self.padding, self.rows * ch + self.padding

    def box(self, i: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of tile i in the grid, right and bottom excluded (PIL's crop box)."""
        cw, ch = self.cell
        x0, y0 = self.padding + (i % self.nrow) * cw, self.padding + (i // self.nrow) * ch
        return x0, y0, x0 + self.w, y0 + self.h

    def gutters_blank(self, pixels: np.ndarray, least: int = 235) -> bool:
        """Whether `pixels` (H, W) or (H, W, C) uint8, of this grid's size, are white (at least `least`, which
        allows for JPEG) in every padding strip between and around the cells: a test that the layout fits."""
        width, height = self.size
        if pixels.shape[:2] != (height, width):
            return False
        cw, ch = self.cell
        cols = np.concatenate([np.arange(k * cw, k * cw + self.padding) for k in range(self.nrow + 1)])
        rows = np.concatenate([np.arange(r * ch, r * ch + self.padding) for r in range(self.rows + 1)])
        return bool(pixels[:, cols].min() >= least and pixels[rows].min() >= least)


def grid_layouts(width: int, height: int, least_side: int = 1, max_nrow: int = 8) -> list[GridLayout]:
    """Every layout save_grid may have drawn as a grid of width x height pixels (captioned or not, up to max_nrow
    tiles a row, tiles of at least least_side pixels), with at least two cells, the most cells first. The number of
    tiles is taken as every cell (the last row may hold fewer: those cells are blank)."""
    found = []
    for label_h in (GRID_LABEL, 0):
        for nrow in range(1, max_nrow + 1):
            w = (width - GRID_PADDING) / nrow - GRID_PADDING
            if w != int(w) or w < least_side:
                continue
            for rows in range(1, (height - GRID_PADDING) // (least_side + label_h + GRID_PADDING) + 1):
                h = (height - GRID_PADDING) / rows - label_h - GRID_PADDING
                if h == int(h) and h >= least_side and nrow * rows > 1:
                    found.append(GridLayout(nrow * rows, int(h), int(w), nrow, label_h))
    return sorted(found, key=lambda g: -g.n)


def save_grid(
    images: torch.Tensor,
    path: str | Path,
    nrow: int = 8,
    labels: list[str] | None = None,
    metadata: dict[str, str] | None = None,
    padding: int = GRID_PADDING,
    sign: Sign | None = None,
) -> Path:
    """Tile images (B, C, H, W) in [-1, 1] into one image file with a one-line text label under each tile, in the
    format the extension of `path` names (.png, .jpg, .jpeg, .webp) with `metadata` (see write_image), signed by
    `sign` (a PNG only); written atomically. Returns the path. The tiles lie where grid_layout says."""
    check_writable(path, metadata, signed=sign is not None)  # before any drawing
    if images.ndim == 3:
        images = images[None]
    b, c, h, w = images.shape
    if labels is not None and len(labels) != b:
        raise InputError(f"save_grid got {b} images but {len(labels)} labels; pass one label per image or None")
    layout = grid_layout(b, h, w, nrow, labels, padding)
    font = ImageFont.load_default()
    canvas = Image.new("RGB", layout.size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, tile in enumerate(to_pil(images)):
        x0, y0, _, _ = layout.box(i)
        canvas.paste(tile.convert("RGB"), (x0, y0))
        if layout.label_h and labels[i]:
            draw.text((x0 + 1, y0 + h), _fit_text(draw, str(labels[i]), font, w - 2), fill=(0, 0, 0), font=font)
    return write_image(canvas, path, metadata, sign)


def grid_layout(
    n: int, h: int, w: int, nrow: int = 8, labels: list[str] | None = None, padding: int = GRID_PADDING
) -> GridLayout:
    """The layout save_grid draws n tiles of h x w pixels in, with these labels (a caption line when any is set)."""
    label_h = GRID_LABEL if labels is not None and any(labels) else 0
    return GridLayout(n, h, w, max(1, min(nrow, n)), label_h, padding)
