"""`ldmkit invert` (an image -> the DDIM noise that re-samples it) and `ldmkit edit` (invert under one prompt or
label, sample under another)."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import inputs
from .inputs import ARGV_FIX, utf8
from .options import Once, command

DEFAULT_STEPS = 50  # pipelines/inversion.py DEFAULT_STEPS, repeated here so that the parser imports no torch
DEFAULT_ITERATIONS = 2


def add(sub, common: argparse.ArgumentParser) -> None:
    command(
        sub,
        common,
        "invert",
        "walk an image back to the noise that deterministic DDIM turns into it (DDIM inversion)",
        cmd_invert,
        _invert_options,
    )
    command(
        sub,
        common,
        "edit",
        "edit an image by prompt: invert it under --from, sample under --to",
        cmd_edit,
        _edit_options,
    )


# --- options ----------------------------------------------------------------------------------------------------------
def _shared(p: argparse.ArgumentParser, image_help: str):
    p.add_argument("image", help=image_help)
    p.add_argument("--model", help="a shipped model's name or a model.safetensors path (default emoji)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"DDIM steps, 1 to 1000 (default {DEFAULT_STEPS})")
    p.add_argument(
        "--iterations",
        type=int,
        default=DEFAULT_ITERATIONS,
        help=f"fixed-point iterations per inversion step; each costs one model call, 0 is the plain inversion "
        f"(default {DEFAULT_ITERATIONS})",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def _invert_options(p: argparse.ArgumentParser):
    _shared(p, "the image to invert (PNG, JPEG, WebP, BMP or GIF; padded to the model's factor)")
    p.add_argument(
        "--prompt", action=Once, help="the image's prompt (text models), or its class number or name (class models)"
    )
    p.add_argument("--cfg", type=float, default=1.0, help="guidance while inverting (default 1: none, exact)")
    p.add_argument("--out", help="the noise file, .safetensors (default IMAGE.inversion.safetensors)")


def _edit_options(p: argparse.ArgumentParser):
    _shared(p, "the image to edit, or a .safetensors inversion of it from `ldmkit invert` (same model)")
    p.add_argument("--from", dest="source", action=Once, help="what the image shows: a prompt, or a class number/name")
    p.add_argument("--to", dest="target", action=Once, required=True, help="what it should show instead")
    p.add_argument("--cfg", type=float, default=3.0, help="guidance towards --to (default 3; 1 turns it off)")
    p.add_argument(
        "--keep-layout",
        type=int,
        default=0,
        metavar="STEPS",
        help="for the first STEPS steps, attend with the source's self-attention maps, keeping its layout (default 0)",
    )
    p.add_argument("--policy", help="a policy.toml whose rules --to must pass and whose screen every image passes")
    p.add_argument("--out", help="output image (default generated/IMAGE-edited.png)")
    p.set_defaults(watermark=False, c2pa_cert=None, c2pa_key=None)


# --- handlers ---------------------------------------------------------------------------------------------------------
def _model(args):
    from ..shipped import default_model, resolve_model

    return resolve_model(args.model or default_model("generate"))


def _condition(text: str | None, what: str) -> str | None:
    return utf8(text, what, ARGV_FIX) if text is not None else None


def cmd_invert(args):
    from ..pipelines.inversion import invert_to_file
    from ..pipelines.output import Target

    checkpoint = _model(args)
    out = Path(args.out or f"{Path(args.image).stem}.inversion.safetensors")
    path = invert_to_file(
        checkpoint,
        args.image,
        Target(out, overwrite=args.overwrite),
        _condition(args.prompt, "prompt"),
        args.steps,
        args.cfg,
        args.iterations,
        args.device,
        inputs.progress(args),
    )
    print(f"wrote {path}")


def cmd_edit(args):
    from ..governance.policy import load_policy
    from ..pipelines.inversion import edit_to_file

    source, target = _condition(args.source, "--from"), _condition(args.target, "--to")
    if args.policy:
        load_policy(args.policy).enforce([target])
    checkpoint = _model(args)
    out = args.out or f"generated/{Path(args.image).stem}-edited.png"
    files = edit_to_file(
        checkpoint,
        args.image,
        inputs.target(args, out),
        source,
        target,
        args.steps,
        args.cfg,
        args.keep_layout,
        args.iterations,
        args.device,
        inputs.progress(args),
        inputs.finish(args, checkpoint),
        inputs.sign(args),
    )
    for p in files:
        print(f"wrote {p}")
