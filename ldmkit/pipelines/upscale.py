"""Latent super-resolution: sample a high-resolution image's latents conditioned on the low-resolution image.

An upscaler (task "upscale", trained by `ldmkit train --task upscale` or converted from Stable Diffusion's x4
upscaler) takes, beside its latent, the low-resolution image at the latent's size after noise augmentation to
`noise_level` (diffusion/lowres.py), and the level itself as a class-style embedding. Each image i draws, from its
own generator seeded seed + i, first the augmentation noise and then the initial latent noise (diffusers' order),
so a result does not depend on the batch size.

Images larger than the model's training size are sampled in tiles: at every denoiser call the latent is cut into
overlapping tiles (each with its part of the low-resolution image), each tile is denoised, and the predictions are
blended with weights that ramp linearly across the overlap (MultiDiffusion, Bar-Tal et al. 2023). The sampler
steps the whole latent, so neighbouring tiles agree at every step and no seam forms; the decoder runs tile by tile
the same way. An image that fits in one tile is sampled exactly as without tiling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch

from ..conditioning.types import Conditioning
from ..data.images import Sign
from ..diffusion.lowres import low_res_conditioning
from ..errors import InputError
from ..ldm import LatentDiffusion
from ..noise import randn
from ..shipped import model_config
from .images import MAX_EDIT_PIXELS, crop_to, load_edit_image
from .img2img import checkpoint_channels, model_image
from .masks import require_file
from .output import Finish, reading, write_edits
from .plan import collect, draw, plan, request_batches
from .record import input_record
from .request import SampleRequest, whole_number


@dataclass(frozen=True)
class UpscaleOptions:
    """How an upscale runs; values are checked here, naming the command-line option to change."""

    noise_level: int | None = None  # augmentation level of the input (None: the model's default, upscale.noise_level)
    tile: int = 0  # tile side in input pixels (0: twice the model's training size / factor; at least half of it)
    overlap: int = -1  # input pixels shared by neighbouring tiles (-1: a quarter of the tile)

    def __post_init__(self):
        if self.noise_level is not None:
            whole_number("--noise-level", self.noise_level, low=0, hint="20 is usual; higher trusts the input less")
        whole_number("--tile", self.tile, low=0, hint="use 0 for twice the model's training size")
        whole_number("--overlap", self.overlap, low=-1, hint="use -1 for a quarter of the tile")


def check_upscaler(ldm: LatentDiffusion, noise_level: int | None) -> int:
    """The noise level to use with `ldm` (InputError naming the model's task when it is not an upscaler, or naming
    the allowed range when the level is outside what it was trained on)."""
    ldm.task_spec.require(ldm, "upscale")
    up = ldm.run.upscale
    level = up.noise_level if noise_level is None else noise_level
    top = min(up.max_noise_level, ldm.run.backbone.num_classes - 1)
    if not 0 <= level <= top:
        raise InputError(
            f"--noise-level {level} is outside the levels {ldm.source or 'this model'} was trained on (0 to {top}); "
            f"{up.noise_level} is its default"
        )
    return level


@dataclass(frozen=True)
class Tiling:
    """Overlapping tiles over a latent (h, w): windows of side `tile` (latent pixels) `overlap` apart at most."""

    tile: int
    overlap: int

    def starts(self, length: int) -> list[int]:
        """Tile starts along an axis of `length`: 0, stride, 2 stride, ..., and the last tile flush with the end."""
        if length <= self.tile:
            return [0]
        stride = self.tile - self.overlap
        n = math.ceil((length - self.tile) / stride) + 1
        return sorted({min(i * stride, length - self.tile) for i in range(n)})

    def windows(self, h: int, w: int) -> list[tuple[slice, slice]]:
        return [
            (slice(y, min(y + self.tile, h)), slice(x, min(x + self.tile, w)))
            for y in self.starts(h)
            for x in self.starts(w)
        ]

    def weight(self, h: int, w: int, win: tuple[slice, slice], scale: int = 1) -> torch.Tensor:
        """(h', w') blending weight of a window (coordinates times `scale`): 1 inside, ramping down linearly over
        the overlap towards edges shared with another tile, 1 up to the image's border."""
        (ys, xs), ov = win, self.overlap * scale

        def ramp(start: int, stop: int, length: int) -> torch.Tensor:
            n = stop - start
            r = torch.ones(n)
            if ov > 0:
                k = torch.arange(n, dtype=torch.float32)
                if start > 0:
                    r = torch.minimum(r, (k + 1) / (ov + 1))
                if stop < length:
                    r = torch.minimum(r, (n - k) / (ov + 1))
            return r

        y = ramp(ys.start * scale, ys.stop * scale, h * scale)
        x = ramp(xs.start * scale, xs.stop * scale, w * scale)
        return y[:, None] * x[None, :]


