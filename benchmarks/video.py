"""Does a video model move things the way it is asked, smoothly? Motion correctness and temporal consistency of
`ldmkit video` on moving-fashion, against the image model frame by frame.

    .venv/bin/python benchmarks/video.py --model runs/video/model.safetensors --n 200 --frames 16

FVD's I3D weights cannot be had offline, so this measures what can be:
- motion accuracy: the test split's clips whose one item moves left, right, up or down give the prompts (a text
  model) or the labels (a class model, which is not told the motion: chance is 25%); each generated clip's
  brightness centroid is tracked over its frames and the direction it moved most is compared with the clip's;
- temporal consistency: the mean absolute warping error between consecutive frames after OpenCV's Farneback
  optical flow warps the next frame onto the previous one, and the mean frame-to-frame change;
- cost: seconds per clip and the process's peak resident memory at each of --scale frames (8, 16, 32).
Rows: the real clips (the ceiling), the video model, and two baselines made from the video model's own image layers
(its temporal layers removed, which is the --init model when only they trained): each frame drawn with the same
noise (a still clip), and each with its own noise. Writes benchmarks/out/video.json.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import default_out, write_json  # noqa: E402

from ldmkit.config import DataConfig  # noqa: E402
from ldmkit.data.moving_fashion import DIRECTIONS, MovingFashion  # noqa: E402
from ldmkit.denoisers.temporal import temporal_state  # noqa: E402
from ldmkit.denoisers.unet import UNet  # noqa: E402
from ldmkit.ldm import LatentDiffusion  # noqa: E402
from ldmkit.pipelines.request import SampleRequest  # noqa: E402
from ldmkit.pipelines.video import ClipRequest, decode_clips, video_latents  # noqa: E402


def to_grey(clip: torch.Tensor) -> np.ndarray:
    """Frames (F, C, H, W) in [-1, 1] -> (F, H, W) float32 in [0, 1]."""
    return ((clip.float().mean(1) + 1) / 2).clamp(0, 1).numpy().astype(np.float32)


def centroids(frames: np.ndarray) -> np.ndarray:
    """The brightness centroid (x, y) of each frame (F, H, W), over the pixels above a tenth of the clip's peak."""
    w = np.where(frames > 0.1 * max(float(frames.max()), 1e-6), frames, 0.0)
    ys, xs = np.mgrid[: frames.shape[1], : frames.shape[2]]
    mass = w.sum(axis=(1, 2)) + 1e-9
    return np.stack([(w * xs).sum(axis=(1, 2)) / mass, (w * ys).sum(axis=(1, 2)) / mass], axis=1)


def direction(frames: np.ndarray, least: float = 1.0) -> str | None:
    """The motion ("moving left", ...) whose direction the centroid's overall displacement follows most; None when
    it moved under `least` pixels."""
    track = centroids(frames)
    d = track[-1] - track[0]
    if np.hypot(*d) < least:
        return None
    return max(DIRECTIONS, key=lambda m: float(np.dot(d, DIRECTIONS[m])))


