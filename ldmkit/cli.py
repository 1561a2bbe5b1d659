"""The `ldmkit` command: parse -> config -> call. Nothing else lives here."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from .errors import InputError, LdmkitError


def _run_options(p: argparse.ArgumentParser, default_out: str):
    p.add_argument("--config", help="a preset name (see ldmkit/presets) or a .toml file")
    p.add_argument("--data", help="data set: fashion-mnist, emoji, or a folder of images (data.dataset)")
    p.add_argument("--resolution", type=int, help="training resolution in pixels (data.resolution)")
    p.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    p.add_argument("--batch-size", type=int, help="images per step (train.batch_size)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (train.device)")
    p.add_argument("--out", default=default_out, help=f"run folder (default {default_out})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting, e.g. --set train.lr=1e-4 --set unet.channel_mult=1,2,2 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _overrides(args) -> list[str]:
    pairs = [("data.dataset", args.data), ("data.resolution", args.resolution), ("train.steps", args.steps),
             ("train.batch_size", args.batch_size), ("train.device", args.device)]
    return [f"{k}={v}" for k, v in pairs if v is not None] + list(args.overrides)


def cmd_train_autoencoder(args):
    from .config import AutoencoderRun, load_run
    from .training.runs import train_autoencoder

    run = load_run(AutoencoderRun, args.config, _overrides(args))
    result = train_autoencoder(run, args.out, resume=args.resume, progress=not args.quiet)
    print(json.dumps(result, indent=2))
    print(f"autoencoder written to {result['checkpoint']}")


def cmd_train(args):
    from .config import DenoiserRun, load_run
    from .training.runs import train_denoiser

    extra = [f"autoencoder={args.autoencoder}"] if args.autoencoder else []
    if args.text_encoder:
        extra.append(f"text_encoder={args.text_encoder}")
    run = load_run(DenoiserRun, args.config, extra + _overrides(args))
    result = train_denoiser(run, args.out, resume=args.resume, progress=not args.quiet)
    print(json.dumps(result, indent=2))
    print(f"model written to {result['checkpoint']}")


def cmd_sample(args):
    from .pipelines.txt2img import SampleRequest, generate_to_file

    prompts = None
    if args.prompt_file:
        prompts = [ln.strip() for ln in Path(args.prompt_file).read_text().splitlines() if ln.strip()]
        if not prompts:
            raise InputError(f"{args.prompt_file} has no prompts (one per line)")
    elif args.prompt is not None:
        prompts = [args.prompt] * args.n
    req = SampleRequest(n=len(prompts) if prompts else args.n, labels=args.label, prompts=prompts,
                        negative_prompt=args.negative_prompt, sampler=args.sampler, steps=args.steps,
                        cfg=args.cfg, cfg_rescale=args.guidance_rescale, seed=args.seed, batch_size=args.batch_size,
                        device=args.device, eta=args.eta)
    out = generate_to_file(args.checkpoint, req, args.out, grid=not args.separate)
    for p in out:
        print(p)


def cmd_generate(args):
    import re

    from .models import default_model, resolve_model
    from .pipelines.txt2img import SampleRequest, generate_to_file

    args.model = args.model or default_model()
    path = resolve_model(args.model)
    prompts = list(args.prompt) or None
    if prompts and args.label is not None:
        raise InputError("give prompts (text models) or --label (class models), not both")
    if prompts:
        from .checkpoint import read_metadata

        meta = read_metadata(path)["config"]
        if not meta.get("text_encoder"):
            names = ", ".join(f"{i}={c}" for i, c in enumerate(meta.get("class_names", [])))
            raise InputError(f"the model {args.model!r} is not text-conditional, so it takes no prompt; use --label N"
                             f" ({names or 'unconditional: no label'}). Prompts need a text model such as emoji "
                             f"(python recipes/build.py emoji trains it)")
    slug = re.sub(r"[^a-z0-9]+", "-", (prompts[0] if prompts else f"{args.model}").lower()).strip("-")[:40] or "image"
    out = Path(args.out) if args.out else Path("generated") / f"{Path(slug).name}.png"
    n = args.n * len(prompts) if prompts else args.n
    req = SampleRequest(n=n, labels=args.label, prompts=[p for p in prompts for _ in range(args.n)] if prompts
                        else None, negative_prompt=args.negative_prompt, sampler=args.sampler, steps=args.steps,
                        cfg=args.cfg, seed=args.seed, device=args.device)
    for p in generate_to_file(path, req, out):
        print(f"wrote {p}")


def cmd_evaluate(args):
    from .evaluation.evaluate import evaluate, format_table, write_result

    result = evaluate(args.checkpoint, dataset=args.data, split=args.split, n=args.n, sampler=args.sampler,
                      steps=args.steps, cfg=args.cfg, seed=args.seed, device=args.device,
                      batch_size=args.batch_size, progress=not args.quiet)
    print(format_table(result))
    out = args.out or Path(args.checkpoint).with_name(f"eval-{Path(result['data']).name}-{args.split}-n{args.n}.json")
    print(f"written {write_result(result, out)}")


def cmd_info(args):
    from .checkpoint import read_metadata

    meta = read_metadata(args.checkpoint)
    print(json.dumps(meta, indent=2))


def cmd_convert(args):
    from .interop.convert import convert

    out = convert(args.src, args.dst, unsafe_pickle=args.unsafe_pickle, prediction=args.prediction, to=args.to,
                  heads=args.heads, overwrite=args.overwrite)
    print(f"written {out}")


def build_parser() -> argparse.ArgumentParser:
    from .samplers import SAMPLERS

    ap = argparse.ArgumentParser(prog="ldmkit", description="Latent diffusion: train, sample, evaluate, serve.")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-autoencoder", help="train the first stage (KL or VQ autoencoder)")
    _run_options(p, "runs/autoencoder")
    p.set_defaults(fn=cmd_train_autoencoder)

    p = sub.add_parser("train", help="train the denoiser on latents of a trained autoencoder")
    p.add_argument("--autoencoder", help="autoencoder checkpoint (from train-autoencoder)")
    p.add_argument("--text-encoder", help="minilm, clip or trainable: makes a text-to-image model")
    _run_options(p, "runs/denoiser")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("sample", help="generate images from a trained model")
    p.add_argument("checkpoint", help="model checkpoint (model.safetensors from `ldmkit train`)")
    p.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    p.add_argument("--label", type=int, action="append", help="class label (repeat for several; default: all "
                                                              "classes in turn)")
    p.add_argument("--prompt", help="text prompt (text-conditional models)")
    p.add_argument("--prompt-file", help="a file with one prompt per line; one image per line")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (text models)")
    p.add_argument("--sampler", default="dpmpp_2m", help=f"one of: {', '.join(SAMPLERS)}")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="guidance rescale phi in [0, 1]")
    p.add_argument("--eta", type=float, default=None, help="noise amount for ddim / ancestral / sde samplers")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i, at any batch size")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--separate", action="store_true", help="one PNG per image instead of a grid")
    p.add_argument("--out", default="samples.png", help="output PNG (a folder with --separate)")
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("generate", help="generate with a shipped model (emoji by default) or any checkpoint")
    p.add_argument("prompt", nargs="*", help="one or more prompts (text models); each gets --n images")
    p.add_argument("--model", help="emoji, fashion-mnist, or a model.safetensors path (default: emoji when "
                                   "shipped, else fashion-mnist)")
    p.add_argument("--label", type=int, action="append", help="class label for class-conditional models")
    p.add_argument("--n", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--sampler", default="dpmpp_2m", help=f"one of: {', '.join(SAMPLERS)}")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="output PNG (default generated/PROMPT.png)")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("evaluate", help="FID/KID of a model, or PSNR/SSIM/rFID of an autoencoder")
    p.add_argument("checkpoint", help="model.safetensors or autoencoder.safetensors")
    p.add_argument("--data", help="reference data set (default: the one the checkpoint was trained on)")
    p.add_argument("--split", default="test", help="train or test for built-in data sets (default test)")
    p.add_argument("--n", type=int, default=10000, help="images to generate / reconstruct (default 10000)")
    p.add_argument("--sampler", default="dpmpp_2m", help=f"one of: {', '.join(SAMPLERS)}")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="JSON result (default: eval-DATA-SPLIT-nN.json beside the checkpoint)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("convert", help="convert between an ldmkit checkpoint, a diffusers folder and an SD file")
    p.add_argument("src", help="ldmkit .safetensors, diffusers pipeline folder, SD .safetensors or .ckpt")
    p.add_argument("dst", help="destination file or folder (the format follows from the path, or use --to)")
    p.add_argument("--to", choices=["ldm", "diffusers", "single-file"], help="destination format when ambiguous")
    p.add_argument("--prediction", choices=["eps", "v"], help="the model's prediction type, for foreign sources "
                                                              "(default: scheduler config, or SD 1.x eps / 2.x v)")
    p.add_argument("--heads", type=int, help="U-Net attention heads, for single files that are neither SD 1.x nor 2.x")
    p.add_argument("--unsafe-pickle", action="store_true",
                   help="allow reading a .ckpt pickle (loaded with torch.load(weights_only=True))")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("info", help="print a checkpoint's kind and configuration")
    p.add_argument("checkpoint")
    p.set_defaults(fn=cmd_info)
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130
    except LdmkitError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
