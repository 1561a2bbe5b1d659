"""Outpainting: enlarge an image by generating a border around it, keeping the original pixels exactly.

The canvas is the image padded by edge replication (each new pixel repeats the nearest edge pixel, which gives the
encoder plausible colours to start from); the mask is white on the new border and black on the original, and the
canvas is inpainted (`pipelines.inpaint`). A canvas whose size the model cannot take is padded further and cropped
back, so the result is exactly the input's size plus the border.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.images import Sign
from ..errors import InputError
from .control import ControlSpec
from .images import MAX_EDIT_PIXELS, load_edit_image
from .inpaint import InpaintOptions, edit_to_file
from .lora import LoRASpec
from .masks import require_file
from .output import Finish, reading
from .record import input_record
from .request import SampleRequest, whole_number


@dataclass(frozen=True)
class Border:
    """Pixels added on each side of the image; checked here, naming the command-line option to change."""

    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0

    def __post_init__(self):
        for side in ("left", "right", "top", "bottom"):
            whole_number(
                f"--{side}", getattr(self, side), low=0, hint="give the pixels to add on that side (0 or more)"
            )
        if not (self.left or self.right or self.top or self.bottom):
            raise InputError("nothing to outpaint: give --extend PX or at least one of --left/--right/--top/--bottom")

    @classmethod
    def of(cls, extend: int | None = None, left=None, right=None, top=None, bottom=None) -> "Border":
        """The border of --extend (every side) with any side given on its own taking precedence."""
        if extend is not None:
            whole_number("--extend", extend, low=0, hint="give the pixels to add on every side (0 or more)")
        base = extend or 0
        pick = [base if v is None else v for v in (left, right, top, bottom)]
        return cls(*pick)


def outpaint_canvas(image: torch.Tensor, border: Border) -> tuple[torch.Tensor, torch.Tensor]:
    """(canvas (1, C, H + top + bottom, W + left + right), mask (1, 1, same) with 1 on the new border) for image
    (1, C, H, W); the border repeats the nearest edge pixel. InputError past MAX_EDIT_PIXELS."""
    h, w = image.shape[-2:]
    ch, cw = h + border.top + border.bottom, w + border.left + border.right
    if ch * cw > MAX_EDIT_PIXELS:
        raise InputError(
            f"the outpainted image would be {cw}x{ch} = {ch * cw:,} pixels, over the editing limit of "
            f"{MAX_EDIT_PIXELS:,}; add a smaller border"
        )
    pad = (border.left, border.right, border.top, border.bottom)
    canvas = F.pad(image, pad, mode="replicate")  # (1, C, ch, cw)
    mask = torch.ones(1, 1, ch, cw, dtype=image.dtype, device=image.device)
    mask[..., border.top : border.top + h, border.left : border.left + w] = 0
    return canvas, mask


def outpaint_to_file(
    checkpoint: str | Path,
    req: SampleRequest,
    image: str | Path,
    border: Border,
    out: str | Path,
    opts: InpaintOptions | None = None,
    progress: bool = True,
    finish: Finish | None = None,
    sign: Sign | None = None,
    loras: list[LoRASpec] | None = None,
    lora_merge: bool = False,
    controls: list[ControlSpec] | None = None,
) -> list[Path]:
    """Enlarge the image file `image` by `border` and write the results (see inpaint.edit_to_file); opts: the
    sampling and composite options (default InpaintOptions()); loras: LoRAs on the model, merged with lora_merge;
    controls: ControlNets whose condition images have the enlarged image's size."""
    require_file(image, "image", "give the picture to enlarge (PNG, JPEG, WebP, BMP or GIF)")

    def inputs(channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        return outpaint_canvas(load_edit_image(image, channels), border)

    about = {"image": input_record(image), "border": [border.left, border.right, border.top, border.bottom]}
    out = reading(out, image)
    opts = opts or InpaintOptions()
    return edit_to_file(checkpoint, req, inputs, out, opts, about, progress, finish, sign, loras, lora_merge, controls)