class TiledDenoiser:
    """A denoiser applied tile by tile (see the module's doc); everything but the call is the wrapped denoiser's.
    Tiles of one size go through the network together, up to `max_batch` tile images per call."""

    def __init__(self, denoiser, tiling: Tiling, max_batch: int = 16):
        self.inner, self.tiling, self.max_batch = denoiser, tiling, max_batch

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, x: torch.Tensor, sigma, cond: Conditioning | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        wins = self.tiling.windows(h, w)
        if len(wins) == 1:
            return self.inner(x, sigma, cond)
        b = x.shape[0]
        out = torch.zeros_like(x)
        total = torch.zeros((h, w), dtype=x.dtype, device=x.device)
        per_call = max(1, self.max_batch // b)
        for i in range(0, len(wins), per_call):
            group = wins[i : i + per_call]  # every window of a tiling has the same size
            k = len(group)

            def cut(t: torch.Tensor, group=group, k=k) -> torch.Tensor:
                """Spatial tensors (the latent, the low-resolution image) cut per window; others repeated."""
                return torch.cat([t[..., ys, xs] for ys, xs in group]) if t.ndim == 4 else torch.cat([t] * k)

            sig = cut(sigma) if torch.is_tensor(sigma) and sigma.ndim == 1 else sigma
            pred = self.inner(cut(x), sig, cond.map(cut) if cond is not None else None)  # (k b, C, t, t)
            for j, (ys, xs) in enumerate(group):
                wt = self.tiling.weight(h, w, (ys, xs)).to(x)
                out[..., ys, xs] += pred[j * b : (j + 1) * b] * wt
                total[ys, xs] += wt
        return out / total


@torch.no_grad()
def decode_tiled(ldm: LatentDiffusion, z: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """ldm.decode(z) tile by tile with blended overlaps: images (B, C, h f, w f); one call when z fits a tile."""
    h, w = z.shape[-2:]
    wins = tiling.windows(h, w)
    if len(wins) == 1:
        return ldm.decode(z)
    f = ldm.factor
    out = None
    total = torch.zeros((h * f, w * f), device=z.device)
    for ys, xs in wins:
        part = ldm.decode(z[..., ys, xs])  # (B, C, h' f, w' f)
        if out is None:
            out = torch.zeros((z.shape[0], part.shape[1], h * f, w * f), device=z.device)
        wt = tiling.weight(h, w, (ys, xs), scale=f).to(part)
        py, px = slice(ys.start * f, ys.stop * f), slice(xs.start * f, xs.stop * f)
        out[..., py, px] += part * wt
        total[py, px] += wt
    return out / total


def tiling_for(ldm: LatentDiffusion, opts: UpscaleOptions) -> Tiling:
    """The latent tiling of `opts` (input pixels) for `ldm`: tiles a multiple of the U-Net's factor, by default
    twice the model's training size (a tile of the training size showed faint lines at its borders on 32x32 inputs:
    benchmarks/editing_quality.py measures them), and never under half of it (smaller tiles see too little of the
    image and give a mosaic)."""
    per_input = ldm.run.upscale.factor / ldm.factor  # latent pixels per input pixel
    unit = ldm.run.backbone.factor
    trained = ldm.run.data.resolution // ldm.factor  # the latent side the model was trained on
    least = max(unit, trained // 2)
    if opts.tile and round(opts.tile * per_input) < least:
        raise InputError(
            f"--tile {opts.tile} is below the least useful tile of {math.ceil(least / per_input)} input pixels (half "
            f"the model's training size): smaller tiles see too little of the image and give a mosaic; give at least "
            f"that, or 0 for the default of {round(2 * trained / per_input)}"
        )
    tile = round(opts.tile * per_input) if opts.tile else 2 * trained
    tile = max(unit, tile // unit * unit)
    overlap = tile // 4 if opts.overlap < 0 else round(opts.overlap * per_input)
    if overlap >= tile:
        side = round(tile / per_input)
        raise InputError(
            f"--overlap {opts.overlap} is not smaller than the tile of {side} input pixels; use an overlap below "
            f"{side} (a quarter of the tile is usual)"
        )
    return Tiling(tile, overlap)


def check_input_size(what: str, w: int, h: int, factor: int) -> None:
    """InputError naming `what` when a w x h input upscaled `factor` times would pass the editing limit."""
    limit = MAX_EDIT_PIXELS // factor**2
    if w * h > limit:
        side = int(limit**0.5)
        raise InputError(
            f"{what} is {w}x{h} pixels; upscaled {factor}x it would pass the limit of {MAX_EDIT_PIXELS:,} output "
            f"pixels ({int(MAX_EDIT_PIXELS**0.5)}x{int(MAX_EDIT_PIXELS**0.5)}), so an input may have at most "
            f"{limit:,} pixels (about {side}x{side}); crop it into parts or downscale it first (tiling bounds the "
            f"memory an upscale needs, not the size of its output)"
        )


@torch.no_grad()
def upscale_latents(
    ldm: LatentDiffusion,
    low: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    noise_level: int,
    req: SampleRequest,
    gens,
    tiling: Tiling | None = None,
    callback=None,
) -> torch.Tensor:
    """Latents (b, c, H/f, W/f) of the upscaled images of `low` (b, C, h, w) in [-1, 1] (its size already a multiple
    of what the model takes) under the text conditions cond / uncond (None: no guidance), each drawn with its
    generator in `gens`: first the augmentation noise, then the latent noise."""
    b, k = low.shape[0], ldm.run.upscale.factor
    size = (low.shape[-2] * k // ldm.factor, low.shape[-1] * k // ldm.factor)
    noise = randn((b, low.shape[1], *size), gens, device=ldm.device)  # first draw of each generator
    levels = torch.full((b,), noise_level, dtype=torch.long, device=ldm.device)
    lowres = low_res_conditioning(low.to(ldm.device), levels, ldm.run.upscale, noise, size)
    cond = replace(cond, labels=lowres.labels, concat=lowres.concat)
    if uncond is not None:
        uncond = replace(uncond, labels=lowres.labels, concat=lowres.concat)
    denoiser = TiledDenoiser(ldm.denoiser, tiling) if tiling is not None else None
    return draw(ldm, req, (b, ldm.latent_channels, *size), cond, uncond, gens, callback, denoiser=denoiser)


@torch.no_grad()
def upscale_batches(
    ldm: LatentDiffusion,
    image: torch.Tensor,
    req: SampleRequest,
    opts: UpscaleOptions = UpscaleOptions(),
    progress: bool = False,
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """(images (b, C, H*factor, W*factor) in [-1, 1] on the CPU, a caption per image) for each batch of req.n
    upscales of `image` (1, C, H, W) in [-1, 1]; image i uses seed + i. Everything is checked before sampling."""
    level = check_upscaler(ldm, opts.noise_level)
    if req.height or req.width:
        raise InputError("upscale works at --factor times the input's size; drop --height / --width")
    if req.labels:
        raise InputError("an upscaler takes no --label; give a --prompt (text upscalers) or nothing")
    up = ldm.run.upscale
    if isinstance(image, torch.Tensor) and image.ndim == 4:  # the output's limit, before the input's own
        check_input_size("the image", image.shape[-1], image.shape[-2], up.factor)
    # padded so that the latent (input * factor / f) is a multiple of the U-Net's factor
    unit = ldm.factor * ldm.run.backbone.factor // math.gcd(ldm.factor * ldm.run.backbone.factor, up.factor)
    x, size = model_image(ldm, image, unit)  # (1, C, H', W') checked, in the model's channels
    tiling = tiling_for(ldm, opts)
    p = plan(ldm, req)
    guide = ldm.text_encoder is not None  # an upscaler without text has nothing to guide against
    tiles = len(tiling.windows(x.shape[-2] * up.factor // ldm.factor, x.shape[-1] * up.factor // ldm.factor))
    for b in request_batches(ldm, req, p, "upscaling", progress, steps=req.steps, tiles=tiles):
        low = x.expand(b.size, -1, -1, -1)
        z = upscale_latents(ldm, low, b.cond, b.uncond if guide else None, level, req, b.generators, tiling, b.tick)
        out = decode_tiled(ldm, z, tiling)  # (b, C, H', W')
        yield crop_to(out, (size[0] * up.factor, size[1] * up.factor)).cpu(), b.captions


def upscale(
    ldm: LatentDiffusion,
    image: torch.Tensor,
    req: SampleRequest,
    opts: UpscaleOptions = UpscaleOptions(),
    progress: bool = False,
) -> tuple[torch.Tensor, list[str]]:
    """Upscaled images (n, C, H*factor, W*factor) in [-1, 1] and a caption per image (see upscale_batches)."""
    return collect(upscale_batches(ldm, image, req, opts, progress))


def upscale_to_file(
    checkpoint: str | Path,
    req: SampleRequest,
    image: str | Path,
    out: str | Path,
    opts: UpscaleOptions = UpscaleOptions(),
    progress: bool = True,
    finish: Finish | None = None,
    sign: Sign | None = None,
) -> list[Path]:
    """Upscale the image file `image` and write each result (see write_edits), the parameters embedded; the input
    and the options are checked before the model loads."""
    require_file(image, "image", "give the picture to upscale (PNG, JPEG, WebP, BMP or GIF)")
    x = load_edit_image(image, checkpoint_channels(checkpoint))  # (1, C, H, W): input mistakes before the model
    factor = (model_config(checkpoint) or {}).get("upscale", {}).get("factor")
    if isinstance(factor, int) and factor > 0:
        check_input_size(str(image), x.shape[-1], x.shape[-2], factor)
    about = {"image": input_record(image), "noise_level": opts.noise_level, "tile": opts.tile, "overlap": opts.overlap}
    batches = lambda ldm: upscale_batches(ldm, x, req, opts, progress)  # noqa: E731
    return write_edits(checkpoint, req, reading(out, image), batches, about, finish, sign)
