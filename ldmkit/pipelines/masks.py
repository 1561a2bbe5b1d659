"""Inpainting masks: read from a file, brought to latent resolution, and the pixel-space composite.

A mask is (1, 1, H, W) float with values in {0, 1}: 1 (white) where the image is regenerated, 0 (black) where it
is kept. A mask file is read in grey as `load_image(path, 1)` does (palette and 16-bit files scaled by their bit
depth, transparency composited on white, so transparent areas are regenerated) and thresholded at half
brightness: grey >= 0.5 counts as white.

The final image is a composite in pixel space: every pixel outside the mask is the input's own value, exactly; the
feather only softens the seam inside the mask.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import InputError, MissingFileError
from ..tasks.masks import latent_mask  # noqa: F401  (the one rule, shared with training)
from .images import load_edit_image

FEATHER_PX = 4  # default width of the composite's ramp, in pixels, inside the mask (0: a hard edge)
MAX_FEATHER = 64  # the widest ramp: wider ones are shortened (with a warning), which bounds the composite's cost


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


def _window_max(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """The maximum of x over [i - radius, i + radius] along `dim` (False past the ends), for a bool tensor, in
    O(log radius) elementwise steps: maxima over windows of doubling widths, then two overlapping ones."""
    n, k = x.shape[dim], 2 * radius + 1
    pad = [0, 0] * (x.ndim - 1 - dim % x.ndim) + [radius, radius]
    m = F.pad(x, pad)  # bool pads with False
    w = 1
    while 2 * w <= k:  # m[i]: the maximum over [i, i + w - 1]
        m = m.narrow(dim, 0, m.shape[dim] - w) | m.narrow(dim, w, m.shape[dim] - w)
        w *= 2
    return m.narrow(dim, 0, n) | m.narrow(dim, k - w, n)


def _dilate(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of x (B, 1, H, W) bool by a square of side 2 radius + 1 (outside the image: nothing)."""
    return _window_max(_window_max(x, radius, -1), radius, -2) if radius else x


def feather_ramp(mask: torch.Tensor, feather_px: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, L), each (B, 1, H, W), 0 outside the mask: the chessboard distance d to the nearest kept pixel (1 along
    the mask's edge, counted up to L), and the ramp's length L = min(F + 1, ceil(T / 2)), F = feather_px, where T is
    the radius of the largest square inside the mask that covers the pixel (its local half-width: T >= r where the
    morphological opening of the mask by a square of side 2 r - 1 keeps the pixel). So a ramp never takes more than
    a quarter of the mask's width from each side: the middle half of every part of the mask, however thin, is fully
    regenerated. The image
    border does not count as a kept pixel."""
    inside = mask > 0.5  # (B, 1, H, W) bool
    depth, width = torch.zeros(inside.shape, device=mask.device), torch.zeros(inside.shape, device=mask.device)
    inner = inside  # the centres of the squares of radius r inside the mask (erosion by r - 1)
    for r in range(1, 2 * feather_px + 2):  # a half-width T >= 2 F + 1 already allows the whole ramp
        if r > 1:
            inner = ~_dilate(~inner, 1) & inside  # erosion by one pixel (the image border is not kept)
        if not bool(inner.any()):
            break  # eroded away: a huge --feather costs no more than the mask's own width
        if r <= feather_px + 1:
            depth += inner
        if r % 2:  # ceil(T / 2) needs only the odd radii
            width[_dilate(inner, r - 1)] = r  # the opening by radius r
    ramp = torch.minimum(torch.full(inside.shape, feather_px + 1.0, device=mask.device), torch.ceil(width / 2)) * inside
    return torch.minimum(depth, ramp), ramp


def feather_alpha(mask: torch.Tensor, feather_px: int, warn: bool = True) -> torch.Tensor:
    """The composite's weight of the generated image, (B, 1, H, W) in [0, 1]: 0 outside the mask, rising inside it
    as d / L with the distance d to the nearest kept pixel over a ramp of L <= feather_px + 1 pixels that never
    takes more than a quarter of the mask's local width from each side (feather_ramp), so the middle of the mask is
    always fully regenerated, and never more than MAX_FEATHER. warn: a warning when a feather wider than the
    default FEATHER_PX had to be shortened (a default ramp is shortened silently in a thin mask)."""
    if feather_px < 0:
        raise InputError(f"--feather {feather_px} is negative; use 0 (a hard edge) or a few pixels")
    mask = (mask > 0.5).float()
    if feather_px == 0:
        return mask
    d, ramp = feather_ramp(mask, min(feather_px, MAX_FEATHER))
    inside = mask > 0
    if warn and feather_px > FEATHER_PX and bool((ramp[inside] < feather_px + 1).any()):
        widest = int(ramp[inside].max()) - 1
        warnings.warn(
            f"--feather {feather_px} is shortened to {widest} pixels at most in this mask: the ramp never takes "
            f"more than a quarter of the mask's width from each side, so that its middle is fully regenerated, nor "
            f"more than "
            f"{MAX_FEATHER} pixels; give a smaller --feather to silence this",
            stacklevel=2,
        )
    return torch.where(inside, d / ramp.clamp(min=1), torch.zeros_like(mask))


def composite(original: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor, feather_px: int = FEATHER_PX):
    """original (1 or B, C, H, W) where the mask (1 or B, 1, H, W) is 0, exactly; the generated (B, C, H, W)
    blended in where it is 1, with a ramp `feather_px` pixels wide along the inside of the mask's edge."""
    alpha = feather_alpha(mask.to(generated.device), feather_px)  # (B, 1, H, W)
    original = original.to(generated.device, generated.dtype).expand_as(generated)
    blended = alpha * generated + (1 - alpha) * original
    return torch.where(alpha > 0, blended, original)  # the kept region bit for bit
