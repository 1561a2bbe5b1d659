"""The images an edit starts from: read from a file the way a user means it, checked before any model work.

`load_edit_image` honours the EXIF rotation of camera photos, composites transparency on white, reads palette,
CMYK and 16-bit files (scaled by their bit depth), and refuses files larger than MAX_EDIT_PIXELS with an error
that names the limit. Sizes that a model cannot take (not a multiple of its factor) are padded by
`pad_to_multiple` and cropped back by `crop_to`, so an edit returns an image of the input's own size.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..data.images import load_image, to_tensor
from ..errors import InputError, MissingFileError

MAX_EDIT_PIXELS = 2048 * 2048  # larger inputs are refused: editing runs at the input's size, in one piece


def load_edit_image(path: str | Path, channels: int, max_pixels: int = MAX_EDIT_PIXELS) -> torch.Tensor:
    """The image file `path` as (1, C, H, W) in [-1, 1] with C = channels (1 or 3), upright, on white."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"image {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        with Image.open(path) as img:
            w, h = img.size
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{path} is not an image Pillow can read ({e}); give a PNG, JPEG, WebP, BMP or GIF") from None
    check_edit_size(str(path), w, h, max_pixels)
    try:
        return to_tensor(load_image(path, channels))[None]  # (1, C, H, W)
    except (Image.DecompressionBombError, OSError) as e:
        raise InputError(f"{path} cannot be decoded ({e}); the file may be truncated") from None


def check_edit_size(what: str, w: int, h: int, max_pixels: int = MAX_EDIT_PIXELS) -> None:
    """InputError naming `what` (a file, "the image") when a w x h image is over the editing limit."""
    if w * h > max_pixels:
        raise InputError(
            f"{what} is {w}x{h} = {w * h:,} pixels, over the editing limit of {max_pixels:,} "
            f"({int(max_pixels**0.5)}x{int(max_pixels**0.5)}): an edit runs at the image's own size, in one piece; "
            f"resize it first (`ldmkit upscale` makes images up to this limit from smaller ones, sampling in tiles)"
        )


LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma weights of R, G, B: what Pillow's RGB -> "L" uses


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Images (B, C, H, W) with C = 1 or 3 as (B, channels, H, W): RGB -> grayscale by ITU-R 601-2 luma (as
    Pillow's "L", without its rounding to 8 bits), grayscale -> RGB by repetition."""
    c = x.shape[1]
    if c not in (1, 3) or channels not in (1, 3):
        raise InputError(
            f"images with {c} channels cannot become {channels}; give 1 (grayscale) or 3 (RGB) channels "
            f"(composite transparency first: load_edit_image does)"
        )
    if c == channels:
        return x
    if channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()  # (B, 3, H, W)
    w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)  # (B, 1, H, W)


def pad_to_multiple(x: torch.Tensor, factor: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (B, C, H, W) on the right and bottom by edge replication to multiples of `factor`; returns the padded
    tensor and the original (H, W) for `crop_to`."""
    h, w = x.shape[-2:]
    ph, pw = -h % factor, -w % factor
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")  # (B, C, H + ph, W + pw)
    return x, (h, w)


def crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The top-left (H, W) of (B, C, H', W'): undoes `pad_to_multiple`."""
    return x[..., : size[0], : size[1]]
