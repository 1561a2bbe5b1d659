"""`ldmkit sample` and `ldmkit generate`: prompts or labels -> a SampleRequest -> images on disk."""

from __future__ import annotations

import argparse
from dataclasses import replace

from . import inputs
from .inputs import ARGV_FIX, utf8
from .options import (
    command,
    control_options,
    embedding_options,
    generation_options,
    lora_options,
    sampling_options,
)


def add(sub, common: argparse.ArgumentParser) -> None:
    command(sub, common, "sample", "generate images from a trained model", cmd_sample, _sample_options)
    command(
        sub,
        common,
        "generate",
        "generate with a shipped model (emoji by default) or any checkpoint",
        cmd_generate,
        _generate_options,
    )


def _sample_options(p: argparse.ArgumentParser):
    p.add_argument(
        "checkpoint",
        metavar="model",
        help="a shipped model's name (emoji, fashion-mnist) or a model.safetensors path (from `ldmkit train`)",
    )
    text = p.add_mutually_exclusive_group()
    text.add_argument(
        "--prompt", action="append", help="text prompt (text-conditional models; repeat for several, --n images each)"
    )
    text.add_argument("--prompt-file", help="a UTF-8 file with one prompt per line; one image per line")
    generation_options(p, "sample")
    sampling_options(p, "sample")
    p.add_argument("--separate", action="store_true", help="one PNG per image instead of a grid")
    p.add_argument(
        "--out",
        default="samples.png",
        help="output PNG: a grid, or the image itself for one (a folder with --separate)",
    )


def _generate_options(p: argparse.ArgumentParser):
    p.add_argument("prompt", nargs="*", help="one or more prompts (text models); each gets --n images")
    p.add_argument(
        "--model",
        help="emoji, fashion-mnist, or a model.safetensors path (default: emoji when shipped, else fashion-mnist)",
    )
    generation_options(p, "generate")
    sampling_options(p, "generate")
    control_options(p)
    lora_options(p)
    embedding_options(p)
    p.add_argument("--separate", action="store_true", help="one PNG per image instead of a grid")
    p.add_argument(
        "--out",
        help="output PNG: a grid, or the image itself for one (default generated/PROMPT.png; with --separate a "
        "folder, default generated/PROMPT)",
    )


def _generate_files(args, checkpoint, req, out, grid: bool, controls=None) -> list:
    """generate_to_file with the screen and signer the options ask for (and the ControlNets of --control). Under
    torchrun the ranks share the images, each on its own device; rank 0 returns every path written, the others
    none."""
    from ..distributed import process_group
    from ..pipelines.generate import generate_to_file
    from ..pipelines.lora import parse_embedding, parse_lora

    with process_group(args.device, "--device") as (world, device):
        req = replace(req, device=str(device)) if world.active else req
        finish, sign = inputs.finish(args, checkpoint, world), inputs.sign(args)
        progress = inputs.progress(args) and world.main
        loras = [parse_lora(s) for s in getattr(args, "lora", None) or []]
        kw = {"loras": loras, "lora_merge": getattr(args, "lora_merge", False)} if loras else {}
        if getattr(args, "embedding", None):
            kw["embeddings"] = [parse_embedding(e) for e in args.embedding]
        target = inputs.target(args, out)
        return generate_to_file(checkpoint, req, target, grid, progress, finish, sign, world, controls, **kw)


def cmd_sample(args):
    from ..shipped import resolve_model

    prompts = None
    if args.prompt_file:
        prompts = inputs.read_prompt_file(args.prompt_file)
    elif args.prompt:  # each --prompt gets --n images
        prompts = [utf8(p, "prompt", ARGV_FIX) for p in args.prompt for _ in range(args.n)]
    checkpoint = resolve_model(args.checkpoint)  # a shipped name or a path, as every command takes a model
    req = inputs.request(args, len(prompts) if prompts else args.n, prompts, checkpoint)
    for p in _generate_files(args, checkpoint, req, args.out, grid=not args.separate):
        print(p)


def cmd_generate(args):
    from ..shipped import plan_generation

    prompts = [utf8(p, "prompt", ARGV_FIX) for p in args.prompt]
    controls = inputs.controls(args).get("controls")
    plan = plan_generation(args.model, prompts, args.label, args.n, args.out)
    req = inputs.request(args, plan.n, plan.prompts, plan.checkpoint)
    out = plan.out.with_suffix("") if args.separate and not args.out else plan.out  # default folder generated/PROMPT
    for p in _generate_files(args, plan.checkpoint, req, out, grid=not args.separate, controls=controls):
        print(f"wrote {p}")
