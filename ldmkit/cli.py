"""The `ldmkit` command: parse -> config -> call. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
import warnings
from dataclasses import replace
from pathlib import Path

from PIL import Image

from .adapters import describe as describe_lora
from .checkpoint import check_output_path, read_metadata
from .config import CONDITIONS, LORA_LAYOUTS, LORA_TARGETS, AutoencoderRun, DenoiserRun, ServeRun, load_run
from .data.conditions import DETECTORS, condition_image
from .data.images import to_pil, write_image
from .distributed import World, launched, main_process, process_group
from .errors import InputError, LdmkitError, MissingFileError
from .evaluation.evaluate import evaluate, format_table, result_path, write_result
from .governance.credentials import credentials_from, file_signer
from .governance.policy import load_policy
from .governance.screen import build_screen, finisher, load_index
from .governance.similarity import DEFAULT_THRESHOLD as COPY_THRESHOLD
from .interop.convert import convert
from .ldm import LatentDiffusion
from .pipelines.control import parse_control
from .pipelines.generate import SampleRequest, generate_to_file
from .pipelines.img2img import check_strength, img2img_to_file
from .pipelines.inpaint import MAX_RESAMPLE, InpaintOptions, inpaint_to_file
from .pipelines.lora import parse_lora
from .pipelines.masks import FEATHER_PX
from .pipelines.outpaint import Border, outpaint_to_file
from .pipelines.output import Target
from .pipelines.request import SPEC
from .pipelines.upscale import UpscaleOptions, check_input_size, upscale_to_file
from .serve.commands import add_audit_command, add_keys_command, add_prompts_command
from .serve.governance_commands import add_governance_commands
from .serve.server import serve
from .shipped import plan_generation, resolve_model
from .synth.export import SynthOptions, read_prompts_csv, summary_lines, synthesize
from .tasks import task_names
from .training.runs import train_autoencoder, train_denoiser


def _set_option(p: argparse.ArgumentParser, example: str):
    """--set KEY=VALUE (repeatable, collected in args.overrides): any setting of the command's configuration."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"any setting, e.g. {example} (repeatable)",
    )


