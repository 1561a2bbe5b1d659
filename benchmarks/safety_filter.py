"""How often does the output safety filter stop a harmless image, and what does it cost per image?

    .venv/bin/python benchmarks/safety_filter.py --n 1000

Every shipped model draws only harmless pictures (emoji, clothes), so every image the filter flags is a false
positive. For each shipped model the script makes `n` images the way users make them: `emoji` and `fashion-mnist`
generate from noise (emoji: its training captions as prompts, fashion-mnist: its ten classes in turn),
`fashion-mnist-inpaint` inpaints a random box of Fashion-MNIST test images, `emoji-upscale` enlarges 16x16 emoji to
64x64. Each image is scored by open_nsfw (`ldmkit.governance.safety`, the `safety` extra), and the table reports
the share at or above the default threshold (0.8; target: under 1%), the highest and the 99th-percentile scores,
and the filter's CPU time per image (best of 3 over a batch of 64, after a warm-up). Writes
benchmarks/out/safety_filter.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import default_out, write_json  # noqa: E402

from ldmkit.data import build_dataset  # noqa: E402
from ldmkit.data.images import to_pil  # noqa: E402
from ldmkit.governance.safety import SafetyFilter, SafetySettings  # noqa: E402
from ldmkit.ldm import LatentDiffusion  # noqa: E402
from ldmkit.pipelines.generate import generate  # noqa: E402
from ldmkit.pipelines.inpaint import InpaintOptions, inpaint_batches  # noqa: E402
from ldmkit.pipelines.request import SampleRequest  # noqa: E402
from ldmkit.pipelines.upscale import UpscaleOptions, upscale_batches  # noqa: E402
from ldmkit.shipped import resolve_model  # noqa: E402

CHUNK = 50  # images per generation call
STEPS = 20


def training_images(ldm: LatentDiffusion, split: str, n: int, seed: int) -> tuple[torch.Tensor, list[str], list[int]]:
    """n images (with captions and labels) of the model's data set, drawn at random (seeded)."""
    ds = build_dataset(replace(ldm.run.data, split=split, limit=0, holdout=0, crop="center", flip=False))
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    items = [ds[i] for i in idx]
    caps = [(ds.captions[i] if getattr(ds, "captions", None) else "") or "" for i in idx]
    return torch.stack([it["image"] for it in items]), caps, [int(it.get("label", -1)) for it in items]


def from_noise(ldm: LatentDiffusion, n: int, seed: int):
    """Generations from noise: captions of the training set (text models) or every class in turn."""
    if ldm.text_encoder is not None:
        _, caps, _ = training_images(ldm, "train", n, seed)
        caps = [c or "emoji" for c in caps]
    for start in range(0, n, CHUNK):
        k = min(CHUNK, n - start)
        if ldm.text_encoder is not None:
            req = SampleRequest(n=k, prompts=caps[start : start + k], steps=STEPS, cfg=3.0, seed=seed + start)
        else:
            labels = [(start + i) % len(ldm.class_names) for i in range(k)]
            req = SampleRequest(n=k, labels=labels, steps=STEPS, cfg=3.0, seed=seed + start)
        yield generate(ldm, req)[0]


def inpainted(ldm: LatentDiffusion, n: int, seed: int):
    """Fashion-MNIST test images with a random box (a quarter to half of each side) regenerated."""
    images, _, classes = training_images(ldm, "test", n, seed)
    g = torch.Generator().manual_seed(seed)
    side = images.shape[-1]
    for start in range(0, n, CHUNK):
        x = images[start : start + CHUNK]
        masks = torch.zeros(len(x), 1, side, side)
        for m in masks:
            h, w = torch.randint(side // 4, side // 2 + 1, (2,), generator=g).tolist()
            top = int(torch.randint(0, side - h + 1, (1,), generator=g))
            left = int(torch.randint(0, side - w + 1, (1,), generator=g))
            m[:, top : top + h, left : left + w] = 1
        for i in range(len(x)):  # one call per image: each has its own mask
            labels = [classes[start + i]] if ldm.class_names and classes[start + i] >= 0 else None
            req = SampleRequest(n=1, labels=labels, steps=STEPS, cfg=3.0, seed=seed + start + i)
            out = [b for b, _ in inpaint_batches(ldm, req, x[i : i + 1], masks[i : i + 1], InpaintOptions(), False)]
            yield torch.cat(out)


def upscaled(ldm: LatentDiffusion, n: int, seed: int):
    """Emoji of the training set shrunk to the upscaler's input size and enlarged again."""
    images, caps, _ = training_images(ldm, "train", n, seed)
    small = torch.nn.functional.interpolate(images, scale_factor=1 / 4, mode="area")
    for i in range(n):
        prompts = [caps[i] or "emoji"] if ldm.text_encoder is not None else None
        req = SampleRequest(n=1, prompts=prompts, steps=STEPS, seed=seed + i)
        yield torch.cat([b for b, _ in upscale_batches(ldm, small[i : i + 1], req, UpscaleOptions(), False)])


MODELS = {
    "emoji": from_noise,
    "fashion-mnist": from_noise,
    "fashion-mnist-inpaint": inpainted,
    "emoji-upscale": upscaled,
}


def cost_ms(flt: SafetyFilter, images: list) -> float:
    """The filter's CPU milliseconds per image: best of 3 over a batch of 64, after a warm-up."""
    batch = (images * (64 // len(images) + 1))[:64]
    flt.scores(batch[:4])
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        flt.scores(batch)
        best = min(best, time.perf_counter() - t)
    return 1000 * best / len(batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="images per model (default 1000)")
    ap.add_argument("--models", nargs="*", default=list(MODELS), help="shipped models (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=default_out("safety_filter"))
    args = ap.parse_args()

    settings = SafetySettings()
    flt = SafetyFilter(settings)
    rows = []
    for name in args.models:
        ldm = LatentDiffusion.load(resolve_model(name), "cpu")
        scores, pictures = [], []
        t0 = time.perf_counter()
        with tqdm(total=args.n, desc=name) as bar:
            for batch in MODELS[name](ldm, args.n, args.seed):
                pils = to_pil(batch)
                pils = pils if isinstance(pils, list) else [pils]
                scores += flt.scores(pils)
                pictures = pictures or pils
                bar.update(len(pils))
        s = np.array(scores)
        rows.append(
            {
                "model": name,
                "images": len(s),
                "size": f"{pictures[0].width}x{pictures[0].height}",
                "flagged": int((s >= settings.threshold).sum()),
                "false_positive_rate": float((s >= settings.threshold).mean()),
                "max_score": float(s.max()),
                "p99_score": float(np.percentile(s, 99)),
                "median_score": float(np.median(s)),
                "filter_ms_per_image": cost_ms(flt, pictures),
                "wall_s": time.perf_counter() - t0,
            }
        )
    print("| model | images | size | flagged (>= 0.8) | false positives | max score | p99 score | filter ms/image |")
    print("| --- " * 8 + "|")
    for r in rows:
        print(
            f"| {r['model']} | {r['images']} | {r['size']} | {r['flagged']} | {100 * r['false_positive_rate']:.2f}% "
            f"| {r['max_score']:.3f} | {r['p99_score']:.3f} | {r['filter_ms_per_image']:.1f} |"
        )
    write_json(args.out, {"threshold": settings.threshold, "steps": STEPS, "rows": rows})


if __name__ == "__main__":
    main()
