"""`ldmkit train-autoencoder` and `ldmkit train`: a run's options -> its configuration -> the training run."""

from __future__ import annotations

import argparse
import json

from .options import command, set_option


def add(sub, common: argparse.ArgumentParser) -> None:
    command(
        sub,
        common,
        "train-autoencoder",
        "train the first stage (KL or VQ autoencoder)",
        cmd_train_autoencoder,
        lambda p: run_options(p, "runs/autoencoder"),
    )
    command(sub, common, "train", "train the denoiser on latents of a trained autoencoder", cmd_train, _train_options)
    command(
        sub,
        common,
        "distill",
        "distil a model into a few-step consistency (LCM) model or LCM-LoRA",
        cmd_distill,
        _distill_options,
    )


def run_options(p: argparse.ArgumentParser, default_out: str):
    p.add_argument("--config", help="a preset name (see ldmkit/presets) or a .toml file")
    p.add_argument("--data", help="data set: fashion-mnist, emoji, or a folder of images (data.dataset)")
    p.add_argument("--resolution", type=int, help="training resolution in pixels (data.resolution)")
    p.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    p.add_argument("--batch-size", type=int, help="images per step (train.batch_size)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (train.device)")
    p.add_argument("--out", default=default_out, help=f"run folder (default {default_out})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a finished or stopped run in --out instead of refusing"
    )
    set_option(p, "--set train.lr=1e-4 --set unet.channel_mult=1,2,2")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _train_options(p: argparse.ArgumentParser):
    from ..config import CONDITIONS, LORA_LAYOUTS, LORA_TARGETS
    from ..tasks import task_names

    p.add_argument("--autoencoder", help="autoencoder checkpoint (from train-autoencoder)")
    p.add_argument(
        "--init",
        metavar="MODEL",
        help="start from this model (a shipped name, a model.safetensors, a diffusers folder or a Stable Diffusion "
        "file): its architecture, autoencoder and weights; set train.trainable for what trains (init)",
    )
    p.add_argument("--text-encoder", help="minilm, clip or trainable: makes a text-to-image model")
    p.add_argument(
        "--task",
        choices=list(task_names()),
        help="generate (default); inpaint: a model that also takes a mask and a masked image; upscale: a super-"
        "resolution model that takes a low-resolution image (set upscale.factor, default 4); control: a ControlNet "
        "beside the frozen --init model; video: temporal layers added to the --init image model, trained on clips "
        "(task)",
    )
    p.add_argument(
        "--condition",
        choices=list(CONDITIONS),
        help="--task control: the condition each image is paired with: canny edges, a foreground mask (alpha, or "
        "what differs from the background), a coarse colour layout, or folder (metadata.jsonl's "
        "conditioning_image) (control.condition)",
    )
    p.add_argument(
        "--control-rank",
        type=int,
        metavar="R",
        help="--task control: a low-rank ControlNet, its copy trained through rank-R LoRAs on the frozen base "
        "weights; its file holds only what differs from the base model and loads with it (control.rank)",
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        metavar="R",
        help="with --init: train rank-R LoRA adapters on the frozen model and write lora.safetensors (lora.rank)",
    )
    p.add_argument("--lora-alpha", type=float, metavar="A", help="the LoRA scale numerator (default R) (lora.alpha)")
    p.add_argument(
        "--lora-targets",
        choices=list(LORA_TARGETS),
        help="layers to adapt: attention projections (default), and feed-forward, or every linear and 1x1 "
        "convolution (lora.targets)",
    )
    p.add_argument(
        "--lora-layout",
        choices=list(LORA_LAYOUTS),
        help="lora.safetensors' keys: peft (diffusers' load_lora_weights; default) or kohya (AUTOMATIC1111, "
        "ComfyUI) (lora.layout)",
    )
    p.add_argument(
        "--lora-text",
        action="store_true",
        help="with --lora-rank: also train LoRAs on every linear layer of the model's text encoder (clip or "
        "trainable), written into the same lora.safetensors (lora.text_encoder)",
    )
    p.add_argument(
        "--textual-inversion",
        metavar="TOKEN",
        help="with --init (a clip or trainable text encoder): learn the embedding of the new word TOKEN, e.g. "
        "'<sks>', from --data and write embedding.safetensors (AUTOMATIC1111) and learned_embeds.safetensors "
        "(diffusers); captions without the word get it in front (textual_inversion.token; set "
        "textual_inversion.vectors and .init)",
    )
    p.add_argument(
        "--dreambooth",
        action="store_true",
        help="with --init (a text-to-image model): fine-tune it (or LoRAs, with --lora-rank) on --instance-data, "
        "each image captioned --instance-prompt; with --class-prompt, the base model's images of the class keep "
        "its prior (drawn once and cached by model and prompt; dreambooth.class_images of them)",
    )
    p.add_argument("--instance-data", metavar="DIR", help="--dreambooth: the instance's images (data.dataset)")
    p.add_argument("--instance-prompt", help="--dreambooth: the prompt naming the instance, e.g. 'a photo of sks toy'")
    p.add_argument("--class-prompt", help="--dreambooth: the class's prompt, e.g. 'a photo of a toy'")
    p.add_argument(
        "--prior-weight", type=float, help="--dreambooth: the class loss's weight (default 1; dreambooth.prior_weight)"
    )
    run_options(p, "runs/denoiser")


