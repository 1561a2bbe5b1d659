"""Clips from a video model (tasks/video.py): prompts or labels -> latent clips (B, F, c, h, w) through the one
sampling driver -> frames decoded one by one -> the screen (policy, watermark) on every frame -> a GIF, MP4 or PNG
frame strip with the generation parameters embedded.

Image-to-video (`first_frame`) keeps the first frame's latent as inpainting keeps known latents (the blend of
diffusion.sample.Known, with a mask that regenerates every frame but the first), so the clip starts from the image
and the temporal layers carry it on. Everything that can be checked (frames, fps, the output's extension, the
model's task, the first frame's file) is checked before the first sampling step.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.clips import clip_format, write_clip
from ..data.images import Sign, to_pil
from ..diffusion.sample import Known
from ..errors import InputError
from ..ldm import LatentDiffusion
from ..nn.frames import fold, unfold
from ..runtime import resolve_device
from .images import load_edit_image, to_channels
from .output import Finish, Target, as_target, claim, edit_paths, write_or_rescue
from .plan import draw, plan, request_batches
from .record import input_record, model_record
from .request import SampleRequest

MAX_FRAMES = 256  # frames per clip at most, before a model says its own limit (unet.max_frames)
MAX_FPS = 240.0


@dataclass(frozen=True)
class ClipRequest:
    """What a clip adds to a SampleRequest (whose n counts clips and whose seed + i seeds clip i)."""

    frames: int = 16  # frames per clip
    fps: float = 8.0  # frames per second of the written file
    first_frame: str | None = None  # an image file the clips start from (image-to-video)


def check_clip(clip: ClipRequest, limit: int = MAX_FRAMES) -> None:
    """InputError for frames <= 0 or over `limit` (the model's, once loaded) and for an fps <= 0 or over MAX_FPS."""
    if not isinstance(clip.frames, int) or clip.frames <= 0:
        raise InputError(f"--frames {clip.frames}: a clip needs at least 1 frame (16 is usual)")
    if clip.frames > limit:
        whose = "this model's limit" if limit != MAX_FRAMES else "the limit"
        raise InputError(f"--frames {clip.frames} is more than {whose} of {limit} frames; ask for {limit} or fewer")
    if not (0 < clip.fps <= MAX_FPS) or math.isnan(clip.fps):
        raise InputError(f"--fps {clip.fps}: frames per second must be above 0 and at most {MAX_FPS:g} (8 is usual)")


def check_video_model(ldm: LatentDiffusion, clip: ClipRequest) -> None:
    """InputError unless `ldm` is a video model whose temporal layers take clip.frames frames."""
    ldm.task_spec.require(ldm, "video")  # an image model names the commands that use it
    check_clip(clip, ldm.run.unet.max_frames)


def first_frame_latents(ldm: LatentDiffusion, image: str | Path | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The scaled latent (1, c, h, w) of `image` (a file, or (1, C, H', W') in [-1, 1]) at the clips' pixel size
    (H, W); an image of another size is resized to it, with a note."""
    x = image if isinstance(image, torch.Tensor) else load_edit_image(image, ldm.ae_config.in_channels)
    x = to_channels(x, ldm.ae_config.in_channels)  # (1, C, H', W')
    if tuple(x.shape[-2:]) != tuple(size):
        what = f"--first-frame {image}" if not isinstance(image, torch.Tensor) else "the first frame"
        warnings.warn(
            f"{what} is {x.shape[-1]}x{x.shape[-2]}; it is resized to the clip's {size[1]}x{size[0]}", stacklevel=2
        )
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
    return ldm.encode(x)


def video_latents(
    ldm: LatentDiffusion,
    req: SampleRequest,
    clip: ClipRequest,
    progress: bool = False,
    callback: Callable | None = None,
    first_frame: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """(latent clips (b, F, c, h, w), a caption per clip) for each batch of req.batch_size clips; clip i always
    uses seed + i. progress: a bar on stderr over clips x frames x sampler steps; callback: called at every
    sampling step as the samplers call it (it may raise to stop); first_frame: the image (1, C, H, W) in [-1, 1]
    the clips start from, instead of clip.first_frame's file."""
    check_video_model(ldm, clip)
    p = plan(ldm, req)
    c, h, w, frames = ldm.latent_channels, p.height // ldm.factor, p.width // ldm.factor, clip.frames
    image = first_frame if first_frame is not None else clip.first_frame
    first = first_frame_latents(ldm, image, (p.height, p.width)) if image is not None else None
    work = f"{req.n} clip{'s' if req.n != 1 else ''} x {frames} frames x {req.steps} steps"
    with tqdm(total=req.n * frames * req.steps, unit="frame-step", desc=f"video ({work})", disable=not progress) as bar:
        for b in request_batches(ldm, req, p, "video"):
            shape = (b.size, frames, c, h, w)
            known = None
            if first is not None:  # the first frame kept, every other one sampled
                x0 = torch.zeros(shape, device=ldm.device)
                x0[:, 0] = first.to(ldm.device)
                regenerate = torch.ones(1, frames, 1, h, w, device=ldm.device)
                regenerate[:, 0] = 0
                known = Known(x0, regenerate)

            def tick(*args, k=b.size * frames):
                bar.update(k)
                if callback is not None:
                    callback(*args)

            yield draw(ldm, req, shape, b.cond, b.uncond, b.generators, tick, known=known), b.captions


def decode_clips(ldm: LatentDiffusion, z: torch.Tensor) -> torch.Tensor:
    """Latent clips (B, F, c, h, w) -> frames (B, F, C, H, W) in [-1, 1], each decoded as an image."""
    return unfold(ldm.decode(fold(z)), z.shape[1]).cpu()


def generate_clips(
    ldm: LatentDiffusion,
    req: SampleRequest,
    clip: ClipRequest,
    progress: bool = False,
    callback: Callable | None = None,
    first_frame: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """Every clip of the request: frames (n, F, C, H, W) in [-1, 1] and a caption per clip (callback and first_frame
    as video_latents takes them)."""
    clips, captions = [], []
    for z, caps in video_latents(ldm, req, clip, progress, callback, first_frame):
        clips.append(decode_clips(ldm, z))
        captions += caps
    return torch.cat(clips), captions


def video_to_file(
    checkpoint: str | Path,
    req: SampleRequest,
    clip: ClipRequest,
    out: str | Path | Target,
    progress: bool = True,
    finish: Finish | None = None,
    sign: Sign | None = None,
) -> list[Path]:
    """Write req.n clips to `out` (one clip) or OUT-0.EXT, OUT-1.EXT, ... (several), as .gif, .mp4 or .png (a frame
    strip) by the extension, each with the request's parameters, its seed, the frames and fps embedded. Checked
    before the model loads: frames, fps, the extension, the first frame's file; after: the model's task and frame
    limit. finish: the screen every frame passes (a clip with a withheld frame is not written); sign: content
    credentials (PNG strips only). `out` is claimed as pipelines.output says (never an input, an existing file
    replaced only when the Target says so)."""
    target = as_target(out)
    check_clip(clip)
    clip_format(target.path)
    if sign is not None and target.path.suffix.lower() != ".png":
        raise InputError(f"content credentials are written into PNG files only; write {target.path.stem}.png")
    inputs = (*target.inputs, checkpoint, *([clip.first_frame] if clip.first_frame else []))
    if clip.first_frame and not Path(clip.first_frame).is_file():
        load_edit_image(clip.first_frame, 3)  # its own error: missing, a folder
    params = model_record(checkpoint) | req.record()  # LoRAs by name and hash, precision as the image commands
    params |= {"frames": clip.frames, "fps": clip.fps}
    if clip.first_frame:
        params["first_frame"] = input_record(clip.first_frame)
    claims = claim(edit_paths(target.path, req.n), inputs, target.overwrite)
    written: list[Path] = []
    try:
        ldm = LatentDiffusion.load(checkpoint, resolve_device(req.device, "--device"))
        done = 0
        for z, captions in video_latents(ldm, req, clip, progress):
            for x, cap in zip(decode_clips(ldm, z), captions, strict=True):
                i, done = done, done + 1
                frames, facts = _finished(x, finish, i)
                if frames is None:
                    continue
                about = params | {"seed": req.seed + i, "n": 1, "index": i, "caption": cap} | facts
                save = lambda p, f=frames, a=about: write_clip(f, p, clip.fps, a, sign)  # noqa: E731
                written.append(write_or_rescue(save, claims.paths[i]))
    finally:
        claims.release(written)
    return written


def _finished(x: torch.Tensor, finish: Finish | None, index: int):
    """(the frames to write, or None when the screen withheld one of them; the facts to embed) for clip `index`
    (F, C, H, W): every frame passes the screen (and gets the watermark)."""
    frames = [to_pil(f) for f in x]
    if finish is None:
        return frames, {}
    done = finish(frames, 0)
    if any(img is None for img, _ in done):
        warnings.warn(f"clip {index} was withheld: a frame did not pass the screen", stacklevel=3)
        return None, {}
    return [img for img, _ in done], done[0][1]