class _Once(argparse.Action):
    """An option that may be given once: a second value is refused, never silently taking the place of the first."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(
                f"{option_string} was given twice ({getattr(namespace, self.dest)!r}, then {values!r}); this command "
                f"takes one, so give it once (quote a prompt of several words)"
            )
        setattr(namespace, self.dest, values)


def _run_options(p: argparse.ArgumentParser, default_out: str):
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
    _set_option(p, "--set train.lr=1e-4 --set unet.channel_mult=1,2,2")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _spec_options(p: argparse.ArgumentParser, command: str, *names: str):
    """The generation parameters `names` as `command`'s options: flags, type, default, bounds and help from the
    parameter table (pipelines/request.py)."""
    for name in names:
        flags, kw = SPEC[name].cli(command)
        p.add_argument(*flags, **kw)


def _sampling_options(p: argparse.ArgumentParser, command: str):
    """The options of every sampling command (sample, generate, the edits, evaluate), derived from the parameter
    table; only --n and --batch-size defaults differ between commands, as the table says."""
    _spec_options(p, command, "n", "sampler", "steps", "cfg", "seed", "batch_size", "device")
    p.add_argument(
        "--quiet", action="store_true", help="no progress bar (shown on stderr, when it is a terminal, by default)"
    )


def _generation_options(p: argparse.ArgumentParser, command: str):
    """What the image commands share beyond _sampling_options: labels, the negative prompt, guidance rescale, eta
    (from the parameter table), and the governance of their output."""
    _spec_options(p, command, "labels", "negative_prompt", "cfg_rescale", "eta")
    p.add_argument(
        "--policy",
        help="a policy.toml: prompts its rules refuse stop the command before any work; its [safety] and "
        "[similarity] tables screen every image before it is written",
    )
    p.add_argument(
        "--watermark",
        action="store_true",
        help="hide this run's id in every image's pixels (`ldmkit provenance IMAGE` reads it back)",
    )
    p.add_argument(
        "--c2pa-cert",
        metavar="CHAIN.pem",
        help="sign every image (PNG) with C2PA content credentials: the signing certificate and its issuers "
        "(`ldmkit credentials demo-cert` makes a test pair); needs --c2pa-key",
    )
    p.add_argument("--c2pa-key", metavar="KEY.pem", help="the private key of --c2pa-cert's certificate")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out file (default: keep it and write NAME-1.png, NAME-2.png, ... beside it); "
        "an input file is never replaced",
    )


def _utf8(text: str, what: str, fix: str) -> str:
    """`text`, or an InputError when it holds bytes that are not UTF-8 (decoded from argv or a file with
    surrogateescape, they are lone surrogates, which would fail later when the prompt is encoded)."""
    if not any("\ud800" <= c <= "\udfff" for c in text):
        return text
    shown = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    raise InputError(f"the {what} {shown!r} is not valid UTF-8 (\ufffd marks the bytes that are not); {fix}")


_ARGV_FIX = "type it again in a UTF-8 terminal (check the locale, e.g. LANG=C.UTF-8)"


def _read_prompt_file(path: str) -> list[str]:
    """The non-empty lines of a UTF-8 text file (one prompt each), stripped."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise MissingFileError(
            f"prompt file {path} does not exist; give a text file with one prompt per line"
        ) from None
    except IsADirectoryError:
        raise InputError(f"prompt file {path} is a folder; give a text file with one prompt per line") from None
    except OSError as e:
        raise InputError(f"prompt file {path} cannot be read ({e.strerror}); check its permissions") from None
    lines = data.decode("utf-8", "surrogateescape").removeprefix("\ufeff").splitlines()
    prompts = [
        _utf8(ln.strip(), f"prompt on line {i} of {path}", "save the file as UTF-8") for i, ln in enumerate(lines, 1)
    ]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise InputError(f"{path} has no prompts (one per line)")
    return prompts


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
    run = load_run(AutoencoderRun, args.config, _overrides(args))
    result = train_autoencoder(run, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if main_process():  # under torchrun, rank 0 alone reports
        print(json.dumps(result, indent=2))
        print(f"autoencoder written to {result['checkpoint']}")


def cmd_train(args):
    extra = [f"autoencoder={args.autoencoder}"] if args.autoencoder else []
    if args.text_encoder:
        extra.append(f"text_encoder={args.text_encoder}")
    if args.task:
        extra.append(f"task={args.task}")
    if args.init:
        extra.append(f"init={args.init}")
    if args.condition:
        extra.append(f"control.condition={args.condition}")
    for key in ("rank", "alpha", "targets", "layout"):
        if getattr(args, f"lora_{key}") is not None:
            extra.append(f"lora.{key}={getattr(args, f'lora_{key}')}")
    run = load_run(DenoiserRun, args.config, extra + _overrides(args))
    result = train_denoiser(run, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if main_process():
        print(json.dumps(result, indent=2))
        print(f"{'LoRA' if run.lora.rank else 'model'} written to {result['checkpoint']}")


def _request(args, n: int, prompts: list[str] | None) -> SampleRequest:
    """The SampleRequest of sample / generate: their shared options plus the images and prompts each decides. With
    --policy, every prompt must pass the policy's rules first."""
    if args.policy:
        load_policy(args.policy).enforce(prompts or [])
    return SampleRequest(
        n=n,
        labels=args.label,
        prompts=prompts,
        negative_prompt=_utf8(args.negative_prompt, "negative prompt", _ARGV_FIX),
        sampler=args.sampler,
        steps=args.steps,
        cfg=args.cfg,
        cfg_rescale=args.guidance_rescale,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        eta=args.eta,
    )


def _finish(args, checkpoint, world: World | None = None):
    """The screen the policy and --watermark ask for, as the writers take it (None: nothing to do). A missing
    classifier or index is an error now, before any sampling. world: under torchrun, rank 0 draws the run's id
    for all ranks, so that every image of the run carries the same one."""
    policy = load_policy(args.policy) if args.policy else None
    screen = build_screen(policy, Path(checkpoint), mark=args.watermark)
    if not screen.active:
        return None
    run_id = (world or World()).on_main(lambda: uuid.uuid4().hex)
    return finisher(screen, run_id, lambda message: print(message, file=sys.stderr))


def _sign(args):
    """The content-credentials signer --c2pa-cert and --c2pa-key ask for (None: none), checked now, before any
    sampling (a certificate C2PA refuses, a key of another certificate, only one of the two)."""
    names = ("--c2pa-cert", "--c2pa-key")
    return file_signer(credentials_from(args.c2pa_cert, args.c2pa_key, names))


def _progress(args) -> bool:
    """Whether an image command shows its progress bar: on stderr when that is a terminal, unless --quiet."""
    return not args.quiet and sys.stderr.isatty()


def _target(args, out) -> Target:
    """`out` under the output rule of every image command (pipelines/output.py): never an input file, and an
    existing file replaced only with --overwrite (else NAME-1.png, NAME-2.png, ... beside it)."""
    given = [getattr(args, k, None) for k in ("prompt_file", "policy", "c2pa_cert", "c2pa_key", "image", "mask")]
    given += [p for c in getattr(args, "control", None) or [] for p in c.split(":")[:2]]  # ControlNets, images
    return Target(Path(out), overwrite=args.overwrite, inputs=tuple(Path(p) for p in given if p))


def _generate_files(args, checkpoint, req: SampleRequest, out, grid: bool, controls=None) -> list[Path]:
    """generate_to_file with the screen and signer the options ask for (and the ControlNets of --control). Under
    torchrun the ranks share the images, each on its own device; rank 0 returns every path written, the others
    none."""
    with process_group(args.device, "--device") as (world, device):
        req = replace(req, device=str(device)) if world.active else req
        finish, sign = _finish(args, checkpoint, world), _sign(args)
        progress = _progress(args) and world.main
        loras = [parse_lora(s) for s in getattr(args, "lora", None) or []]
        kw = {"loras": loras, "lora_merge": getattr(args, "lora_merge", False)} if loras else {}
        target = _target(args, out)
        return generate_to_file(checkpoint, req, target, grid, progress, finish, sign, world, controls, **kw)


def cmd_sample(args):
    prompts = None
    if args.prompt_file:
        prompts = _read_prompt_file(args.prompt_file)
    elif args.prompt:  # each --prompt gets --n images
        prompts = [_utf8(p, "prompt", _ARGV_FIX) for p in args.prompt for _ in range(args.n)]
    checkpoint = resolve_model(args.checkpoint)  # a shipped name or a path, as every command takes a model
    req = _request(args, len(prompts) if prompts else args.n, prompts)
    for p in _generate_files(args, checkpoint, req, args.out, grid=not args.separate):
        print(p)


def cmd_generate(args):
    prompts = [_utf8(p, "prompt", _ARGV_FIX) for p in args.prompt]
    controls = [parse_control(c, args.control_start, args.control_end) for c in args.control or []]
    plan = plan_generation(args.model, prompts, args.label, args.n, args.out)
    req = _request(args, plan.n, plan.prompts)
    out = plan.out.with_suffix("") if args.separate and not args.out else plan.out  # default folder generated/PROMPT
    for p in _generate_files(args, plan.checkpoint, req, out, grid=not args.separate, controls=controls):
        print(f"wrote {p}")


def _edit_loras(args) -> dict:
    """img2img / inpaint / outpaint's --lora FILE[:SCALE] (repeatable) and --lora-merge, as keyword arguments."""
    loras = [parse_lora(s) for s in args.lora or []]
    return {"loras": loras, "lora_merge": args.lora_merge} if loras else {}


def cmd_img2img(args):
    check_strength(args.strength)
    loras = _edit_loras(args)
    prompts = [_utf8(args.prompt, "prompt", _ARGV_FIX)] if args.prompt is not None else []
    plan = plan_generation(args.model, prompts, args.label, args.n, args.out)
    req = _request(args, plan.n, plan.prompts)
    finish, sign = _finish(args, plan.checkpoint), _sign(args)
    out = _target(args, plan.out)
    files = img2img_to_file(
        plan.checkpoint, args.image, req, args.strength, out, _progress(args), finish, sign, **loras
    )
    for p in files:
        print(f"wrote {p}")


def cmd_evaluate(args):
    if args.out:
        check_output_path(args.out, "--out")  # before the long evaluation
    result = evaluate(
        args.checkpoint,
        dataset=args.data,
        split=args.split,
        n=args.n,
        sampler=args.sampler,
        steps=args.steps,
        cfg=args.cfg,
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


def _edit_request(args, default_out: Path, task: str):
    """(generation plan, request, inpainting options) of inpaint / outpaint: the model (default: the shipped one for
    `task`), prompt or labels and output resolved as `generate` does them."""
    opts = InpaintOptions(
        resize_mask=getattr(args, "resize_mask", False),
        resample=args.resample,
        jump=args.jump,
        feather=args.feather,
    )
    prompts = [_utf8(args.prompt, "prompt", _ARGV_FIX)] if args.prompt is not None else []
    plan = plan_generation(args.model, prompts, args.label, args.n, args.out or default_out, task=task)
    return plan, _request(args, plan.n, plan.prompts), opts


def cmd_inpaint(args):
    loras = _edit_loras(args)
    plan, req, opts = _edit_request(args, Path("generated") / f"{Path(args.image).stem}-inpainted.png", "inpaint")
    finish, sign = _finish(args, plan.checkpoint), _sign(args)
    out = _target(args, plan.out)
    files = inpaint_to_file(
        plan.checkpoint, req, args.image, args.mask, out, opts, _progress(args), finish, sign, **loras
    )
    for p in files:
        print(f"wrote {p}")


def cmd_outpaint(args):
    given = {k: getattr(args, k) for k in ("extend", "left", "right", "top", "bottom") if getattr(args, k) is not None}
    if given and not any(given.values()):
        shown = " ".join(f"--{k} {v}" for k, v in given.items())
        raise InputError(
            f"{shown} adds no border (0 pixels on every side), so there is nothing to outpaint; give --extend 1 or "
            f"more (pixels on every side), or a positive --left / --right / --top / --bottom"
        )
    border = Border.of(args.extend, args.left, args.right, args.top, args.bottom)
    loras = _edit_loras(args)
    plan, req, opts = _edit_request(args, Path("generated") / f"{Path(args.image).stem}-outpainted.png", "generate")
    finish, sign = _finish(args, plan.checkpoint), _sign(args)
    out = _target(args, plan.out)
    files = outpaint_to_file(
        plan.checkpoint, req, args.image, border, out, opts, _progress(args), finish, sign, **loras
    )
    for p in files:
        print(f"wrote {p}")


def _check_upscale_input(image: str, checkpoint) -> None:
    """The upscaler's own limit on its input (the output's size over the factor), checked first from the file's
    header, so that a too large input is told what upscale takes rather than the limit of the other edits."""
    factor = ((read_metadata(checkpoint).get("config") or {}).get("upscale") or {}).get("factor")
    try:
        with Image.open(image) as im:
            w, h = im.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return  # not readable: the pipeline names what is wrong with the file
    if isinstance(factor, int) and factor > 0:
        check_input_size(str(image), w, h, factor)


def cmd_upscale(args):
    prompts = [_utf8(args.prompt, "prompt", _ARGV_FIX)] if args.prompt is not None else []
    default_out = Path("generated") / f"{Path(args.image).stem}-upscaled.png"
    plan = plan_generation(args.model, prompts, None, args.n, args.out or default_out, task="upscale")
    opts = UpscaleOptions(noise_level=args.noise_level, tile=args.tile, overlap=args.overlap)
    req = _request(args, plan.n, plan.prompts)
    _check_upscale_input(args.image, plan.checkpoint)
    finish, sign = _finish(args, plan.checkpoint), _sign(args)
    for p in upscale_to_file(
        plan.checkpoint, req, args.image, _target(args, plan.out), opts, _progress(args), finish, sign
    ):
        print(f"wrote {p}")


def cmd_synth(args):
    if launched():
        raise InputError(
            "ldmkit synth runs as one process: its folder takes one writer, so torchrun's second rank would be "
            "refused and stop the job; start it without torchrun (for several devices, one synth per device, each "
            "into its own --out)"
        )
    prompts = None
    if args.prompts:
        prompts = read_prompts_csv(args.prompts)
    elif args.prompt_file:
        prompts = [(p, p) for p in _read_prompt_file(args.prompt_file)]  # each prompt is its own label
    opts = SynthOptions(
        per_class=args.per_class,
        labels=args.label,
        prompts=prompts,
        sampler=args.sampler,
        steps=args.steps,
        cfg=args.cfg,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        min_confidence=args.min_confidence,
        classifier=args.classifier,
        dedupe_threshold=args.dedupe_threshold,
        overwrite=args.overwrite,
    )
    result = synthesize(resolve_model(args.model), args.out, opts, progress=not args.quiet)
    for line in summary_lines(result):
        print(line)


def _synth_command(command):
    p = command("synth", "export a labelled synthetic data set (one folder per label, metadata.jsonl)", cmd_synth)
    p.add_argument("model", help="a shipped model's name (fashion-mnist, emoji) or a model.safetensors path")
    p.add_argument("--per-class", type=int, default=100, help="images per label (default 100)")
    p.add_argument("--out", required=True, help="the data set's folder; a rerun resumes it")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--prompts", help="text models: a CSV file with the columns prompt,label")
    text.add_argument("--prompt-file", help="text models: one prompt per line, each its own label")
    p.add_argument("--label", type=int, action="append", help="class models: only these classes (repeatable)")
    _spec_options(p, "synth", "sampler", "steps", "cfg", "seed", "batch_size", "device")
    p.add_argument(
        "--min-confidence",
        type=float,
        help="drop images a classifier trained on the real data gives less than this probability of their class",
    )
    p.add_argument("--classifier", help="the classifier of --min-confidence (default: train one, kept in --out)")
    p.add_argument(
        "--dedupe-threshold",
        type=float,
        help="drop images at least this similar to a training image (0.975 is the screen's default; needs "
        "MODEL.index.npz from `ldmkit index build`)",
    )
    p.add_argument("--overwrite", action="store_true", help="draw every image again instead of resuming")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _upscale_command(command):
    p = command("upscale", "enlarge an image with an upscaler (latent super-resolution, tiled when large)", cmd_upscale)
    p.add_argument("image", help="the image to upscale (PNG, JPEG, WebP, BMP or GIF)")
    p.add_argument("--model", help="emoji-upscale (default) or an upscaler's model.safetensors path")
    p.add_argument("--prompt", action=_Once, help="text prompt (text upscalers)")
    _generation_options(p, "upscale")
    p.add_argument(
        "--noise-level", type=int, help="noise added to the input: higher trusts it less (default: the model's)"
    )
    p.add_argument(
        "--tile", type=int, default=0, help="tile side in input pixels (default: twice the training size, least: half)"
    )
    p.add_argument("--overlap", type=int, default=-1, help="input pixels tiles share (default: a quarter tile)")
    _sampling_options(p, "upscale")
    p.add_argument("--out", help="output image (default generated/IMAGE-upscaled.png)")


def _edit_options(p: argparse.ArgumentParser, what: str):
    """The options inpaint and outpaint share: the model, the prompt or labels, sampling, RePaint, the output."""
    p.add_argument("image", help=f"the image to {what} (PNG, JPEG, WebP, BMP or GIF)")
    default = "fashion-mnist-inpaint, or emoji for a --prompt" if what == "inpaint" else "as for generate: emoji"
    p.add_argument("--model", help=f"a shipped model's name or a model.safetensors path (default {default})")
    p.add_argument("--prompt", action=_Once, help="text prompt (text models); class models take --label")
    _generation_options(p, what)
    _sampling_options(p, what)
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
    _lora_options(p)
    p.add_argument("--out", help=f"output image (default generated/IMAGE-{what}ed.png)")


def _edit_commands(command):
    """inpaint and outpaint; command(name, help, fn) adds one and returns its parser."""
    p = command("inpaint", "regenerate the white region of a mask, keeping the rest of the image exactly", cmd_inpaint)
    _edit_options(p, "inpaint")
    p.add_argument("--mask", required=True, help="mask image: white = regenerate, black = keep")
    p.add_argument("--resize-mask", action="store_true", help="scale a mask of another size (nearest neighbour)")

    p = command("outpaint", "enlarge an image by generating a border around it", cmd_outpaint)
    _edit_options(p, "outpaint")
    p.add_argument("--extend", type=int, help="pixels to add on every side")
    for side in ("left", "right", "top", "bottom"):
        p.add_argument(f"--{side}", type=int, help=f"pixels to add on the {side} (overrides --extend there)")


def cmd_condition(args):
    """What a ControlNet sees: the detector's map of IMAGE, written as an image."""
    with Image.open(args.image) as img:
        size = (img.height, img.width)
    out = check_output_path(Path(args.out), "--out")
    if out.resolve() == Path(args.image).resolve():
        raise InputError(f"--out {out} is the input image; write the map elsewhere")
    cond = condition_image(args.detector, args.image, size)[0]  # (3, H, W) in [0, 1]
    print(f"wrote {write_image(to_pil(cond * 2 - 1), out)}")


def cmd_info(args):
    meta = read_metadata(args.checkpoint)
    print(json.dumps(meta, indent=2))


def cmd_convert(args):
    out = convert(
        args.src,
        args.dst,
        unsafe_pickle=args.unsafe_pickle,
        prediction=args.prediction,
        to=args.to,
        heads=args.heads,
        overwrite=args.overwrite,
    )
    print(f"written {out}")


def cmd_serve(args):
    overrides = list(args.overrides)
    for key in ("host", "port", "database", "device", "policy"):
        if getattr(args, key) is not None:
            overrides.append(f"serve.{key}={getattr(args, key)}")
    if args.model:
        overrides.append(f"serve.models={','.join(args.model)}")
    serve(load_run(ServeRun, args.config, overrides), no_auth=args.no_auth)


def cmd_policy_check(args):
    decision = load_policy(args.policy).check(_utf8(args.prompt, "prompt", _ARGV_FIX), args.role)
    if decision.allowed:
        print(
            f"allowed: no rule of {args.policy} refuses this prompt" + (f" for role {args.role}" if args.role else "")
        )
        return 0
    print(f"refused by rule {decision.rule}: {decision.message}")
    return 1


def cmd_lora_inspect(args):
    net = LatentDiffusion.load(resolve_model(args.model), "cpu").unet if args.model else None
    print(json.dumps(describe_lora(args.file, net), indent=2))


def _lora_command(sub, common):
    p = sub.add_parser("lora", help="LoRA files: inspect", parents=[common])
    actions = p.add_subparsers(dest="lora_action", required=True, metavar="ACTION")
    a = actions.add_parser(
        "inspect", help="the layout, ranks and alphas of a LoRA file, and the layers that fit --model", parents=[common]
    )
    a.add_argument("file", help="a kohya or diffusers/PEFT LoRA .safetensors")
    a.add_argument("--model", help="a shipped model's name or a model.safetensors: list which layers match it")
    a.set_defaults(fn=cmd_lora_inspect)


def _policy_command(sub, common):
    p = sub.add_parser("policy", help="check prompts against a content policy (policy.toml)", parents=[common])
    actions = p.add_subparsers(dest="policy_action", required=True, metavar="ACTION")
    a = actions.add_parser(
        "check", help="say whether the policy allows a prompt (exit status 1: refused)", parents=[common]
    )
    a.add_argument("prompt")
    a.add_argument("--policy", required=True, help="the policy.toml")
    a.add_argument("--role", choices=["viewer", "user", "admin"], help="the key role to check for (default: all rules)")
    a.set_defaults(fn=cmd_policy_check)


def _serve_command(command):
    p = command(
        "serve", "serve models over HTTP: OpenAI and AUTOMATIC1111 APIs, jobs, keys, audit, a web page", cmd_serve
    )
    p.add_argument(
        "--model",
        action="append",
        help="a shipped model's name or a model.safetensors (repeatable; default: the shipped models)",
    )
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument(
        "--database", help="keys and audit: a SQLite file or a postgresql:// URL (default: under $LDMKIT_HOME)"
    )
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    p.add_argument("--policy", help="a policy.toml: prompts its rules refuse get 400 with the rule's id")
    p.add_argument("--config", help="a serve.toml with [serve] and [limits] tables")
    p.add_argument("--no-auth", action="store_true", help="serve without keys (loopback addresses only)")
    _set_option(p, "--set serve.max_batch=8 --set limits.max_n=4")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ldmkit", description="Latent diffusion: train, sample, evaluate, serve.")
    debug_help = "show the full traceback of any error"
    ap.add_argument("--debug", action="store_true", help=debug_help)
    # Every command takes --debug too (`ldmkit generate --debug ...`); SUPPRESS keeps a command that was not given
    # it from resetting the value given before the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = ap.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, fn) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, parents=[common])
        p.set_defaults(fn=fn)
        return p

    p = command("train-autoencoder", "train the first stage (KL or VQ autoencoder)", cmd_train_autoencoder)
    _run_options(p, "runs/autoencoder")

    p = command("train", "train the denoiser on latents of a trained autoencoder", cmd_train)
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
        "beside the frozen --init model (task)",
    )
    p.add_argument(
        "--condition",
        choices=list(CONDITIONS),
        help="--task control: the condition each image is paired with: canny edges, a foreground mask (alpha, or "
        "what differs from the background), a coarse colour layout, or folder (metadata.jsonl's "
        "conditioning_image) (control.condition)",
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
    _run_options(p, "runs/denoiser")

    _sampling_commands(command)

    _edit_commands(command)

    _upscale_command(command)

    _synth_command(command)

    p = command("convert", "convert between an ldmkit checkpoint, a diffusers folder and an SD file", cmd_convert)
    p.add_argument("src", help="ldmkit .safetensors, diffusers pipeline folder, SD .safetensors or .ckpt")
    p.add_argument("dst", help="destination file or folder (the format follows from the path, or use --to)")
    p.add_argument("--to", choices=["ldm", "diffusers", "single-file"], help="destination format when ambiguous")
    p.add_argument(
        "--prediction",
        choices=["eps", "v"],
        help="the model's prediction type, for foreign sources (default: scheduler config, or SD 1.x eps / 2.x v)",
    )
    p.add_argument("--heads", type=int, help="U-Net attention heads, for single files that are neither SD 1.x nor 2.x")
    p.add_argument(
        "--unsafe-pickle",
        action="store_true",
        help="allow reading a .ckpt pickle (loaded with torch.load(weights_only=True))",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")

    _serve_command(command)
    add_keys_command(sub, common)
    add_audit_command(sub, common)
    add_prompts_command(sub, common)
    _policy_command(sub, common)
    _lora_command(sub, common)
    add_governance_commands(sub, common)

    p = command("condition", "show what a ControlNet sees: a detector's map of an image", cmd_condition)
    p.add_argument("detector", choices=list(DETECTORS), help="canny edges, a foreground mask or a colour layout")
    p.add_argument("image", help="the image to run the detector on")
    p.add_argument("--out", required=True, help="the map's image file (.png, .jpg, .webp)")

    p = command("info", "print a checkpoint's kind and configuration", cmd_info)
    p.add_argument("checkpoint")
    return ap


def _lora_options(p: argparse.ArgumentParser):
    p.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:SCALE]",
        help="apply a LoRA (kohya or diffusers/PEFT .safetensors) at SCALE (default 1, negative allowed); repeatable",
    )
    p.add_argument("--lora-merge", action="store_true", help="merge the LoRAs into the weights (fastest)")


def _sampling_commands(command):
    """sample, generate and evaluate; command(name, help, fn) adds one and returns its parser."""
    p = command("sample", "generate images from a trained model", cmd_sample)
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
    _generation_options(p, "sample")
    _sampling_options(p, "sample")
    p.add_argument("--separate", action="store_true", help="one PNG per image instead of a grid")
    p.add_argument(
        "--out",
        default="samples.png",
        help="output PNG: a grid, or the image itself for one (a folder with --separate)",
    )

    p = command("generate", "generate with a shipped model (emoji by default) or any checkpoint", cmd_generate)
    p.add_argument("prompt", nargs="*", help="one or more prompts (text models); each gets --n images")
    p.add_argument(
        "--model",
        help="emoji, fashion-mnist, or a model.safetensors path (default: emoji when shipped, else fashion-mnist)",
    )
    _generation_options(p, "generate")
    _sampling_options(p, "generate")
    p.add_argument(
        "--control",
        action="append",
        metavar="CONTROLNET:IMAGE[:SCALE[:KIND]]",
        help="steer the model with a ControlNet (from `ldmkit train --task control`) and a condition image, its "
        "residuals scaled by SCALE (default 1); KIND: canny, mask, colour or raw (default: the ControlNet's "
        "detector, raw for paired folders); repeat for several",
    )
    p.add_argument(
        "--control-start", type=float, default=0.0, help="the fraction of the steps the controls start at (default 0)"
    )
    p.add_argument(
        "--control-end", type=float, default=1.0, help="the fraction of the steps the controls end at (default 1)"
    )
    _lora_options(p)
    p.add_argument("--separate", action="store_true", help="one PNG per image instead of a grid")
    p.add_argument(
        "--out",
        help="output PNG: a grid, or the image itself for one (default generated/PROMPT.png; with --separate a "
        "folder, default generated/PROMPT)",
    )

    p = command("img2img", "edit an image: noise it to --strength, then denoise under a prompt or label", cmd_img2img)
    p.add_argument("image", help="the image to start from (PNG, JPEG, WebP, BMP or GIF; at most 2048x2048 pixels)")
    p.add_argument("--prompt", action=_Once, help="text prompt (text models)")
    p.add_argument("--strength", type=float, default=0.75, help="0 keeps the image, 1 ignores it (default 0.75)")
    p.add_argument("--model", help="as for generate: a shipped model's name or a model.safetensors path")
    _generation_options(p, "img2img")
    _sampling_options(p, "img2img")
    _lora_options(p)
    p.add_argument("--out", help="output PNG (default generated/PROMPT.png)")

    p = command("evaluate", "FID/KID of a model, or PSNR/SSIM/rFID of an autoencoder", cmd_evaluate)
    p.add_argument("checkpoint", help="model.safetensors or autoencoder.safetensors")
    p.add_argument("--data", help="reference data set (default: the one the checkpoint was trained on)")
    p.add_argument("--split", default="test", help="train or test for built-in data sets (default test)")
    _sampling_options(p, "evaluate")
    p.add_argument("--out", help="JSON result (default: eval-DATA-SPLIT-nN.json beside the checkpoint)")
    p.add_argument(
        "--memorisation",
        action="store_true",
        help="also report the share of samples copying a training image (needs MODEL.index.npz: ldmkit index build)",
    )


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings as a user reads them: `warning: message`, without the source line that raised them."""
    print(f"warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    shown = warnings.showwarning
    if not args.debug:
        warnings.showwarning = _one_line_warning
    try:
        status = args.fn(args) or 0
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
    finally:
        warnings.showwarning = shown
    return status


if __name__ == "__main__":
    sys.exit(main())
