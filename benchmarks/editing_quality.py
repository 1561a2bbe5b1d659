"""How well do the editing pipelines work? Inpainting and 4x super-resolution against baselines, img2img's trade-off.

    .venv/bin/python benchmarks/editing_quality.py
    .venv/bin/python benchmarks/editing_quality.py --n 500 --steps 25   # less noisy FID, about 5x longer

On `n` held-out images (the Fashion-MNIST test split) and the shipped class-conditional model
(weights/fashion-mnist.safetensors), every completion conditioned on the image's true label:

- Inpainting under two masks that each cover about 25% of the image (a centre box, and random brush strokes,
  seeded per image): FID of the completed images against the held-out originals themselves, and PSNR to the
  original inside the mask, for OpenCV's Telea inpainting (when `opencv-python-headless` is installed), the blend
  (`pipelines.inpaint`, --resample 1) and RePaint resampling (--resample R --jump J). Every method must leave the
  unmasked pixels identical to the input (compared as uint8); the script fails if one does not. A dedicated
  inpainting model (--inpaint-checkpoint, task "inpaint": mask and masked-image latents concatenated to its input)
  runs through the same batched pipeline with --resample 1, its label the image's; it is listed as not trained yet
  when the file is missing. Targets per mask: the inpainting model's FID at most half of Telea's (None when either
  row is missing), and RePaint's FID no higher than the blend's.
- img2img at strengths 0.2, 0.4, 0.6 and 0.8 towards a target class other than the image's own (drawn per image,
  seeded): PSNR to the input, and how often a small classifier (benchmarks/text2img_quality.py's, trained on real
  training images) reads the target class, and the source class.
- Super-resolution (--upscale-checkpoint, an upscaler of task "upscale"; skipped as not trained yet when the file is
  missing): the last --sr-n emoji images (at the upscaler's resolution; the last 200 were held out from the
  upscaler's and its autoencoder's training) are downscaled by its factor with `diffusion.lowres.downscale`, the
  degradation it was trained on, stored as uint8, and brought back to full size by PIL bicubic, PIL Lanczos and
  `pipelines.upscale` (--sr-steps, no guidance, image i seeded seed + i). Every output is quantised to uint8
  before PSNR and SSIM to the originals (mean over images) and FID against the originals. A last row, the
  autoencoder's round trip of the full-size originals, is the ceiling: an upscaler samples that autoencoder's
  latents, so it cannot do better. Targets: the upscaler's FID at most half of bicubic's, and its PSNR at most 2 dB
  below bicubic's.

FID from a few hundred images is noisy and biased upwards (it is a different number from a 10 000-image FID);
compare the rows of one run with each other, not with FIDs from elsewhere. Writes
benchmarks/out/editing_quality.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import default_out, write_json  # noqa: E402
from text2img_quality import real_images, train_classifier  # noqa: E402

from ldmkit.config import DataConfig  # noqa: E402
from ldmkit.data import build_dataset, stack_images  # noqa: E402
from ldmkit.diffusion.lowres import downscale  # noqa: E402
from ldmkit.diffusion.sample import Known, sample_latents  # noqa: E402
from ldmkit.evaluation import metrics  # noqa: E402
from ldmkit.evaluation.fid import FeatureStats, InceptionFeatures  # noqa: E402
from ldmkit.ldm import LatentDiffusion  # noqa: E402
from ldmkit.noise import generators_from_seed  # noqa: E402
from ldmkit.pipelines.img2img import img2img  # noqa: E402
from ldmkit.pipelines.inpaint import InpaintOptions, inpaint, prepare_edit  # noqa: E402
from ldmkit.pipelines.masks import composite  # noqa: E402
from ldmkit.pipelines.request import SampleRequest  # noqa: E402
from ldmkit.pipelines.upscale import UpscaleOptions, upscale  # noqa: E402

STRENGTHS = (0.2, 0.4, 0.6, 0.8)
COVER = 0.25  # fraction of the image each mask covers
SECTIONS = ("inpainting", "img2img", "super-resolution")
SR_HELD_OUT = 200  # the last emoji images, held out from the upscaler's and its autoencoder's training
MODEL_ROW = "inpainting model (concat)"


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
    through the pipeline's own steps (prepare_edit, sample_latents with kept latents, composite).
    `check_against_pipeline` checks that an image comes out as `inpaint()` gives it alone."""

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
            x0 = torch.cat([ed.x0 for ed in eds])  # (b, c, h, w)
            regenerate = torch.cat([ed.regenerate for ed in eds])  # (b, 1, h, w)
            z = sample_latents(
                ldm.denoiser,
                tuple(x0.shape),
                cond,
                uncond,
                sampler=args.sampler,
                steps=args.steps,
                cfg_scale=args.cfg,
                generator=generators_from_seed(args.seed + s, e - s),
                known=Known(x0, regenerate, opts.resample, opts.jump),
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


def run_inpainting(
    ldm, args, images, labels, feats, ref: FeatureStats, model: LatentDiffusion | None
) -> tuple[list[dict], dict[str, dict]]:
    """(one row per (mask, method): FID to the originals, PSNR inside the mask, unmasked pixels identical; the
    targets per mask). `model`: the dedicated inpainting model, or None (its rows then say it is not trained)."""
    n, _, h, w = images.shape
    g = torch.Generator().manual_seed(args.seed + 1)
    mask_sets = {
        "centre box": box_mask(h, w).expand(n, -1, -1, -1).clone(),
        "random strokes": torch.cat([stroke_mask(h, w, g) for _ in range(n)]),
    }
    blend = InpaintOptions(resample=1)
    repaint = InpaintOptions(resample=args.resample, jump=args.jump)
    blend_name, repaint_name = "blend (--resample 1)", f"RePaint (--resample {args.resample} --jump {args.jump})"
    # name -> (method, its InpaintOptions and model for the check against inpaint(), or None for a baseline)
    methods = {
        blend_name: (diffusion_inpaint(ldm, args, blend), (blend, ldm)),
        repaint_name: (diffusion_inpaint(ldm, args, repaint), (repaint, ldm)),
    }
    if model is not None:
        methods[MODEL_ROW] = (diffusion_inpaint(model, args, blend), (blend, model))
    try:
        import cv2  # noqa: F401

        telea_name = "OpenCV Telea (radius 3)"
        methods = {telea_name: (telea, None), **methods}
    except ImportError:
        telea_name = "OpenCV Telea"
        methods = {telea_name: (None, None), **methods}
    rows, targets = [], {}
    for mask_name, masks in mask_sets.items():
        cover = float(masks.mean())
        for name, (fn, check) in methods.items():
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
            if check is not None:
                opts, owner = check
                row["max diff to inpaint() alone"] = check_against_pipeline(
                    owner, args, opts, images, masks, labels, out, 0
                )
            assert row["unmasked identical"], f"{name} changed pixels outside the {mask_name} mask"
            print(f"  {mask_name}, {name}: FID {row['fid']:.2f} ({row['seconds']} s)", flush=True)
            rows.append(row)
        if model is None:
            rows.append({"mask": mask_name, "method": MODEL_ROW, "status": "not trained yet"})
        fid = {r["method"]: r["fid"] for r in rows if r["mask"] == mask_name and "fid" in r}
        targets[mask_name] = {
            "model_fid_le_half_telea": (
                fid[MODEL_ROW] <= fid[telea_name] / 2 if MODEL_ROW in fid and telea_name in fid else None
            ),
            "repaint_le_blend": fid[repaint_name] <= fid[blend_name],
        }
    return rows, targets


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


def pil_resize(low: torch.Tensor, size: tuple[int, int], method) -> torch.Tensor:
    """Images (N, C, h, w) in [-1, 1] resized to size (H, W) by PIL `method` on their uint8 pixels."""
    out = []
    for x in to_uint8(low):  # (C, h, w)
        pic = Image.fromarray(x[0] if x.shape[0] == 1 else np.ascontiguousarray(x.transpose(1, 2, 0)))
        big = np.asarray(pic.resize((size[1], size[0]), method)).reshape(size[0], size[1], -1)
        out.append(torch.from_numpy(big.transpose(2, 0, 1).copy()))
    return torch.stack(out).float() / 127.5 - 1


def run_super_resolution(up: LatentDiffusion | None, args, feats) -> dict:
    """{"factor", "rows": one per method (PSNR, SSIM, FID to the originals), "targets": upscaler against bicubic}."""
    name = "ldmkit upscaler"
    if up is None:
        targets = {"fid_le_half_bicubic": None, "psnr_within_2db_of_bicubic": None}
        return {"factor": None, "rows": [{"method": name, "status": "not trained yet"}], "targets": targets}
    factor, res = up.run.upscale.factor, up.run.data.resolution
    ds = build_dataset(DataConfig(dataset="emoji", resolution=res, channels=3))
    originals = stack_images(ds, range(len(ds) - args.sr_n, len(ds)))  # (N, 3, R, R): held out
    originals = torch.from_numpy(to_uint8(originals)).float() / 127.5 - 1
    low = torch.from_numpy(to_uint8(downscale(originals, factor))).float() / 127.5 - 1  # stored as uint8
    ref = FeatureStats.from_features(feats(originals))
    size = tuple(originals.shape[-2:])

    def ldmkit_upscale(low: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(len(low)):
            req = SampleRequest(n=1, steps=args.sr_steps, sampler=args.sampler, seed=args.seed + i, cfg=1.0)
            out.append(upscale(up, low[i : i + 1], req, UpscaleOptions())[0])
        return torch.cat(out)

    methods = {
        "PIL bicubic": lambda x: pil_resize(x, size, Image.BICUBIC),
        "PIL Lanczos": lambda x: pil_resize(x, size, Image.LANCZOS),
        name: ldmkit_upscale,
        # not an upscaler: the autoencoder's own round trip of the originals, the best the upscaler can reach
        "autoencoder round trip (ceiling)": lambda _: torch.cat([up.decode(up.encode(x[None])) for x in originals]),
    }
    rows = []
    for method, fn in methods.items():
        t = time.time()
        out = fn(low)
        seconds = round(time.time() - t, 1)
        out = torch.from_numpy(to_uint8(out)).float() / 127.5 - 1  # every method's output quantised alike
        rows.append(
            {
                "method": method,
                "psnr": float(metrics.psnr(out, originals, data_range=2.0).mean()),
                "ssim": float(metrics.ssim(out, originals, data_range=2.0).mean()),
                "fid": FeatureStats.from_features(feats(out)).fid(ref),
                "seconds": seconds,
            }
        )
        print(f"  super-resolution, {method}: FID {rows[-1]['fid']:.2f} ({seconds} s)", flush=True)
    by = {r["method"]: r for r in rows}
    targets = {
        "fid_le_half_bicubic": by[name]["fid"] <= by["PIL bicubic"]["fid"] / 2,
        "psnr_within_2db_of_bicubic": by[name]["psnr"] >= by["PIL bicubic"]["psnr"] - 2,
    }
    return {"factor": factor, "rows": rows, "targets": targets}


# ---- report


def yes_no(v: bool | None) -> str:
    return "n/a" if v is None else "yes" if v else "NO"


def print_tables(
    inpaint_rows: list[dict], inpaint_targets: dict, img2img_rows: list[dict], sr: dict, n: int, sr_n: int
) -> None:
    """The tables of the sections that ran (a section that did not run has no rows)."""
    if inpaint_rows:
        print(f"\nInpainting, {n} held-out images (FID against the originals; small n: noisy, compare rows only)")
        print(f"{'mask':<15} {'method':<34} {'cover':>5} {'FID':>8} {'PSNR in mask':>12} {'unmasked identical':>18}")
        for r in inpaint_rows:
            head = f"{r['mask']:<15} {r['method']:<34}"
            if "status" in r:
                print(f"{head} {r['status']}")
            else:
                same = "yes" if r["unmasked identical"] else "NO"
                print(f"{head} {r['mask cover']:>5.2f} {r['fid']:>8.2f} {r['psnr in mask']:>9.2f} dB {same:>18}")
        for mask, t in inpaint_targets.items():
            print(
                f"targets, {mask}: inpainting model FID <= Telea's / 2: {yes_no(t['model_fid_le_half_telea'])}; "
                f"RePaint FID <= blend's: {yes_no(t['repaint_le_blend'])}"
            )
    if img2img_rows:
        print(f"\nimg2img towards another class, {n} held-out images")
        print(f"{'strength':>8} {'PSNR to input':>14} {'target-class acc':>16} {'source-class acc':>16}")
        real = img2img_rows[0]["real-image accuracy"]
        print(f"{'input':>8} {'':>14} {'':>16} {real:>16.3f}")
        for r in img2img_rows[1:]:
            print(
                f"{r['strength']:>8.1f} {r['psnr to input']:>11.2f} dB {r['target-class accuracy']:>16.3f} "
                f"{r['source-class accuracy']:>16.3f}"
            )
    if sr["rows"]:
        times = f" {sr['factor']}x" if sr.get("factor") else ""
        print(f"\nSuper-resolution{times}, {sr_n} held-out emoji (outputs as uint8; FID against the originals)")
        print(f"{'method':<34} {'PSNR':>9} {'SSIM':>7} {'FID':>8}")
        for r in sr["rows"]:
            if "status" in r:
                print(f"{r['method']:<34} {r['status']}")
            else:
                print(f"{r['method']:<34} {r['psnr']:>6.2f} dB {r['ssim']:>7.4f} {r['fid']:>8.2f}")
        t = sr["targets"]
        print(
            f"targets: upscaler FID <= bicubic's / 2: {yes_no(t['fid_le_half_bicubic'])}; "
            f"PSNR >= bicubic's - 2 dB: {yes_no(t['psnr_within_2db_of_bicubic'])}"
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
    ap.add_argument(
        "--inpaint-checkpoint",
        default=str(ROOT / "weights" / "fashion-mnist-inpaint.safetensors"),
        help="dedicated inpainting model for the data of --checkpoint (rows say not trained yet when missing)",
    )
    ap.add_argument(
        "--upscale-checkpoint",
        default=str(ROOT / "weights" / "emoji-upscale.safetensors"),
        help="emoji upscaler (super-resolution section; not trained yet when missing)",
    )
    ap.add_argument("--sr-n", type=int, default=100, help=f"held-out emoji images, 2 to {SR_HELD_OUT}")
    ap.add_argument("--sr-steps", type=int, default=20, help="upscaler sampling steps")
    ap.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)}); recipes/build.py runs one",
    )
    ap.add_argument("--out", default=default_out("editing_quality"))
    args = ap.parse_args(argv)
    sections = [x for x in args.sections.split(",") if x]
    if not sections or any(x not in SECTIONS for x in sections):
        ap.error(f"--sections {args.sections!r}: choose from {','.join(SECTIONS)}")
    if args.n < 2:
        ap.error("--n must be at least 2: FID needs a covariance")
    if not 2 <= args.sr_n <= SR_HELD_OUT:
        ap.error(f"--sr-n must be 2 to {SR_HELD_OUT}: FID needs 2, and only the last {SR_HELD_OUT} are held out")

    t0 = time.time()
    torch.manual_seed(args.seed)
    ldm = LatentDiffusion.load(args.checkpoint)
    if ldm.text_encoder is not None or not ldm.class_names:
        ap.error(f"{args.checkpoint} is not a class-conditional model; give one such as weights/fashion-mnist")
    model = None
    if Path(args.inpaint_checkpoint).is_file():
        model = LatentDiffusion.load(args.inpaint_checkpoint)
        d, dm = ldm.run.data, model.run.data
        if model.task != "inpaint" or (dm.channels, dm.resolution) != (d.channels, d.resolution):
            ap.error(f"{args.inpaint_checkpoint} is not an inpainting model for {d.channels}-channel {d.resolution}px")
        if list(model.class_names) != list(ldm.class_names):
            ap.error(f"{args.inpaint_checkpoint} does not have the classes of {args.checkpoint}")
    up = None
    if Path(args.upscale_checkpoint).is_file():
        up = LatentDiffusion.load(args.upscale_checkpoint)
        if up.task != "upscale" or up.run.data.channels != 3 or up.run.data.dataset != "emoji":
            ap.error(f"{args.upscale_checkpoint} is not an upscaler for RGB emoji")
    images, labels = held_out(ldm, args.n, args.seed)
    inception = InceptionFeatures(device="cpu")
    ref = FeatureStats.from_features(inception(images))
    inpaint_rows, inpaint_targets, img2img_rows, sr = [], {}, [], {"rows": [], "targets": {}}
    if "inpainting" in sections:
        inpaint_rows, inpaint_targets = run_inpainting(ldm, args, images, labels, inception, ref, model)
    if "img2img" in sections:
        img2img_rows = run_img2img(ldm, args, images, labels)
    if "super-resolution" in sections:
        sr = run_super_resolution(up, args, inception)
    print_tables(inpaint_rows, inpaint_targets, img2img_rows, sr, args.n, args.sr_n)
    result = {
        "checkpoint": args.checkpoint,
        "n": args.n,
        "sampler": args.sampler,
        "steps": args.steps,
        "cfg": args.cfg,
        "seed": args.seed,
        "note": f"FID from {args.n} images is noisy and biased upwards; compare rows of one run only",
        "inpaint_checkpoint": args.inpaint_checkpoint if model is not None else None,
        "upscale_checkpoint": args.upscale_checkpoint if up is not None else None,
        "sr_n": args.sr_n,
        "sr_steps": args.sr_steps,
        "inpainting": inpaint_rows,
        "inpainting_targets": inpaint_targets,
        "img2img": img2img_rows,
        "super_resolution": sr,
        "seconds": round(time.time() - t0, 1),
    }
    print()
    write_json(args.out, result, note=f" ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
