"""`ldmkit video`: prompts or labels -> a SampleRequest and a ClipRequest -> clips on disk (GIF, MP4, PNG strip)."""

from __future__ import annotations

import argparse

from . import inputs
from .inputs import ARGV_FIX, utf8
from .options import command, generation_options, sampling_options


def add(sub, common: argparse.ArgumentParser) -> None:
    command(
        sub, common, "video", "make clips with a video model (from `ldmkit train --task video`)", cmd_video, _options
    )


def _options(p: argparse.ArgumentParser):
    p.add_argument("prompt", nargs="*", help="one or more prompts (text models); each gets --n clips")
    p.add_argument("--model", required=True, help="a video model: a model.safetensors from `ldmkit train --task video`")
    p.add_argument("--frames", type=int, default=16, help="frames per clip (default 16; at most the model's limit)")
    p.add_argument("--fps", type=float, default=8.0, help="frames per second of the file written (default 8)")
    p.add_argument(
        "--first-frame",
        metavar="IMAGE",
        help="image-to-video: the clips start from this image (resized to the model's size, with a note)",
    )
    generation_options(p, "video")
    sampling_options(p, "video")
    p.add_argument(
        "--out",
        default="clip.gif",
        help="the clip: .gif, .mp4 or .png (a strip of the frames); several clips: OUT-0.gif, OUT-1.gif, ... "
        "(default clip.gif)",
    )


def cmd_video(args):
    from ..pipelines.video import ClipRequest, check_clip, video_to_file
    from ..shipped import resolve_model

    clip = ClipRequest(frames=args.frames, fps=args.fps, first_frame=args.first_frame)
    check_clip(clip)  # before the prompts, the policy and the model
    prompts = [utf8(p, "prompt", ARGV_FIX) for p in args.prompt for _ in range(args.n)] or None
    checkpoint = resolve_model(args.model)
    req = inputs.request(args, len(prompts) if prompts else args.n, prompts, checkpoint)
    finish, sign = inputs.finish(args, checkpoint), inputs.sign(args)
    target = inputs.target(args, args.out)
    for p in video_to_file(checkpoint, req, clip, target, inputs.progress(args), finish, sign):
        print(f"wrote {p}")
