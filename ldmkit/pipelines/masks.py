"""Inpainting masks: read from a file, brought to latent resolution, and the pixel-space composite.

A mask is (1, 1, H, W) float with values in {0, 1}: 1 (white) where the image is regenerated, 0 (black) where it
is kept. A mask file is read in grey as `load_image(path, 1)` does (palette and 16-bit files scaled by their bit
depth, transparency composited on white, so transparent areas are regenerated) and thresholded at half
brightness: grey >= 0.5 counts as white.

The final image is a composite in pixel space: every pixel outside the mask is the input's own value, exactly; the
feather only softens the seam inside the mask.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import InputError, MissingFileError
from .images import load_edit_image

FEATHER_PX = 4  # default width of the composite's ramp, in pixels, inside the mask (0: a hard edge)


def require_file(path: str | Path, what: str, hint: str) -> Path:
    """`path` as a Path; MissingFileError naming `what` and the `hint` when it is not a file."""
    path = Path(path)
    if not path.is_file():
        folder = " (it is a folder)" if path.is_dir() else ""
        raise MissingFileError(f"{what} {path} does not exist{folder}; {hint}")
    return path


def load_mask(path: str | Path, size: tuple[int, int], resize: bool = False) -> torch.Tensor:
    """The mask file `path` as (1, 1, H, W) float in {0, 1} for an image of `size` (H, W); 1 (white) = regenerate.
    A mask of another size is an InputError naming both sizes, unless `resize` (nearest neighbour)."""
    path = require_file(path, "mask", "give an image file, white where the picture is regenerated and black where kept")
    grey = load_edit_image(path, 1)  # (1, 1, h, w) in [-1, 1]
    mask = (grey >= 0.0).float()  # grey in [0, 1] >= 0.5
    h, w = mask.shape[-2:]
    if (h, w) != tuple(size):
        if not resize:
            raise InputError(
                f"mask {path} is {w}x{h} pixels but the image is {size[1]}x{size[0]}; give a mask of the "
                f"image's size, or pass --resize-mask to scale it (nearest neighbour)"
            )
        mask = F.interpolate(mask, size=tuple(size), mode="nearest-exact")  # (1, 1, H, W)
    return mask


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """The mask (B, 1, H, W) at latent resolution (B, 1, H/f, W/f): a latent cell is regenerated when any of its
    f x f pixels is (max-pooling)."""
    if mask.shape[-2] % factor or mask.shape[-1] % factor:
        raise InputError(
            f"mask size {tuple(mask.shape[-2:])} is not a multiple of the autoencoder's factor {factor}; "
            f"pad it first (pipelines.images.pad_to_multiple)"
        )
    return F.max_pool2d(mask.float(), factor) if factor > 1 else mask.float()


def feather_alpha(mask: torch.Tensor, feather_px: int) -> torch.Tensor:
    """The composite's weight of the generated image, (B, 1, H, W) in [0, 1]: 0 outside the mask, rising inside it
    with the chessboard distance d to the nearest kept pixel as min(d, F + 1) / (F + 1), F = feather_px.
    The image border does not count as a kept pixel."""
    if feather_px < 0:
        raise InputError(f"--feather {feather_px} is negative; use 0 (a hard edge) or a few pixels")
    mask = (mask > 0.5).float()
    total, inner = mask.clone(), mask
    for _ in range(feather_px):
        inner = 1 - F.max_pool2d(1 - inner, 3, stride=1, padding=1)  # erosion by one pixel
        if not bool(inner.any()):
            break  # eroded away: further rings add nothing, so a huge --feather costs no more than the mask's size
        total = total + inner
    return total / (feather_px + 1)


def composite(original: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor, feather_px: int = FEATHER_PX):
    """original (1 or B, C, H, W) where the mask (1 or B, 1, H, W) is 0, exactly; the generated (B, C, H, W)
    blended in where it is 1, with a ramp `feather_px` pixels wide along the inside of the mask's edge."""
    alpha = feather_alpha(mask.to(generated.device), feather_px)  # (B, 1, H, W)
    original = original.to(generated.device, generated.dtype).expand_as(generated)
    blended = alpha * generated + (1 - alpha) * original
    return torch.where(alpha > 0, blended, original)  # the kept region bit for bit
