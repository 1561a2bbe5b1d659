"""The commands that start from an image: `ldmkit img2img`, `inpaint`, `outpaint`, `upscale`, and `condition`
(what a ControlNet sees of an image)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from . import inputs
from .inputs import ARGV_FIX, utf8
from .options import Once, command, control_options, generation_options, lora_options, sampling_options


def add(sub, common: argparse.ArgumentParser) -> None:
    command(
        sub,
        common,
        "img2img",
        "edit an image: noise it to --strength, then denoise under a prompt or label",
        cmd_img2img,
        _img2img_options,
    )
    command(
        sub,
        common,
        "inpaint",
        "regenerate the white region of a mask, keeping the rest of the image exactly",
        cmd_inpaint,
        _inpaint_options,
    )
    command(
        sub, common, "outpaint", "enlarge an image by generating a border around it", cmd_outpaint, _outpaint_options
    )
    command(
        sub,
        common,
        "upscale",
        "enlarge an image with an upscaler (latent super-resolution, tiled when large)",
        cmd_upscale,
        _upscale_options,
    )
    command(
        sub,
        common,
        "condition",
        "show what a ControlNet sees: a detector's map of an image",
        cmd_condition,
        _condition_options,
    )


# --- options ----------------------------------------------------------------------------------------------------------
def _img2img_options(p: argparse.ArgumentParser):
    p.add_argument("image", help="the image to start from (PNG, JPEG, WebP, BMP or GIF; at most 2048x2048 pixels)")
    p.add_argument("--prompt", action=Once, help="text prompt (text models)")
    p.add_argument("--strength", type=float, default=0.75, help="0 keeps the image, 1 ignores it (default 0.75)")
    p.add_argument("--model", help="as for generate: a shipped model's name or a model.safetensors path")
    generation_options(p, "img2img")
    sampling_options(p, "img2img")
    control_options(p)
    lora_options(p)
    p.add_argument("--out", help="output PNG (default generated/PROMPT.png)")


def _edit_options(p: argparse.ArgumentParser, what: str):
    """The options inpaint and outpaint share: the model, the prompt or labels, sampling, RePaint, the output."""
    from ..pipelines.inpaint import MAX_RESAMPLE
    from ..pipelines.masks import FEATHER_PX

    p.add_argument("image", help=f"the image to {what} (PNG, JPEG, WebP, BMP or GIF)")
    default = "fashion-mnist-inpaint, or emoji for a --prompt" if what == "inpaint" else "as for generate: emoji"
    p.add_argument("--model", help=f"a shipped model's name or a model.safetensors path (default {default})")
    p.add_argument("--prompt", action=Once, help="text prompt (text models); class models take --label")
    generation_options(p, what)
    sampling_options(p, what)
    p.add_argument(
        "--resample",
        type=int,
        default=1,
        help=f"RePaint passes down from each jump point, 1 to {MAX_RESAMPLE}; each multiplies the sampling time "
        f"(default 1: none; 10 is the paper's)",
    )
    p.add_argument(
        "--jump",
        type=int,
        default=5,
        help="RePaint: steps to go back up at each jump point, 1 to fewer than --steps (default 5)",
    )
    p.add_argument(
        "--feather", type=int, default=FEATHER_PX, help=f"blend ramp inside the mask in pixels (default {FEATHER_PX})"
    )
    control_options(p)
    lora_options(p)
    p.add_argument("--out", help=f"output image (default generated/IMAGE-{what}ed.png)")


def _inpaint_options(p: argparse.ArgumentParser):
    _edit_options(p, "inpaint")
    p.add_argument("--mask", required=True, help="mask image: white = regenerate, black = keep")
    p.add_argument("--resize-mask", action="store_true", help="scale a mask of another size (nearest neighbour)")


def _outpaint_options(p: argparse.ArgumentParser):
    _edit_options(p, "outpaint")
    p.add_argument("--extend", type=int, help="pixels to add on every side")
    for side in ("left", "right", "top", "bottom"):
        p.add_argument(f"--{side}", type=int, help=f"pixels to add on the {side} (overrides --extend there)")


def _upscale_options(p: argparse.ArgumentParser):
    p.add_argument("image", help="the image to upscale (PNG, JPEG, WebP, BMP or GIF)")
    p.add_argument("--model", help="emoji-upscale (default) or an upscaler's model.safetensors path")
    p.add_argument("--prompt", action=Once, help="text prompt (text upscalers)")
    generation_options(p, "upscale")
    p.add_argument(
        "--noise-level", type=int, help="noise added to the input: higher trusts it less (default: the model's)"
    )
    p.add_argument(
        "--tile", type=int, default=0, help="tile side in input pixels (default: twice the training size, least: half)"
    )
    p.add_argument("--overlap", type=int, default=-1, help="input pixels tiles share (default: a quarter tile)")
    sampling_options(p, "upscale")
    p.add_argument("--out", help="output image (default generated/IMAGE-upscaled.png)")


def _condition_options(p: argparse.ArgumentParser):
    from ..data.conditions import DETECTORS

    p.add_argument("detector", choices=list(DETECTORS), help="canny edges, a foreground mask or a colour layout")
    p.add_argument("image", help="the image to run the detector on")
    p.add_argument("--out", required=True, help="the map's image file (.png, .jpg, .webp)")


# --- commands ---------------------------------------------------------------------------------------------------------
def _prompts(args) -> list[str]:
    return [utf8(args.prompt, "prompt", ARGV_FIX)] if args.prompt is not None else []


def cmd_img2img(args):
    from ..pipelines.img2img import check_strength, img2img_to_file
    from ..shipped import plan_generation

    check_strength(args.strength)
    steer = inputs.loras(args) | inputs.controls(args)  # LoRAs and ControlNets, checked before the model loads
    plan = plan_generation(args.model, _prompts(args), args.label, args.n, args.out)
    req = inputs.request(args, plan.n, plan.prompts, plan.checkpoint)
    finish, sign = inputs.finish(args, plan.checkpoint), inputs.sign(args)
    out = inputs.target(args, plan.out)
    files = img2img_to_file(
        plan.checkpoint, args.image, req, args.strength, out, inputs.progress(args), finish, sign, **steer
    )
    for p in files:
        print(f"wrote {p}")


def _edit_request(args, default_out: Path, task: str):
    """(generation plan, request, inpainting options) of inpaint / outpaint: the model (default: the shipped one for
    `task`), prompt or labels and output resolved as `generate` does them."""
    from ..pipelines.inpaint import InpaintOptions
    from ..shipped import plan_generation

    opts = InpaintOptions(
        resize_mask=getattr(args, "resize_mask", False),
        resample=args.resample,
        jump=args.jump,
        feather=args.feather,
    )
    plan = plan_generation(args.model, _prompts(args), args.label, args.n, args.out or default_out, task=task)
    return plan, inputs.request(args, plan.n, plan.prompts, plan.checkpoint), opts


def cmd_inpaint(args):
    from ..pipelines.inpaint import inpaint_to_file

    steer = inputs.loras(args) | inputs.controls(args)  # LoRAs and ControlNets, checked before the model loads
    plan, req, opts = _edit_request(args, Path("generated") / f"{Path(args.image).stem}-inpainted.png", "inpaint")
    finish, sign = inputs.finish(args, plan.checkpoint), inputs.sign(args)
    out = inputs.target(args, plan.out)
    files = inpaint_to_file(
        plan.checkpoint, req, args.image, args.mask, out, opts, inputs.progress(args), finish, sign, **steer
    )
    for p in files:
        print(f"wrote {p}")


def cmd_outpaint(args):
    from ..pipelines.outpaint import Border, outpaint_to_file

    given = {k: getattr(args, k) for k in ("extend", "left", "right", "top", "bottom") if getattr(args, k) is not None}
    if given and not any(given.values()):
        shown = " ".join(f"--{k} {v}" for k, v in given.items())
        raise InputError(
            f"{shown} adds no border (0 pixels on every side), so there is nothing to outpaint; give --extend 1 or "
            f"more (pixels on every side), or a positive --left / --right / --top / --bottom"
        )
    border = Border.of(args.extend, args.left, args.right, args.top, args.bottom)
    steer = inputs.loras(args) | inputs.controls(args)  # LoRAs and ControlNets, checked before the model loads
    plan, req, opts = _edit_request(args, Path("generated") / f"{Path(args.image).stem}-outpainted.png", "generate")
    finish, sign = inputs.finish(args, plan.checkpoint), inputs.sign(args)
    out = inputs.target(args, plan.out)
    files = outpaint_to_file(
        plan.checkpoint, req, args.image, border, out, opts, inputs.progress(args), finish, sign, **steer
    )
    for p in files:
        print(f"wrote {p}")


def _check_upscale_input(image: str, checkpoint) -> None:
    """The upscaler's own limit on its input (the output's size over the factor), checked first from the file's
    header, so that a too large input is told what upscale takes rather than the limit of the other edits."""
    from PIL import Image

    from ..pipelines.upscale import check_input_size
    from ..shipped import model_config

    factor = ((model_config(checkpoint) or {}).get("upscale") or {}).get("factor")
    try:
        with Image.open(image) as im:
            w, h = im.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return  # not readable: the pipeline names what is wrong with the file
    if isinstance(factor, int) and factor > 0:
        check_input_size(str(image), w, h, factor)


def cmd_upscale(args):
    from ..pipelines.upscale import UpscaleOptions, upscale_to_file
    from ..shipped import plan_generation

    default_out = Path("generated") / f"{Path(args.image).stem}-upscaled.png"
    plan = plan_generation(args.model, _prompts(args), None, args.n, args.out or default_out, task="upscale")
    opts = UpscaleOptions(noise_level=args.noise_level, tile=args.tile, overlap=args.overlap)
    req = inputs.request(args, plan.n, plan.prompts, plan.checkpoint)
    _check_upscale_input(args.image, plan.checkpoint)
    finish, sign = inputs.finish(args, plan.checkpoint), inputs.sign(args)
    for p in upscale_to_file(
        plan.checkpoint, req, args.image, inputs.target(args, plan.out), opts, inputs.progress(args), finish, sign
    ):
        print(f"wrote {p}")


def cmd_condition(args):
    """What a ControlNet sees: the detector's map of IMAGE, written as an image."""
    from PIL import Image

    from ..checkpoint import check_output_path
    from ..data.conditions import condition_image
    from ..data.images import to_pil, write_image

    with Image.open(args.image) as img:
        size = (img.height, img.width)
    out = check_output_path(Path(args.out), "--out")
    if out.resolve() == Path(args.image).resolve():
        raise InputError(f"--out {out} is the input image; write the map elsewhere")
    cond = condition_image(args.detector, args.image, size)[0]  # (3, H, W) in [0, 1]
    print(f"wrote {write_image(to_pil(cond * 2 - 1), out)}")