def _distill_options(p: argparse.ArgumentParser):
    from ..config import LORA_LAYOUTS, LORA_TARGETS

    p.add_argument("model", help="the teacher: a shipped name, a model.safetensors, a diffusers folder or SD file")
    p.add_argument(
        "--steps", type=int, default=4, help="the student's sampling steps, 1 to 8 is usual (distill.steps; default 4)"
    )
    p.add_argument(
        "--guidance", type=float, help="the teacher's guidance scale folded into the student (distill.guidance; 3)"
    )
    p.add_argument("--grid", type=int, help="the teacher's sampling grid the student learns along (distill.grid; 16)")
    p.add_argument("--train-steps", type=int, help="optimizer steps (train.steps)")
    p.add_argument("--batch-size", type=int, help="images per step (train.batch_size)")
    p.add_argument("--data", help="the images to distil on (data.dataset; default: the model's own data set)")
    p.add_argument(
        "--lora-rank", type=int, metavar="R", help="train an LCM-LoRA of rank R instead of the whole model (lora.rank)"
    )
    p.add_argument("--lora-alpha", type=float, metavar="A", help="the LoRA scale numerator (default R) (lora.alpha)")
    p.add_argument("--lora-targets", choices=list(LORA_TARGETS), help="layers the LoRA adapts (lora.targets)")
    p.add_argument("--lora-layout", choices=list(LORA_LAYOUTS), help="the LoRA file's keys (lora.layout)")
    p.add_argument("--config", help="a preset name or a .toml file with the run's other settings")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (train.device)")
    p.add_argument("--out", default="runs/distill", help="run folder (default runs/distill)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a finished or stopped run in --out")
    set_option(p, "--set train.lr=1e-4 --set data.caption_dropout=0.1")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_distill(args):
    from ..config import DenoiserRun, load_run
    from ..distributed import main_process
    from ..errors import InputError
    from ..shipped import model_config
    from ..training.init import init_source
    from ..training.runs import train_denoiser

    if not 1 <= args.steps <= 64:
        raise InputError(f"--steps {args.steps}: a consistency model samples in 1 to 8 steps (at most 64); use 4")
    source, fmt = init_source(args.model)
    data = args.data
    if data is None and fmt == "ldm":  # the teacher's own images, as its run recorded them
        data = (model_config(source).get("data") or {}).get("dataset")
    if data is None:
        raise InputError(f"{args.model} does not record its data set; give the images to distil on with --data DIR")
    pairs = [
        ("init", args.model),
        ("distill.steps", args.steps),
        ("distill.guidance", args.guidance),
        ("distill.grid", args.grid),
        ("data.dataset", data),
        ("train.steps", args.train_steps),
        ("train.batch_size", args.batch_size),
        ("train.device", args.device),
        ("data.caption_dropout", 0.0),  # guidance is folded in: the student learns the conditional trajectory
    ] + [(f"lora.{k}", getattr(args, f"lora_{k}")) for k in ("rank", "alpha", "targets", "layout")]
    run = load_run(DenoiserRun, args.config, [f"{k}={v}" for k, v in pairs if v is not None] + list(args.overrides))
    result = train_denoiser(run, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if main_process():
        print(json.dumps(result, indent=2))
        what = "LCM-LoRA" if run.lora.rank else "consistency model"
        print(
            f"{what} written to {result['checkpoint']}; `ldmkit generate --model {result['checkpoint']}` samples it "
            f"with the lcm sampler in {args.steps} steps"
        )


def _overrides(args) -> list[str]:
    pairs = [
        ("data.dataset", args.data),
        ("data.resolution", args.resolution),
        ("train.steps", args.steps),
        ("train.batch_size", args.batch_size),
        ("train.device", args.device),
    ]
    return [f"{k}={v}" for k, v in pairs if v is not None] + list(args.overrides)


def cmd_train_autoencoder(args):
    from ..config import AutoencoderRun, load_run
    from ..distributed import main_process
    from ..training.runs import train_autoencoder

    run = load_run(AutoencoderRun, args.config, _overrides(args))
    result = train_autoencoder(run, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if main_process():  # under torchrun, rank 0 alone reports
        print(json.dumps(result, indent=2))
        print(f"autoencoder written to {result['checkpoint']}")


def _dreambooth(args) -> list[str]:
    """The settings of --dreambooth and its options (InputError for the options without it, or it without them)."""
    from ..errors import InputError

    given = {k: getattr(args, k) for k in ("instance_data", "instance_prompt", "class_prompt", "prior_weight")}
    if not args.dreambooth:
        named = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
        if named:
            raise InputError(f"{', '.join(named)} {'goes' if len(named) == 1 else 'go'} with --dreambooth; add it")
        return []
    if not args.init or not given["instance_data"] or not given["instance_prompt"]:
        raise InputError("--dreambooth needs --init MODEL, --instance-data DIR and --instance-prompt PROMPT")
    out = [f"data.dataset={given['instance_data']}", f"dreambooth.instance_prompt={given['instance_prompt']}"]
    if given["class_prompt"] is not None:
        out.append(f"dreambooth.class_prompt={given['class_prompt']}")
    if given["prior_weight"] is not None:
        out.append(f"dreambooth.prior_weight={given['prior_weight']}")
    return out


def cmd_train(args):
    from ..config import DenoiserRun, load_run
    from ..distributed import main_process
    from ..training.runs import train_denoiser

    extra = [f"autoencoder={args.autoencoder}"] if args.autoencoder else []
    if args.text_encoder:
        extra.append(f"text_encoder={args.text_encoder}")
    if args.task:
        extra.append(f"task={args.task}")
    if args.init:
        extra.append(f"init={args.init}")
    if args.condition:
        extra.append(f"control.condition={args.condition}")
    if args.control_rank is not None:
        extra.append(f"control.rank={args.control_rank}")
    if args.textual_inversion is not None:
        extra.append(f"textual_inversion.token={args.textual_inversion}")
    for key in ("rank", "alpha", "targets", "layout"):
        if getattr(args, f"lora_{key}") is not None:
            extra.append(f"lora.{key}={getattr(args, f'lora_{key}')}")
    if args.lora_text:
        extra.append("lora.text_encoder=true")
    extra += _dreambooth(args)
    run = load_run(DenoiserRun, args.config, extra + _overrides(args))
    if run.dreambooth.class_prompt and not run.dreambooth.class_data:  # drawn by the base model, or found cached
        from ..pipelines.dreambooth import class_images
        from ..shipped import resolve_model

        db = run.dreambooth
        folder = class_images(resolve_model(run.init), db.class_prompt, db.class_images, progress=not args.quiet)
        run = load_run(DenoiserRun, args.config, [*extra, f"dreambooth.class_data={folder}", *_overrides(args)])
    result = train_denoiser(run, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if main_process():
        print(json.dumps(result, indent=2))
        what = "LoRA" if run.lora.rank else "embedding" if run.textual_inversion.token else "model"
        print(f"{what} written to {result['checkpoint']}")
