"""How well do the editing pipelines work? Inpainting FID against baselines, and img2img's fidelity/edit trade-off.

    .venv/bin/python benchmarks/editing_quality.py
    .venv/bin/python benchmarks/editing_quality.py --n 500 --steps 25   # less noisy FID, about 5x longer

On `n` held-out images (the Fashion-MNIST test split) and the shipped class-conditional model
(weights/fashion-mnist.safetensors), every completion conditioned on the image's true label:

- Inpainting under two masks that each cover about 25% of the image (a centre box, and random brush strokes,
  seeded per image): FID of the completed images against the held-out originals themselves, and PSNR to the
  original inside the mask, for OpenCV's Telea inpainting (when `opencv-python-headless` is installed), the blend
  (`pipelines.inpaint`, --resample 1) and RePaint resampling (--resample R --jump J). Every method must leave the
  unmasked pixels identical to the input (compared as uint8); the script fails if one does not. A dedicated
  inpainting model is listed as not trained yet.
- img2img at strengths 0.2, 0.4, 0.6 and 0.8 towards a target class other than the image's own (drawn per image,
  seeded): PSNR to the input, and how often a small classifier (benchmarks/text2img_quality.py's, trained on real
  training images) reads the target class, and the source class.

FID from a few hundred images is noisy and biased upwards (it is a different number from a 10 000-image FID);
compare the rows of one run with each other, not with FIDs from elsewhere. Writes
benchmarks/out/editing_quality.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from text2img_quality import real_images, train_classifier  # noqa: E402

from ldmkit.data import build_dataset  # noqa: E402
from ldmkit.evaluation.fid import FeatureStats, InceptionFeatures  # noqa: E402
from ldmkit.ldm import LatentDiffusion  # noqa: E402
from ldmkit.noise import generators_from_seed  # noqa: E402
from ldmkit.pipelines.generate import SampleRequest  # noqa: E402
from ldmkit.pipelines.img2img import img2img  # noqa: E402
from ldmkit.pipelines.inpaint import InpaintOptions, inpaint, inpaint_latents, prepare_edit  # noqa: E402
from ldmkit.pipelines.masks import composite  # noqa: E402

STRENGTHS = (0.2, 0.4, 0.6, 0.8)
COVER = 0.25  # fraction of the image each mask covers


# ---- data and masks


def held_out(ldm: LatentDiffusion, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, C, H, W) in [-1, 1], labels (n,)): n images drawn (seeded) from the test split."""
    ds = build_dataset(replace(ldm.run.data, split="test", limit=0, holdout=0, crop="center", flip=False))
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    items = [ds[i] for i in idx]
    return torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])


def box_mask(h: int, w: int) -> torch.Tensor:
    """(1, 1, H, W): a centred box of half the height and half the width (25% of the pixels)."""
    m = torch.zeros(1, 1, h, w)
    m[..., h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2] = 1
    return m


def stroke_mask(h: int, w: int, g: torch.Generator, cover: float = COVER) -> torch.Tensor:
    """(1, 1, H, W): straight brush strokes (random start, angle and length; brush about 1/10 of the side wide)
    added until they cover `cover` of the pixels."""
    m = torch.zeros(h, w)
    r = max(1.0, min(h, w) / 20)  # brush radius
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    while float(m.mean()) < cover:
        y0, x0 = float(torch.rand((), generator=g)) * h, float(torch.rand((), generator=g)) * w
        angle = float(torch.rand((), generator=g)) * 2 * math.pi
        length = (0.25 + 0.5 * float(torch.rand((), generator=g))) * min(h, w)
        for t in torch.linspace(0, 1, int(length) + 1).tolist():
            y, x = y0 + t * length * math.sin(angle), x0 + t * length * math.cos(angle)
            m[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = 1
            if float(m.mean()) >= cover:
                break
    return m[None, None]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] -> uint8 numpy of the same shape, as a PNG would store them."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


# ---- the inpainting methods: each maps (images (N, C, H, W), masks (N, 1, H, W), labels (N,)) -> (N, C, H, W)


