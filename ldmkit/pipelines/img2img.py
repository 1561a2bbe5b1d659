"""img2img (SDEdit, Meng et al. 2022): an image noised to the sigma that `strength` picks on the sampling grid, then
denoised under a prompt or label by the same samplers, guidance and batches as generation.

The image is converted to the model's channels, padded (edge replication) to a multiple of the model's total
factor, encoded to the posterior mean, and each of the request's n variations starts from it with its own seed
(image i uses seed + i, at any batch size); results are cropped back to the input's own size. strength 0 returns
the autoencoder's round trip of the image; strength 1 ignores it and equals generation with the same seed.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from ..checkpoint import read_metadata
from ..data.images import Sign
from ..errors import InputError
from ..ldm import LatentDiffusion
from ..shipped import model_source
from .control import ControlSpec, with_controls
from .images import check_edit_size, crop_to, load_edit_image, pad_to_multiple, to_channels
from .lora import LoRASpec, apply_loras, check_loras, lora_record
from .output import Finish, reading, write_edits
from .plan import collect, latent_batches, plan
from .record import input_record
from .request import SampleRequest

RANGE_SLACK = 1e-3  # image values may leave [-1, 1] by this much (rounding) before they are refused

EditBatches = Callable[[LatentDiffusion], Iterable[tuple[torch.Tensor, list[str]]]]


def check_strength(strength) -> float:
    """`strength` as a float in [0, 1]; InputError naming --strength otherwise."""
    try:
        s = float(strength)
    except (TypeError, ValueError):
        raise InputError(f"--strength {strength!r} is not a number; use a value in [0, 1] such as 0.75") from None
    if not (math.isfinite(s) and 0.0 <= s <= 1.0):
        raise InputError(
            f"--strength {strength} is outside [0, 1]; 0 keeps the image, 1 ignores it, 0.3 to 0.8 is usual"
        )
    return s


def model_image(
    ldm: LatentDiffusion, image: torch.Tensor, multiple: int | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Images (B, C, H, W) in [-1, 1] -> (B, model channels, H', W') padded to `multiple` (default: the model's
    total factor), on its device, and the input size (H, W) to crop back to."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or min(image.shape) == 0:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"the image must be a tensor (B, C, H, W) in [-1, 1], got {shape}; add a batch dimension")
    h, w = image.shape[-2:]
    check_edit_size("the image", w, h)
    x = image.float()
    if not bool(torch.isfinite(x).all()):
        raise InputError("the image holds NaN or infinite values; give pixel values in [-1, 1]")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - RANGE_SLACK or hi > 1 + RANGE_SLACK:
        raise InputError(
            f"the image's values span [{lo:.4g}, {hi:.4g}], not [-1, 1]; map [0, 1] images with x * 2 - 1 and "
            f"[0, 255] ones with x / 127.5 - 1"
        )
    x = to_channels(x.clamp(-1, 1), ldm.ae_config.in_channels).to(ldm.device)  # (B, C, H, W)
    return pad_to_multiple(x, multiple or ldm.factor * ldm.run.backbone.factor)  # (B, C, H', W'), (H, W)


@torch.no_grad()
def img2img_batches(
    ldm: LatentDiffusion, image: torch.Tensor, req: SampleRequest, strength: float, progress: bool = False
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """(images (b, C, H, W) in [-1, 1] on the CPU, a caption per image) per batch: req.n variations of each of the
    B input images (image-major: input j's variations are images j * n .. j * n + n - 1), image i drawn with seed
    + i. Labels and prompts cycle over all B * n images. Everything is checked before the first sampling step."""
    strength = check_strength(strength)
    if req.height or req.width:
        raise InputError("img2img works at the input image's own size; drop --height / --width (resize the image)")
    x, size = model_image(ldm, image)
    full = replace(req, n=x.shape[0] * req.n, height=x.shape[-2], width=x.shape[-1])
    p = plan(ldm, full)
    z0 = [ldm.encode(x[j : j + 1]) for j in range(x.shape[0])]  # (1, c, h, w) each, encoded alone: no batch effect

    def init(s: int, e: int) -> torch.Tensor:
        return torch.cat([z0[i // req.n] for i in range(s, e)])  # (e - s, c, h, w)

    for z, captions in latent_batches(ldm, full, p, progress, init, strength, "img2img"):
        yield crop_to(ldm.decode(z).cpu(), size), captions


def img2img(
    ldm: LatentDiffusion, image: torch.Tensor, req: SampleRequest, strength: float, progress: bool = False
) -> tuple[torch.Tensor, list[str]]:
    """Images (B * n, C, H, W) in [-1, 1], req.n variations of each input image (1 or B, C, H, W) in [-1, 1], and
    a caption per image (see img2img_batches)."""
    return collect(img2img_batches(ldm, image, req, strength, progress))


def checkpoint_channels(checkpoint: str | Path) -> int:
    """The image channels of the model in `checkpoint`, from its metadata (3 when it does not say: loading the
    model then names what is wrong with the file)."""
    ae = read_metadata(model_source(checkpoint)[0]).get("autoencoder")  # a LoRA that is a model: its base's
    return int(ae.get("in_channels", 3)) if isinstance(ae, dict) else 3


def with_loras(
    batches: EditBatches, loras: list[LoRASpec] | None, merge: bool = False, request: Sequence[LoRASpec] = ()
) -> tuple[EditBatches, dict]:
    """(batches that first hook `loras` into the loaded model, unmerged or merged with `merge`, as generate does;
    what each image's record adds: the LoRAs' files, SHA-256 and scales, then those of `request`, the request's own
    LoRAs that plan.draw hooks beside them). The files are checked before the model loads: each given once and
    present."""
    if not loras:
        return batches, {}
    check_loras(loras)
    for s in loras:
        if not Path(s.path).is_file():
            raise InputError(f"--lora {s.path}: no such file; give a LoRA .safetensors (kohya or diffusers/PEFT)")

    def lora_batches(ldm: LatentDiffusion):
        apply_loras(ldm, loras, merge)  # on the model write_edits loaded for this edit alone
        return batches(ldm)

    return lora_batches, {"loras": lora_record(loras, merge, request)}


def img2img_to_file(
    checkpoint: str | Path,
    image: str | Path,
    req: SampleRequest,
    strength: float,
    out: str | Path,
    progress: bool = True,
    finish: Finish | None = None,
    sign: Sign | None = None,
    loras: list[LoRASpec] | None = None,
    lora_merge: bool = False,
    controls: list[ControlSpec] | None = None,
) -> list[Path]:
    """img2img of the image file `image` (read by load_edit_image), each result written at the input's size as every
    edit is (see generate.write_edits), with the parameters, the input image's path and the strength embedded. The
    strength, the image, the output and the request are checked before sampling. loras: LoRAs on the model
    (pipelines/lora.py), unmerged, or merged into its weights with lora_merge; each recorded with its SHA-256.
    controls: ControlNets that steer the edit (pipelines/control.py), their windows counted over the steps run."""
    strength = check_strength(strength)
    x = load_edit_image(image, checkpoint_channels(checkpoint))  # (1, C, H, W)
    batches, about = with_loras(
        lambda ldm: img2img_batches(ldm, x, req, strength, progress), loras, lora_merge, req.loras
    )
    batches, steered = with_controls(batches, controls, tuple(x.shape[-2:]), req.steps, strength)
    extra = {"image": input_record(image), "strength": strength, **about, **steered}
    return write_edits(checkpoint, req, reading(out, image), batches, extra, finish, sign)
