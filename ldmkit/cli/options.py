"""The options several commands share, and how a command group adds a command.

A group module (train.py, generate.py, ...) exposes add(sub, common) and adds each of its commands with
command(sub, common, name, help, fn, options): options(p) adds the command's arguments. The parser of `ldmkit`
itself defers options(p) until the command is chosen (Commands), so `ldmkit --help` and a command's start import
only what that command needs; build_parser() builds them all at once. Whatever an options function needs from the
library (the parameter table, a registry) it imports inside itself, as the handlers do."""

from __future__ import annotations

import argparse
from typing import Callable


class Commands(argparse._SubParsersAction):
    """The sub-commands action of `ldmkit`: a command's options are added when that command is chosen, not before."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pending: dict[str, Callable[[argparse.ArgumentParser], None]] = {}

    def defer(self, name: str, options: Callable[[argparse.ArgumentParser], None]) -> None:
        self._pending[name] = options

    def __call__(self, parser, namespace, values, option_string=None):
        name = values[0]
        if name in self._pending:
            self._pending.pop(name)(self._name_parser_map[name])
        super().__call__(parser, namespace, values, option_string)


def command(sub, common: argparse.ArgumentParser, name: str, help: str, fn=None, options=None, **kw):
    """Add the command `name` to `sub`: --debug from `common`, fn(args) as what it runs (a command of actions sets it
    on each action instead) and options(p) for its arguments, now, or when the command is chosen if `sub` is a
    Commands action. Returns the command's parser."""
    p = sub.add_parser(name, help=help, parents=[common], **kw)
    if fn is not None:
        p.set_defaults(fn=fn)
    if options is not None:
        if isinstance(sub, Commands):
            sub.defer(name, options)
        else:
            options(p)
    return p


def set_option(p: argparse.ArgumentParser, example: str):
    """--set KEY=VALUE (repeatable, collected in args.overrides): any setting of the command's configuration."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"any setting, e.g. {example} (repeatable)",
    )


class Once(argparse.Action):
    """An option that may be given once: a second value is refused, never silently taking the place of the first."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(
                f"{option_string} was given twice ({getattr(namespace, self.dest)!r}, then {values!r}); this command "
                f"takes one, so give it once (quote a prompt of several words)"
            )
        setattr(namespace, self.dest, values)


class Given(argparse._StoreAction):
    """A stored option that also records its name in `given_options`, so that a model may choose the value of the
    options a command line leaves out (a distilled model's sampler and steps)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given_options = {*getattr(namespace, "given_options", ()), self.dest}


def given(args, name: str) -> bool:
    """Whether the command line gave the option of parameter `name` (one added with the Given action)."""
    return name in getattr(args, "given_options", ())


def spec_options(p: argparse.ArgumentParser, command: str, *names: str):
    """The generation parameters `names` as `command`'s options: flags, type, default, bounds and help from the
    parameter table (pipelines/request.py)."""
    from ..pipelines.request import MODEL_CHOSEN, SPEC

    for name in names:
        flags, kw = SPEC[name].cli(command)
        if name in MODEL_CHOSEN and "action" not in kw:
            kw["action"] = Given
        p.add_argument(*flags, **kw)


def sampling_options(p: argparse.ArgumentParser, command: str):
    """The options of every sampling command (sample, generate, the edits, evaluate), derived from the parameter
    table; only --n and --batch-size defaults differ between commands, as the table says."""
    spec_options(p, command, "n", "sampler", "steps", "cfg", "seed", "batch_size", "device")
    p.add_argument(
        "--quiet", action="store_true", help="no progress bar (shown on stderr, when it is a terminal, by default)"
    )


def generation_options(p: argparse.ArgumentParser, command: str):
    """What the image commands share beyond sampling_options: labels, the negative prompt, guidance rescale, eta
    (from the parameter table), and the governance of their output."""
    from ..pipelines.request import SPEC

    spec_options(p, command, "labels", "negative_prompt", "cfg_rescale", "eta", "precision")
    if command in SPEC["backend"].commands:
        spec_options(p, command, "backend")
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


def control_options(p: argparse.ArgumentParser):
    p.add_argument(
        "--control",
        action="append",
        metavar="CONTROLNET:IMAGE[:SCALE[:KIND[:START[:END]]]]",
        help="steer the model with a ControlNet (from `ldmkit train --task control` or `ldmkit convert`, or a "
        "shipped one by name: fashion-mnist-mask) and a "
        "condition image, its residuals scaled by SCALE (default 1); KIND: canny, mask, colour or raw (default: the "
        "ControlNet's detector, raw for paired folders); START, END: the fraction of the steps it acts on (default "
        "--control-start, --control-end); repeat for several",
    )
    p.add_argument(
        "--control-start", type=float, default=0.0, help="the fraction of the steps the controls start at (default 0)"
    )
    p.add_argument(
        "--control-end", type=float, default=1.0, help="the fraction of the steps the controls end at (default 1)"
    )


def lora_options(p: argparse.ArgumentParser):
    p.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:SCALE]",
        help="apply a LoRA (kohya or diffusers/PEFT .safetensors) at SCALE (default 1, negative allowed); repeatable",
    )
    p.add_argument("--lora-merge", action="store_true", help="merge the LoRAs into the weights (fastest)")


def embedding_options(p: argparse.ArgumentParser):
    p.add_argument(
        "--embedding",
        action="append",
        metavar="FILE[:TOKEN]",
        help="add a textual-inversion word (AUTOMATIC1111 or diffusers learned_embeds .safetensors) to the text "
        "encoder, written in prompts as the file's token or TOKEN; repeatable",
    )


def database_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--database",
        help="a SQLite file or a postgresql:// URL, as given to `ldmkit serve` "
        "(default: $LDMKIT_HOME/ldmkit.db, LDMKIT_HOME defaulting to ~/.local/share/ldmkit)",
    )