def warping_error(frames: np.ndarray) -> float:
    """Mean |previous frame - next frame warped back by Farneback's flow| over consecutive pairs, in [0, 1] units."""
    errs = []
    for a, b in zip(frames[:-1], frames[1:]):
        a8, b8 = (np.clip(f * 255, 0, 255).astype(np.uint8) for f in (a, b))
        flow = cv2.calcOpticalFlowFarneback(a8, b8, None, 0.5, 2, 9, 3, 5, 1.1, 0)
        h, w = a.shape
        grid = np.stack(np.meshgrid(np.arange(w), np.arange(h)), axis=-1).astype(np.float32)
        warped = cv2.remap(b, grid + flow, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        errs.append(float(np.abs(a - warped).mean()))
    return float(np.mean(errs)) if errs else 0.0


def frame_change(frames: np.ndarray) -> float:
    return float(np.abs(np.diff(frames, axis=0)).mean()) if len(frames) > 1 else 0.0


def image_layers(ldm: LatentDiffusion) -> LatentDiffusion:
    """The same model with its temporal layers removed: the image model frame by frame."""
    unet = ldm.unet
    cfg = replace(unet.cfg, temporal_heads=0)
    image = UNet(cfg).to(ldm.device).eval()
    image.load_state_dict({k: v for k, v in unet.state_dict().items() if k not in temporal_state(unet)})
    return LatentDiffusion(
        ldm.autoencoder, ldm.ae_config, image, replace(ldm.run, unet=cfg, task="video"), ldm.text_encoder
    )


def moving_clips(n: int, frames: int, resolution: int, channels: int) -> tuple[list[str], list[int], list[np.ndarray]]:
    """(captions, labels, real clips) of the first n test clips whose one item moves in a straight line."""
    ds = MovingFashion(DataConfig(dataset="moving-fashion", split="test", resolution=resolution, channels=channels,
                                  frames=frames, limit=max(50, 5 * n)))  # fmt: skip
    caps, labels, real = [], [], []
    for i in range(len(ds)):
        tracks = ds.spec(i)
        if len(tracks) == 1 and tracks[0].motion in DIRECTIONS:
            caps.append(tracks[0].words)
            labels.append(tracks[0].label)
            real.append(to_grey(ds.render(tracks)))
            if len(caps) == n:
                break
    return caps, labels, real


def generated(ldm, caps, labels, frames: int, steps: int, shared: bool = False) -> list[np.ndarray]:
    """One clip per caption (a text model) or label, clip i seeded i; shared: every frame from the first frame's
    noise (a deterministic sampler then draws the same frame F times)."""
    text = ldm.text_encoder is not None
    req = SampleRequest(n=len(caps), prompts=caps if text else None, labels=None if text else labels, steps=steps,
                        seed=0, batch_size=8, cfg=3.0)  # fmt: skip
    clip = ClipRequest(frames=1 if shared else frames)
    out = []
    for z, _ in video_latents(ldm, req, clip):
        if shared:
            z = z.expand(-1, frames, -1, -1, -1)
        out += [to_grey(c) for c in decode_clips(ldm, z)]
    return out


def scores(clips: list[np.ndarray], caps: list[str]) -> dict:
    motions = [" ".join(c.split()[-2:]) for c in caps]
    return {
        "motion_accuracy": float(np.mean([direction(c) == m for c, m in zip(clips, motions)])),
        "warping_error": float(np.mean([warping_error(c) for c in clips])),
        "frame_change": float(np.mean([frame_change(c) for c in clips])),
    }


def cost(ldm, caps, labels, frames: int, steps: int, clips: int = 2) -> dict:
    t = time.perf_counter()
    generated(ldm, caps[:clips], labels[:clips], frames, steps)
    return {
        "frames": frames,
        "seconds_per_clip": (time.perf_counter() - t) / clips,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a video model (ldmkit train --task video)")
    ap.add_argument("--n", type=int, default=200, help="clips per row")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scale", type=int, nargs="*", default=[8, 16, 32], help="frame counts to time")
    ap.add_argument("--out", default=default_out("video"))
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    ldm = LatentDiffusion.load(args.model)
    res, ch = ldm.run.data.resolution, ldm.ae_config.in_channels
    caps, labels, real = moving_clips(args.n, args.frames, res, ch)
    image = image_layers(ldm)
    rows = {
        "real clips": scores(real, caps),
        "video model": scores(generated(ldm, caps, labels, args.frames, args.steps), caps),
        "image model, same noise": scores(generated(image, caps, labels, args.frames, args.steps, shared=True), caps),
        "image model, own noise": scores(generated(image, caps, labels, args.frames, args.steps), caps),
    }
    limit = ldm.run.unet.max_frames
    timing = [cost(ldm, caps, labels, f, args.steps) for f in args.scale if f <= limit]
    print(f"{'':26} {'motion acc':>10} {'warp err':>9} {'change':>8}   ({len(caps)} clips x {args.frames} frames)")
    for name, r in rows.items():
        print(f"{name:26} {r['motion_accuracy']:10.1%} {r['warping_error']:9.4f} {r['frame_change']:8.4f}")
    for t in timing:
        print(f"{t['frames']:3d} frames: {t['seconds_per_clip']:.2f} s per clip, peak RSS {t['peak_rss_mib']:.0f} MiB")
    result = {"model": str(args.model), "clips": len(caps), "frames": args.frames, "steps": args.steps}
    result |= {"rows": rows, "timing": timing}
    write_json(args.out, result, quiet=True)
    return result


if __name__ == "__main__":
    main()
