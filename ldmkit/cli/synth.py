"""`ldmkit synth`: a labelled synthetic data set drawn from a model."""

from __future__ import annotations

import argparse

from ..errors import InputError
from .inputs import read_prompt_file
from .options import command, spec_options


def add(sub, common: argparse.ArgumentParser) -> None:
    command(
        sub,
        common,
        "synth",
        "export a labelled synthetic data set (one folder per label, metadata.jsonl)",
        cmd_synth,
        _synth_options,
    )


def _synth_options(p: argparse.ArgumentParser):
    p.add_argument("model", help="a shipped model's name (fashion-mnist, emoji) or a model.safetensors path")
    p.add_argument("--per-class", type=int, default=100, help="images per label (default 100)")
    p.add_argument("--out", required=True, help="the data set's folder; a rerun resumes it")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--prompts", help="text models: a CSV file with the columns prompt,label")
    text.add_argument("--prompt-file", help="text models: one prompt per line, each its own label")
    p.add_argument("--label", type=int, action="append", help="class models: only these classes (repeatable)")
    spec_options(p, "synth", "sampler", "steps", "cfg", "seed", "batch_size", "device")
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


def cmd_synth(args):
    from ..distributed import launched
    from ..shipped import resolve_model
    from ..synth.export import SynthOptions, read_prompts_csv, summary_lines, synthesize

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
        prompts = [(p, p) for p in read_prompt_file(args.prompt_file)]  # each prompt is its own label
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
