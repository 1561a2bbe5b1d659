"""The commands about a model rather than its images: `ldmkit evaluate`, `convert`, `lora inspect` and `info`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import inputs
from .options import command, sampling_options


def add(sub, common: argparse.ArgumentParser) -> None:
    command(
        sub,
        common,
        "evaluate",
        "FID/KID of a model, or PSNR/SSIM/rFID of an autoencoder",
        cmd_evaluate,
        _evaluate_options,
    )
    command(
        sub,
        common,
        "convert",
        "convert between an ldmkit checkpoint, a diffusers folder and an SD file",
        cmd_convert,
        _convert_options,
    )
    command(sub, common, "lora", "LoRA files: inspect", options=lambda p: _lora_actions(p, common))
    command(sub, common, "info", "print a checkpoint's kind and configuration", cmd_info, _info_options)


def _evaluate_options(p: argparse.ArgumentParser):
    p.add_argument("checkpoint", help="model.safetensors or autoencoder.safetensors")
    p.add_argument("--data", help="reference data set (default: the one the checkpoint was trained on)")
    p.add_argument("--split", default="test", help="train or test for built-in data sets (default test)")
    sampling_options(p, "evaluate")
    p.add_argument("--out", help="JSON result (default: eval-DATA-SPLIT-nN.json beside the checkpoint)")
    p.add_argument(
        "--memorisation",
        action="store_true",
        help="also report the share of samples copying a training image (needs MODEL.index.npz: ldmkit index build)",
    )


def _convert_options(p: argparse.ArgumentParser):
    p.add_argument(
        "src",
        help="ldmkit .safetensors, diffusers pipeline folder, SD .safetensors or .ckpt; or a ControlNet: ldmkit's, "
        "a diffusers ControlNetModel folder or Stable Diffusion's ControlNet .safetensors / .pth",
    )
    p.add_argument("dst", help="destination file or folder (the format follows from the path, or use --to)")
    p.add_argument("--to", choices=["ldm", "diffusers", "single-file"], help="destination format when ambiguous")
    p.add_argument(
        "--prediction",
        choices=["eps", "v"],
        help="the model's prediction type, for foreign sources (default: scheduler config, or SD 1.x eps / 2.x v)",
    )
    p.add_argument("--heads", type=int, help="U-Net attention heads, for single files that are neither SD 1.x nor 2.x")
    p.add_argument(
        "--base",
        help="for a ControlNet: the model it was made for (any format), whose U-Net configuration a foreign "
        "single file lacks; its SHA-256 is recorded",
    )
    p.add_argument(
        "--unsafe-pickle",
        action="store_true",
        help="allow reading a .ckpt pickle (loaded with torch.load(weights_only=True))",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")


def _lora_actions(p: argparse.ArgumentParser, common: argparse.ArgumentParser):
    actions = p.add_subparsers(dest="lora_action", required=True, metavar="ACTION")
    a = actions.add_parser(
        "inspect", help="the layout, ranks and alphas of a LoRA file, and the layers that fit --model", parents=[common]
    )
    a.add_argument("file", help="a kohya or diffusers/PEFT LoRA .safetensors")
    a.add_argument("--model", help="a shipped model's name or a model.safetensors: list which layers match it")
    a.set_defaults(fn=cmd_lora_inspect)


def _info_options(p: argparse.ArgumentParser):
    p.add_argument("checkpoint", help="a shipped model's name or any ldmkit checkpoint (model, autoencoder, LoRA)")


def cmd_evaluate(args):
    from ..checkpoint import check_output_path
    from ..distributed import main_process
    from ..evaluation.evaluate import evaluate, format_table, result_path, write_result
    from ..governance.screen import load_index
    from ..governance.similarity import DEFAULT_THRESHOLD as COPY_THRESHOLD
    from ..shipped import resolve_model

    if args.out:
        check_output_path(args.out, "--out")  # before the long evaluation
    model = resolve_model(args.checkpoint)  # a shipped name or a path
    chosen = inputs.sampling(args, model)  # a distilled model's own sampler, steps and guidance, where not given
    result = evaluate(
        model,
        dataset=args.data,
        split=args.split,
        n=args.n,
        **chosen,
        seed=args.seed,
        device=args.device,
        batch_size=args.batch_size,
        progress=not args.quiet,
        memorisation=load_index(Path(args.checkpoint)) if args.memorisation else None,
        copy_threshold=COPY_THRESHOLD,
    )
    if main_process():  # under torchrun, rank 0 alone reports and writes
        print(format_table(result))
        out = result_path(args.checkpoint, result["data"], args.split, args.n, args.out)
        print(f"written {write_result(result, out)}")


def cmd_convert(args):
    from ..interop.convert import convert

    out = convert(
        args.src,
        args.dst,
        unsafe_pickle=args.unsafe_pickle,
        prediction=args.prediction,
        to=args.to,
        heads=args.heads,
        overwrite=args.overwrite,
        base=args.base,
    )
    print(f"written {out}")


def cmd_lora_inspect(args):
    from ..adapters import describe as describe_lora
    from ..shipped import load_model, resolve_model

    ldm = load_model(resolve_model(args.model), "cpu") if args.model else None
    net, text = (ldm.unet, ldm.text_encoder) if ldm is not None else (None, None)
    print(json.dumps(describe_lora(args.file, net, text), indent=2))


def cmd_info(args):
    from ..checkpoint import read_metadata
    from ..shipped import model_source, resolve_model

    base, lora, about = model_source(resolve_model(args.checkpoint))  # a shipped name or a path
    meta = read_metadata(base)
    if lora is not None:  # a LoRA that names its base: what it is, then the model it makes
        meta = {"lora": about, "base": str(base)} | meta
    print(json.dumps(meta, indent=2))
