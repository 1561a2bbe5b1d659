"""AUTOMATIC1111's img2img request as an ldmkit edit: img2img at denoising_strength, or inpainting with its mask."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..config import ServeLimits
from ..governance import watermark
from ..governance.screen import OutputScreen, Screened
from ..pipelines.img2img import img2img
from ..pipelines.inpaint import InpaintOptions, inpaint
from ..pipelines.request import SampleRequest
from .schemas import FieldError, decode_image


@dataclass(frozen=True)
class Edit:
    """An edit as the scheduler runs it: edit(ldm) -> images (n, C, H, W). keep: (H, W) bool, the pixels it returns
    bit for bit (an inpainting mask's black part), which the output screen's watermark must leave alone; None: the
    edit may change every pixel (img2img)."""

    run: Callable[[object], torch.Tensor]
    keep: np.ndarray | None = None

    def __call__(self, ldm) -> torch.Tensor:
        return self.run(ldm)


def a1111_edit(ldm, body, req: SampleRequest, limits: ServeLimits) -> tuple[Edit, dict]:
    """(the Edit, parameters to record) for an img2img body: the first of init_images, and with a mask (white where
    the image is repainted) an inpainting edit instead of img2img."""
    if len(body.init_images) != 1:
        raise FieldError("init_images", f"give exactly one init image, not {len(body.init_images)}")
    channels = ldm.ae_config.in_channels
    image = decode_image("init_images", body.init_images[0], channels, limits.max_upload_bytes)
    h, w = image.shape[-2:]
    if max(h, w) > limits.max_side:
        raise FieldError("init_images", f"the init image is {w}x{h}; the limit is {limits.max_side} pixels a side")
    if not 0.0 <= body.denoising_strength <= 1.0:  # also refuses NaN
        raise FieldError("denoising_strength", f"denoising_strength {body.denoising_strength} must be between 0 and 1")
    extra = {"init_image": f"{w}x{h}", "denoising_strength": body.denoising_strength}
    if body.mask is not None:
        mask = decode_image("mask", body.mask, 1, limits.max_upload_bytes)
        if mask.shape[-2:] != image.shape[-2:]:
            raise FieldError("mask", f"the mask is {mask.shape[-1]}x{mask.shape[-2]}; it must match the image, {w}x{h}")
        mask = (mask > 0).float()  # (1, 1, H, W): 1 where repainted
        keep = (mask[0, 0] <= 0.5).cpu().numpy()  # (H, W): returned bit for bit, so the watermark stays out

        def run(m):
            return inpaint(m, req, image, mask, InpaintOptions())[0]

        return Edit(run, keep), extra | {"mask": True}
    if not ldm.task_spec.from_noise:
        raise FieldError("mask", f"this model is an {ldm.task} model: img2img needs a mask for it")

    def run(m):
        return img2img(m, image, req, body.denoising_strength)[0]

    return Edit(run), extra


UNMARKED = (
    "not watermarked: the edited region is too small to carry the mark without changing the pixels the edit keeps; "
    "regenerate a larger region to mark it"
)


def unmarked(screen: OutputScreen, screened: list[Screened], keep: np.ndarray | None) -> list[dict]:
    """For each screened image of an edit that keeps pixels, what its record says when the screen marks but the
    edited region could not carry the mark ({"watermark": None, "note": UNMARKED}); {} for the others."""
    return [
        {"watermark": None, "note": UNMARKED}
        if screen.mark and keep is not None and s.watermark is None and min(s.marked.size) >= watermark.MIN_SIDE
        else {}
        for s in screened
    ]