def telea(images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """OpenCV's fast-marching inpainting (Telea 2004), one image at a time on uint8 pixels."""
    import cv2

    out = []
    for x, m in zip(to_uint8(images), to_uint8(masks * 2 - 1)):
        hwc = np.ascontiguousarray(x.transpose(1, 2, 0))  # (H, W, C)
        filled = cv2.inpaint(hwc, (m[0] > 127).astype(np.uint8), radius, cv2.INPAINT_TELEA)
        out.append(torch.from_numpy(filled.reshape(hwc.shape).transpose(2, 0, 1).copy()))
    return torch.stack(out).float() / 127.5 - 1


def diffusion_inpaint(ldm: LatentDiffusion, args, opts: InpaintOptions):
    """`pipelines.inpaint` batched across images: each image keeps its own mask, label and seed (image i: seed + i),
    through the pipeline's own steps (prepare_edit, inpaint_latents, composite). `check_against_pipeline` checks
    that an image comes out as `inpaint()` gives it alone."""

    @torch.no_grad()
    def run(images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, len(images), args.batch_size):
            e = min(len(images), s + args.batch_size)
            eds = [prepare_edit(ldm, images[i : i + 1], masks[i : i + 1]) for i in range(s, e)]
            lab = labels[s:e].tolist()
            cond, uncond = ldm.conditioning(labels=lab, prompts=None, n=e - s), ldm.null_conditioning(e - s, None)
            if eds[0].concat is not None:  # a dedicated inpainting model: mask and masked-image latents
                concat = torch.cat([ed.concat for ed in eds])  # (b, 1 + c, h, w)
                cond, uncond = replace(cond, concat=concat), replace(uncond, concat=concat)
            z = inpaint_latents(
                ldm.denoiser,
                torch.cat([ed.x0 for ed in eds]),  # (b, c, h, w)
                torch.cat([ed.regenerate for ed in eds]),  # (b, 1, h, w)
                cond,
                uncond,
                sampler=args.sampler,
                steps=args.steps,
                cfg_scale=args.cfg,
                generator=generators_from_seed(args.seed + s, e - s),
                resample=opts.resample,
                jump=opts.jump,
            )
            done = composite(
                torch.cat([ed.image for ed in eds]), ldm.decode(z), torch.cat([ed.mask for ed in eds]), opts.feather
            )
            out.append(done[..., : images.shape[-2], : images.shape[-1]].cpu())
        return torch.cat(out)

    return run


def check_against_pipeline(ldm, args, opts, images, masks, labels, batched: torch.Tensor, i: int) -> float:
    """Max |difference| (uint8 levels) between image i of the batched run and `inpaint()` on that image alone."""
    req = SampleRequest(
        n=1, labels=[int(labels[i])], sampler=args.sampler, steps=args.steps, cfg=args.cfg, seed=args.seed + i
    )
    alone, _ = inpaint(ldm, req, images[i : i + 1], masks[i : i + 1], opts)
    a, b = to_uint8(alone).astype(int), to_uint8(batched[i : i + 1]).astype(int)
    return float(np.abs(a - b).max())


# ---- measures


def psnr(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor | None = None) -> float:
    """Mean over images of the PSNR (dB, peak 1 on [0, 1] pixels) between a and b, over the pixels `where` is 1."""
    d2 = ((a.float() - b.float()) / 2) ** 2  # (N, C, H, W) on the [0, 1] scale
    w = torch.ones_like(d2) if where is None else where.expand_as(d2).float()
    mse = (d2 * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp(min=1)
    return float((10 * torch.log10(1 / mse.clamp(min=1e-10))).mean())


def unmasked_identical(inputs: torch.Tensor, outputs: torch.Tensor, masks: torch.Tensor) -> bool:
    """Whether every pixel outside the masks is the same uint8 value in outputs as in inputs."""
    keep = (masks < 0.5).expand_as(inputs).numpy()
    return bool((to_uint8(inputs)[keep] == to_uint8(outputs)[keep]).all())


def run_inpainting(ldm, args, images, labels, feats, ref: FeatureStats) -> list[dict]:
    """One row per (mask, method): FID to the originals, PSNR inside the mask, unmasked pixels identical."""
    n, _, h, w = images.shape
    g = torch.Generator().manual_seed(args.seed + 1)
    mask_sets = {
        "centre box": box_mask(h, w).expand(n, -1, -1, -1).clone(),
        "random strokes": torch.cat([stroke_mask(h, w, g) for _ in range(n)]),
    }
    blend = InpaintOptions(resample=1)
    repaint = InpaintOptions(resample=args.resample, jump=args.jump)
    methods = {"blend (--resample 1)": (diffusion_inpaint(ldm, args, blend), blend)}
    methods[f"RePaint (--resample {args.resample} --jump {args.jump})"] = (
        diffusion_inpaint(ldm, args, repaint),
        repaint,
    )
    try:
        import cv2  # noqa: F401

        methods = {"OpenCV Telea (radius 3)": (telea, None), **methods}
    except ImportError:
        methods = {"OpenCV Telea": (None, None), **methods}
    rows = []
    for mask_name, masks in mask_sets.items():
        cover = float(masks.mean())
        for name, (fn, opts) in methods.items():
            row = {"mask": mask_name, "method": name, "mask cover": round(cover, 3)}
            if fn is None:
                rows.append({**row, "status": "opencv-python-headless is not installed"})
                continue
            t = time.time()
            out = fn(images, masks, labels)
            row["seconds"] = round(time.time() - t, 1)
            row["fid"] = FeatureStats.from_features(feats(out)).fid(ref)
            row["psnr in mask"] = psnr(out, images, masks)
            row["unmasked identical"] = unmasked_identical(images, out, masks)
            if opts is not None:
                row["max diff to inpaint() alone"] = check_against_pipeline(
                    ldm, args, opts, images, masks, labels, out, 0
                )
            assert row["unmasked identical"], f"{name} changed pixels outside the {mask_name} mask"
            print(f"  {mask_name}, {name}: FID {row['fid']:.2f} ({row['seconds']} s)", flush=True)
            rows.append(row)
        rows.append({"mask": mask_name, "method": "inpainting model (concat)", "status": "not trained yet"})
    return rows


def run_img2img(ldm, args, images, labels) -> list[dict]:
    """One row per strength: PSNR to the input, target-class and source-class accuracy of the classifier."""
    x, y, names = real_images(ldm, len(ldm.class_names), args.real_per, args.seed)
    t = time.time()
    clf = train_classifier(x, y, len(names), args.classifier_steps, args.seed)
    print(f"  classifier trained on {len(x)} real images ({time.time() - t:.1f} s)", flush=True)
    g = torch.Generator().manual_seed(args.seed + 2)
    k = len(ldm.class_names)
    targets = (labels + torch.randint(1, k, labels.shape, generator=g)) % k  # never the image's own class
    with torch.no_grad():
        rows = [{"strength": 0.0, "real-image accuracy": float((clf(images).argmax(1) == labels).float().mean())}]
        for s in STRENGTHS:
            req = SampleRequest(
                n=1,
                labels=targets.tolist(),
                sampler=args.sampler,
                steps=args.steps,
                cfg=args.cfg,
                seed=args.seed,
                batch_size=args.batch_size,
            )
            t = time.time()
            out, _ = img2img(ldm, images, req, s)
            pred = clf(out).argmax(1)
            rows.append(
                {
                    "strength": s,
                    "psnr to input": psnr(out, images),
                    "target-class accuracy": float((pred == targets).float().mean()),
                    "source-class accuracy": float((pred == labels).float().mean()),
                    "seconds": round(time.time() - t, 1),
                }
            )
            print(f"  img2img at strength {s}: {rows[-1]['seconds']} s", flush=True)
    return rows


# ---- report


def print_tables(inpaint_rows: list[dict], img2img_rows: list[dict], n: int) -> None:
    print(f"\nInpainting, {n} held-out images (FID against the originals; small n: noisy, compare rows only)")
    print(f"{'mask':<15} {'method':<34} {'cover':>5} {'FID':>8} {'PSNR in mask':>12} {'unmasked identical':>18}")
    for r in inpaint_rows:
        head = f"{r['mask']:<15} {r['method']:<34}"
        if "status" in r:
            print(f"{head} {r['status']}")
        else:
            same = "yes" if r["unmasked identical"] else "NO"
            print(f"{head} {r['mask cover']:>5.2f} {r['fid']:>8.2f} {r['psnr in mask']:>9.2f} dB {same:>18}")
    print(f"\nimg2img towards another class, {n} held-out images")
    print(f"{'strength':>8} {'PSNR to input':>14} {'target-class acc':>16} {'source-class acc':>16}")
    real = img2img_rows[0]["real-image accuracy"]
    print(f"{'input':>8} {'':>14} {'':>16} {real:>16.3f}")
    for r in img2img_rows[1:]:
        print(
            f"{r['strength']:>8.1f} {r['psnr to input']:>11.2f} dB {r['target-class accuracy']:>16.3f} "
            f"{r['source-class accuracy']:>16.3f}"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "weights" / "fashion-mnist.safetensors"))
    ap.add_argument("--n", type=int, default=100, help="held-out images (at least 2, for FID)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--resample", type=int, default=4, help="RePaint passes")
    ap.add_argument("--jump", type=int, default=5, help="RePaint jump length (below --steps)")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--real-per", type=int, default=200, help="real training images per class for the classifier")
    ap.add_argument("--classifier-steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "editing_quality.json"))
    args = ap.parse_args(argv)
    if args.n < 2:
        ap.error("--n must be at least 2: FID needs a covariance")

    t0 = time.time()
    torch.manual_seed(args.seed)
    ldm = LatentDiffusion.load(args.checkpoint)
    if ldm.text_encoder is not None or not ldm.class_names:
        ap.error(f"{args.checkpoint} is not a class-conditional model; give one such as weights/fashion-mnist")
    images, labels = held_out(ldm, args.n, args.seed)
    inception = InceptionFeatures(device="cpu")
    ref = FeatureStats.from_features(inception(images))
    inpaint_rows = run_inpainting(ldm, args, images, labels, inception, ref)
    img2img_rows = run_img2img(ldm, args, images, labels)
    print_tables(inpaint_rows, img2img_rows, args.n)
    result = {
        "checkpoint": args.checkpoint,
        "n": args.n,
        "sampler": args.sampler,
        "steps": args.steps,
        "cfg": args.cfg,
        "seed": args.seed,
        "note": f"FID from {args.n} images is noisy and biased upwards; compare rows of one run only",
        "inpainting": inpaint_rows,
        "img2img": img2img_rows,
        "seconds": round(time.time() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwritten {args.out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
