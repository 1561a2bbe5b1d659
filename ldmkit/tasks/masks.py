"""Random training masks for inpainting models: boxes, brush strokes, borders (outpainting) and the whole image.

A mask is (B, 1, H, W) float with values in {0, 1}, 1 where the model regenerates, as at inference
(pipelines/masks.py). Every draw comes from the generator it is given, so the masks of a training step are a pure
function of (seed, step) and an exact resume draws the same ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError

MASK_KINDS = ("box", "brush", "border", "whole")  # drawn with equal probability per item


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _integer(gen: torch.Generator, lo: int, hi: int) -> int:
    """A whole number in [lo, hi], both included."""
    return int(torch.randint(lo, hi + 1, (), generator=gen))


def box_mask(h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """One to three rectangles, each 1/8 to 3/4 of the image's side: (H, W)."""
    m = torch.zeros(h, w)
    for _ in range(_integer(gen, 1, 3)):
        bh, bw = (max(1, round(_uniform(gen, 0.125, 0.75) * s)) for s in (h, w))
        y, x = _integer(gen, 0, h - bh), _integer(gen, 0, w - bw)
        m[y : y + bh, x : x + bw] = 1
    return m


def brush_mask(h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """One to three thick polylines of 2 to 5 segments with random vertices: (H, W). A pixel is painted when its
    centre lies within the stroke's radius (1/20 to 1/8 of the shorter side, at least one pixel) of a segment."""
    ys = torch.arange(h, dtype=torch.float32).view(h, 1) + 0.5  # (H, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, w) + 0.5  # (1, W)
    m = torch.zeros(h, w)
    for _ in range(_integer(gen, 1, 3)):
        radius = max(1.0, _uniform(gen, 0.05, 0.125) * min(h, w))
        pts = torch.rand(_integer(gen, 3, 6), 2, generator=gen) * torch.tensor([h, w])  # (V, 2) as (y, x)
        for (ay, ax), (by, bx) in zip(pts[:-1].tolist(), pts[1:].tolist()):
            dy, dx = by - ay, bx - ax
            # projection of every pixel centre on the segment a -> b, clamped to it: t in [0, 1]
            t = (((ys - ay) * dy + (xs - ax) * dx) / max(dy * dy + dx * dx, 1e-12)).clamp(0, 1)  # (H, W)
            d2 = (ys - ay - t * dy) ** 2 + (xs - ax - t * dx) ** 2  # (H, W) squared distance to the segment
            m = torch.maximum(m, (d2 <= radius * radius).float())
    return m


def border_mask(h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """A band along one or more sides (top, bottom, left, right), each 1/8 to 1/2 of the image: (H, W). This is
    what outpainting regenerates after padding an image."""
    sides = _integer(gen, 1, 15)  # a non-empty subset of the four sides, as bits
    m = torch.zeros(h, w)
    for bit, side in enumerate(("top", "bottom", "left", "right")):
        if not sides >> bit & 1:
            continue
        n = max(1, round(_uniform(gen, 0.125, 0.5) * (h if side in ("top", "bottom") else w)))
        if side == "top":
            m[:n] = 1
        elif side == "bottom":
            m[h - n :] = 1
        elif side == "left":
            m[:, :n] = 1
        else:
            m[:, w - n :] = 1
    return m


def whole_mask(h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """Everything regenerated: (H, W) of ones. Keeps the model able to draw a whole image from its condition."""
    return torch.ones(h, w)


DRAW = {"box": box_mask, "brush": brush_mask, "border": border_mask, "whole": whole_mask}


def random_masks(n: int, size: tuple[int, int], gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """n masks (n, 1, H, W) in {0, 1} for images of `size` (H, W), each of a kind drawn uniformly from MASK_KINDS,
    and the kind of each; every draw comes from `gen` (a CPU generator)."""
    h, w = size
    kinds = [MASK_KINDS[int(k)] for k in torch.randint(len(MASK_KINDS), (n,), generator=gen)]
    masks = torch.stack([DRAW[k](h, w, gen) for k in kinds]).unsqueeze(1)  # (n, 1, H, W)
    return masks, kinds


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """The mask (B, 1, H, W) at latent resolution (B, 1, H/f, W/f): a latent cell is regenerated when any of its
    f x f pixels is (max-pooling), in training and when inpainting with a model trained here."""
    if mask.shape[-2] % factor or mask.shape[-1] % factor:
        raise InputError(
            f"mask size {tuple(mask.shape[-2:])} is not a multiple of the autoencoder's factor {factor}; "
            f"pad it first (pipelines.images.pad_to_multiple)"
        )
    return F.max_pool2d(mask.float(), factor) if factor > 1 else mask.float()
