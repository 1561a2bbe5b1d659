"""Inpainting with any model: regenerate the white region of a mask, keep every other pixel of the image exactly.

The image is padded to a size the model takes and encoded; the guided denoiser is wrapped in `InpaintBlend`, which
replaces the kept latent region with the original noised to the current level; sampling starts from noise drawn
with one generator per image (image i uses seed + i at any batch size), optionally with RePaint resampling
(`--resample R --jump J`); the result is decoded, composited over the input in pixel space (`masks.composite`)
and cropped back to the input's size. A dedicated inpainting model (U-Net input: latent, mask, masked-image
latents, as Stable Diffusion's) gets the mask and the masked image as concat conditioning instead of the blend.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..conditioning.types import Conditioning
from ..data.images import Sign
from ..diffusion.sample import Known
from ..errors import InputError
from ..ldm import LatentDiffusion
from ..samplers.repaint import check_repaint, repaint_steps
from .control import ControlSpec, with_controls
from .images import crop_to, load_edit_image, pad_to_multiple
from .img2img import checkpoint_channels, model_image, with_loras
from .lora import LoRASpec
from .masks import FEATHER_PX, composite, latent_mask, load_mask, require_file
from .output import Finish, reading, write_edits
from .plan import collect, draw, plan, request_batches
from .record import input_record
from .request import MAX_STEPS, SampleRequest, whole_number

MAX_RESAMPLE = 50  # RePaint passes per jump point; each multiplies the sampling time, and 10 is the paper's
MAX_JUMP = MAX_STEPS  # steps back up at a jump point; it must also stay below --steps


@dataclass(frozen=True)
class InpaintOptions:
    """How an edit treats its mask; values are checked here, naming the command-line option to change."""

    resize_mask: bool = False  # scale a mask of another size to the image's (nearest neighbour) instead of refusing
    resample: int = 1  # RePaint: passes down from every jump point (1: no resampling)
    jump: int = 5  # RePaint: how many steps the walk goes back up at each jump point
    feather: int = FEATHER_PX  # pixels of the composite's ramp, inside the mask only

    def __post_init__(self):
        hint = "1 turns resampling off; RePaint uses up to 10"
        whole_number("--resample", self.resample, low=1, high=MAX_RESAMPLE, hint=hint)
        whole_number("--jump", self.jump, low=1, high=MAX_JUMP, hint="use a few steps, smaller than --steps")
        whole_number("--feather", self.feather, low=0, hint="use 0 (a hard edge) or a few pixels")


def concat_channels(ldm: LatentDiffusion) -> int:
    """The channels the model's U-Net takes beside the latent: 0 for a plain model, 1 + latent channels for a
    dedicated inpainting model (mask and masked-image latents, as Stable Diffusion's); InputError for any other."""
    ldm.task_spec.require(ldm, "inpaint")  # an upscaler cannot inpaint
    extra = ldm.run.backbone.in_channels - ldm.latent_channels
    if extra not in (0, ldm.latent_channels + 1):
        raise InputError(
            f"{ldm.source or 'this model'} takes {extra} concatenated input channels, not the inpainting layout "
            f"(1 mask + {ldm.latent_channels} masked-image latent channels); it cannot inpaint, so use a plain "
            f"text or class model or an inpainting model"
        )
    return extra


@dataclass(frozen=True)
class _Edit:
    """An edit's inputs prepared for the model (see prepare_edit)."""

    image: torch.Tensor  # (1, C, H', W') in [-1, 1], padded to the model's factor
    mask: torch.Tensor  # (1, 1, H', W'), 1 = regenerate
    size: tuple[int, int]  # the input's (H, W), to crop back to
    x0: torch.Tensor | None  # (1, c, h, w) latents of the image; None for an empty mask (nothing sampled)
    regenerate: torch.Tensor | None  # (1, 1, h, w) the latent cells the blend regenerates (all: no blend)
    concat: torch.Tensor | None  # (1, 1 + c, h, w) mask and masked-image latents for an inpainting model


def prepare_edit(ldm: LatentDiffusion, image: torch.Tensor, mask: torch.Tensor) -> _Edit:
    """image (1, C, H, W) in [-1, 1] and mask (1, 1, H, W) padded to the model's factor and encoded. A plain model
    gets the latent mask of the blend; a dedicated inpainting model gets its concat channels (the mask at latent
    size, and the latents of the image with the masked pixels set to 0) and no blend. The mask is brought to latent
    size as the model was trained: max-pooling for a model trained by `ldmkit train --task inpaint`, nearest
    neighbour (as diffusers does) for an imported one."""
    extra = concat_channels(ldm)
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4 or tuple(mask.shape[:2]) != (1, 1):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(f"the mask must be a tensor (1, 1, H, W) with 1 where the image is regenerated, got {shape}")
    if tuple(mask.shape[-2:]) != tuple(image.shape[-2:]):
        raise InputError(
            f"mask size {tuple(mask.shape[-2:])} differs from the image's {tuple(image.shape[-2:])}; give a mask of "
            f"the image's size (load_mask(path, size, resize=True) scales one)"
        )
    x, size = model_image(ldm, image)  # (1, C, H', W')
    m, _ = pad_to_multiple((mask.to(x) > 0.5).to(x), ldm.factor * ldm.run.backbone.factor)  # (1, 1, H', W')
    if not bool(m.any()):
        return _Edit(x, m, size, None, None, None)
    x0 = ldm.encode(x)  # (1, c, h, w)
    if not extra:
        return _Edit(x, m, size, x0, latent_mask(m, ldm.factor), None)
    # as the model saw masks in training: max-pooling when trained here, nearest for an imported SD inpainting model
    m_latent = ldm.task_spec.edit_latent_mask(m, tuple(x0.shape[-2:]), ldm.factor)  # (1, 1, h, w)
    concat = torch.cat([m_latent, ldm.encode(x * (1 - m))], dim=1)  # (1, 1 + c, h, w)
    return _Edit(x, m, size, x0, torch.ones_like(m_latent), concat)


def _with_concat(cond: Conditioning, concat: torch.Tensor | None, b: int) -> Conditioning:
    return cond if concat is None else replace(cond, concat=concat.expand(b, -1, -1, -1))


@torch.no_grad()
def inpaint_batches(
    ldm: LatentDiffusion,
    req: SampleRequest,
    image: torch.Tensor,
    mask: torch.Tensor,
    opts: InpaintOptions = InpaintOptions(),
    progress: bool = False,
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """(images (b, C, H, W) in [-1, 1] on the CPU, a caption per image) for each batch of req.batch_size edits of
    `image` (1, C, H, W) in [-1, 1] under `mask` (1, 1, H, W), 1 = regenerate. An empty mask yields the input
    unchanged, with a warning, and samples nothing."""
    ed = prepare_edit(ldm, image, mask)
    p = plan(ldm, replace(req, height=ed.image.shape[-2], width=ed.image.shape[-1]))
    empty = ed.x0 is None
    if empty:
        warnings.warn(
            "the mask is all black, so nothing is regenerated; the input is written unchanged, with no generation "
            "record, watermark or credentials (nothing in it was generated)",
            stacklevel=2,
        )
    steps = repaint_steps(req.steps, opts.resample, opts.jump)  # the progress bar's: RePaint's whole walk
    for b in request_batches(ldm, req, p, "inpainting", progress, quiet=empty, steps=steps):
        if empty:
            yield crop_to(ed.image, ed.size).cpu().expand(b.size, -1, -1, -1).clone(), b.captions
            continue
        x0 = ed.x0.expand(b.size, -1, -1, -1)
        cond, uncond = _with_concat(b.cond, ed.concat, b.size), _with_concat(b.uncond, ed.concat, b.size)
        known = Known(x0, ed.regenerate, opts.resample, opts.jump)
        z = draw(ldm, req, tuple(x0.shape), cond, uncond, b.generators, b.tick, known=known)
        out = composite(ed.image, ldm.decode(z), ed.mask, opts.feather)  # (b, C, H', W')
        yield crop_to(out, ed.size).cpu(), b.captions


def inpaint(
    ldm: LatentDiffusion,
    req: SampleRequest,
    image: torch.Tensor,
    mask: torch.Tensor,
    opts: InpaintOptions = InpaintOptions(),
    progress: bool = False,
) -> tuple[torch.Tensor, list[str]]:
    """Edited images (n, C, H, W) in [-1, 1] and a caption per image (see inpaint_batches)."""
    return collect(inpaint_batches(ldm, req, image, mask, opts, progress))


def edit_to_file(
    checkpoint: str | Path,
    req: SampleRequest,
    inputs: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    out: str | Path,
    opts: InpaintOptions,
    about: dict,
    progress: bool = True,
    finish: Finish | None = None,
    sign: Sign | None = None,
    loras: list[LoRASpec] | None = None,
    lora_merge: bool = False,
    controls: list[ControlSpec] | None = None,
) -> list[Path]:
    """Take (image (1, C, H, W), mask (1, 1, H, W)) from inputs(channels), inpaint, and write each edited image at
    the input's size (see write_edits) with the parameters and `about` (the input files) embedded. The options and
    inputs are checked before the model is loaded. loras: LoRAs on the model, unmerged or merged with lora_merge,
    each recorded with its SHA-256 (see img2img.with_loras); controls: ControlNets that steer the regenerated
    region, each condition at the image's size (see control.with_controls). The pixels the mask keeps stay the
    input's with every option: finish (the screen) gets them as `keep`, so a watermark goes only into the
    regenerated region (or, where that is too small to carry it, nowhere); an all-black mask writes the input with
    no record, mark or credentials."""
    check_repaint(req.steps, opts.resample, opts.jump)
    image, mask = inputs(checkpoint_channels(checkpoint))  # input mistakes before the model loads
    batches, used = with_loras(
        lambda ldm: inpaint_batches(ldm, req, image, mask, opts, progress), loras, lora_merge, req.loras
    )
    batches, steered = with_controls(batches, controls, tuple(image.shape[-2:]), req.steps)
    extra = {"resample": opts.resample, "jump": opts.jump, "feather": opts.feather, **about, **used, **steered}
    keep = (mask[0, 0] <= 0.5).cpu().numpy()  # (H, W): the pixels written bit for bit, watermark or not
    if finish is not None:
        finish = partial(finish, keep=keep)
    return write_edits(checkpoint, req, out, batches, extra, finish, sign, record=not keep.all())


def inpaint_to_file(
    checkpoint: str | Path,
    req: SampleRequest,
    image: str | Path,
    mask: str | Path,
    out: str | Path,
    opts: InpaintOptions = InpaintOptions(),
    progress: bool = True,
    finish: Finish | None = None,
    sign: Sign | None = None,
    loras: list[LoRASpec] | None = None,
    lora_merge: bool = False,
    controls: list[ControlSpec] | None = None,
) -> list[Path]:
    """Inpaint the image file `image` where the mask file `mask` is white and write the results (see edit_to_file,
    which applies `loras` and `controls`)."""
    require_file(image, "image", "give the picture to edit (PNG, JPEG, WebP, BMP or GIF)")
    require_file(mask, "mask", "give an image file, white where the picture is regenerated and black where kept")

    def inputs(channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = load_edit_image(image, channels)  # (1, C, H, W)
        return x, load_mask(mask, tuple(x.shape[-2:]), opts.resize_mask)

    about = {"image": input_record(image), "mask": input_record(mask)}
    out = reading(out, image, mask)
    return edit_to_file(checkpoint, req, inputs, out, opts, about, progress, finish, sign, loras, lora_merge, controls)
