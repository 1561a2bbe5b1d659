"""What the image commands make of their parsed options: prompts checked for UTF-8, the SampleRequest, the output
target, and the screen and signer of their output. The library is imported inside each function, when a command
runs, so that parsing stays fast."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

from ..errors import InputError, MissingFileError
from .options import given

ARGV_FIX = "type it again in a UTF-8 terminal (check the locale, e.g. LANG=C.UTF-8)"


def utf8(text: str, what: str, fix: str) -> str:
    """`text`, or an InputError when it holds bytes that are not UTF-8 (decoded from argv or a file with
    surrogateescape, they are lone surrogates, which would fail later when the prompt is encoded)."""
    if not any("\ud800" <= c <= "\udfff" for c in text):
        return text
    shown = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    raise InputError(f"the {what} {shown!r} is not valid UTF-8 (\ufffd marks the bytes that are not); {fix}")


def read_prompt_file(path: str) -> list[str]:
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
        utf8(ln.strip(), f"prompt on line {i} of {path}", "save the file as UTF-8") for i, ln in enumerate(lines, 1)
    ]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise InputError(f"{path} has no prompts (one per line)")
    return prompts


def request(args, n: int, prompts: list[str] | None, checkpoint=None):
    """The SampleRequest of the image commands: their shared options plus the images and prompts each decides. With
    --policy, every prompt must pass the policy's rules first. The sampler, steps and guidance are `sampling`'s."""
    from ..governance.policy import load_policy
    from ..pipelines.request import SampleRequest

    if args.policy:
        load_policy(args.policy).enforce(prompts or [])
    chosen = sampling(args, checkpoint)
    return SampleRequest(
        n=n,
        labels=args.label,
        prompts=prompts,
        negative_prompt=utf8(args.negative_prompt, "negative prompt", ARGV_FIX),
        sampler=chosen["sampler"],
        steps=chosen["steps"],
        cfg=chosen["cfg"],
        cfg_rescale=args.guidance_rescale,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        eta=args.eta,
        precision=getattr(args, "precision", "fp32"),
        backend=getattr(args, "backend", "torch"),
    )


def sampling(args, checkpoint=None) -> dict:
    """The sampler, steps and guidance of a sampling command: the command line's, and for the options it leaves
    out the model's own where it has them (a distilled model, or a --lora LCM-LoRA: lcm, its steps, cfg 1), with a
    note on stderr saying so, and a note for more LCM steps than a consistency model uses."""
    from ..pipelines.request import lcm_note

    chosen = {k: getattr(args, k) for k in ("sampler", "steps", "cfg")}
    own = {k: v for k, v in model_chosen(args, checkpoint).items() if not given(args, k)}
    if own:
        said = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in own.items())
        print(f"note: the model samples with {said} (its own; --sampler, --steps, --cfg override)", file=sys.stderr)
    chosen |= own
    note = lcm_note(chosen["sampler"], chosen["steps"])
    if note:
        print(note, file=sys.stderr)
    return chosen


def model_chosen(args, checkpoint) -> dict:
    """The sampler, steps and guidance the model at `checkpoint` chooses (a distilled model's), or the first --lora
    that distils its base (an LCM-LoRA); {} when neither does."""
    from ..adapters import read_lora
    from ..pipelines.lora import parse_lora
    from ..pipelines.request import model_sampling
    from ..shipped import model_config

    for spec in getattr(args, "lora", None) or []:
        path = parse_lora(spec).path
        own = model_sampling(read_lora(path).about) if Path(path).is_file() else {}  # an LCM-LoRA's distillation
        if own:
            return own
    return model_sampling(model_config(checkpoint)) if checkpoint is not None else {}


def finish(args, checkpoint, world=None):
    """The screen the policy and --watermark ask for, as the writers take it (None: nothing to do). A missing
    classifier or index is an error now, before any sampling. world: under torchrun, rank 0 draws the run's id
    for all ranks, so that every image of the run carries the same one."""
    if not args.policy and not args.watermark:  # build_screen(None, ..., mark=False) screens nothing
        return None
    from ..distributed import World
    from ..governance.policy import load_policy
    from ..governance.screen import build_screen, finisher

    policy = load_policy(args.policy) if args.policy else None
    screen = build_screen(policy, Path(checkpoint), mark=args.watermark)
    if not screen.active:
        return None
    run_id = (world or World()).on_main(lambda: uuid.uuid4().hex)
    return finisher(screen, run_id, lambda message: print(message, file=sys.stderr))


def sign(args):
    """The content-credentials signer --c2pa-cert and --c2pa-key ask for (None: none), checked now, before any
    sampling (a certificate C2PA refuses, a key of another certificate, only one of the two)."""
    from ..governance.credentials import credentials_from, file_signer

    names = ("--c2pa-cert", "--c2pa-key")
    return file_signer(credentials_from(args.c2pa_cert, args.c2pa_key, names))


def progress(args) -> bool:
    """Whether an image command shows its progress bar: on stderr when that is a terminal, unless --quiet."""
    return not args.quiet and sys.stderr.isatty()


def target(args, out):
    """`out` under the output rule of every image command (pipelines/output.py): never an input file, and an
    existing file replaced only with --overwrite (else NAME-1.png, NAME-2.png, ... beside it)."""
    from ..pipelines.output import Target

    given = [getattr(args, k, None) for k in ("prompt_file", "policy", "c2pa_cert", "c2pa_key", "image", "mask")]
    given += [p for c in getattr(args, "control", None) or [] for p in c.split(":")[:2]]  # ControlNets, images
    return Target(Path(out), overwrite=args.overwrite, inputs=tuple(Path(p) for p in given if p))


def controls(args) -> dict:
    """--control CONTROLNET:IMAGE[:SCALE[:KIND[:START[:END]]]] (repeatable), each checked, as keyword arguments;
    CONTROLNET is a file or a shipped ControlNet's name."""
    from ..pipelines.control import parse_control
    from ..shipped import resolve_control_spec

    specs = [resolve_control_spec(c) for c in args.control or []]  # a shipped ControlNet by name
    parsed = [parse_control(c, args.control_start, args.control_end) for c in specs]
    return {"controls": parsed} if parsed else {}


def loras(args) -> dict:
    """The edits' --lora FILE[:SCALE] (repeatable) and --lora-merge, as keyword arguments."""
    from ..pipelines.lora import parse_lora

    parsed = [parse_lora(s) for s in args.lora or []]
    return {"loras": parsed, "lora_merge": args.lora_merge} if parsed else {}
