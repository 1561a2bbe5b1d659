"""Does a ControlNet steer its base model? Condition fidelity against the same labels without control, img2img from
the condition image, and the ControlNet at two scales.

    .venv/bin/python benchmarks/control.py --condition mask      # trains a ControlNet first, then measures
    .venv/bin/python benchmarks/control.py --condition canny --controlnet runs/control-canny/controlnet.safetensors
    .venv/bin/python benchmarks/control.py --n 4 --steps 2 --train-steps 2 --no-fid   # a smoke run, seconds
    .venv/bin/python benchmarks/control.py --controlnet fashion-mnist-mask             # the shipped one

On `n` held-out images (the Fashion-MNIST test split) and the shipped class-conditional model
(weights/fashion-mnist.safetensors), each image's condition is made by the detector of --condition
(data/conditions.py). Without --controlnet, one is trained first with `ldmkit train --task control --init MODEL
--condition C --data fashion-mnist --steps S` into --run (kept and reused: a finished run is not trained again).
Every row draws one image per held-out image, labelled with its true label, image i seeded seed + i:

- no control: the base model alone;
- img2img from the condition image (as a picture) at strengths 0.6 and 0.8;
- the ControlNet at scales 0.5 and 1.0.

The detector is run on each generated image and compared with the input condition: edges by the F1 of edge pixels
within 2 px (a pixel counts when the other map has an edge within that distance), masks by IoU, colour layouts by
the mean absolute error of the cells' colours (0..1). With --fid, also the FID of each row against the held-out
images, and for every row its seconds per image and their ratio to the uncontrolled row's. Targets (the issue's):
edge F1 >= 0.6 and >= 3x the uncontrolled F1; mask IoU >= 0.8; the ControlNet's FID <= 1.1x the uncontrolled
model's; cost <= 1.5x uncontrolled sampling. Writes benchmarks/out/control.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import default_out, write_json  # noqa: E402

from ldmkit.config import ControlConfig  # noqa: E402
from ldmkit.data import build_dataset  # noqa: E402
from ldmkit.data.conditions import DETECTORS, detect  # noqa: E402
from ldmkit.denoisers.controlnet import Control, check_fits, load_controlnet  # noqa: E402
from ldmkit.ldm import LatentDiffusion  # noqa: E402
from ldmkit.pipelines.control import condition_settings, controlled  # noqa: E402
from ldmkit.pipelines.generate import generate  # noqa: E402
from ldmkit.pipelines.images import to_channels  # noqa: E402
from ldmkit.pipelines.img2img import img2img  # noqa: E402
from ldmkit.pipelines.request import SampleRequest  # noqa: E402
from ldmkit.shipped import CONTROLNETS, controlnet_file  # noqa: E402

STRENGTHS = (0.6, 0.8)
SCALES = (0.5, 1.0)
TOLERANCE_PX = 2  # an edge pixel counts when the other map has one within this distance


# ---- data


def held_out(ldm: LatentDiffusion, n: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """(images (n, C, H, W) in [-1, 1], labels): n images drawn (seeded) from the test split."""
    ds = build_dataset(replace(ldm.run.data, split="test", limit=0, holdout=0, crop="center", flip=False))
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    items = [ds[i] for i in idx]
    return torch.stack([it["image"] for it in items]), [int(it["label"]) for it in items]


# ---- fidelity of a generated image's condition to the input condition


def edge_f1(pred: torch.Tensor, true: torch.Tensor, tol: int = TOLERANCE_PX) -> float:
    """Mean over images of the F1 of edge maps (N, 3, H, W) in {0, 1}, each pixel matched within `tol` px."""
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tol + 1, 2 * tol + 1))
    scores = []
    for p, t in zip(pred[:, 0].numpy() > 0.5, true[:, 0].numpy() > 0.5):
        if not p.any() and not t.any():
            scores.append(1.0)
            continue
        near_t = cv2.dilate(t.astype(np.uint8), disk) > 0
        near_p = cv2.dilate(p.astype(np.uint8), disk) > 0
        precision = (p & near_t).sum() / max(p.sum(), 1)
        recall = (t & near_p).sum() / max(t.sum(), 1)
        scores.append(0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall)))
    return float(np.mean(scores))


def mask_iou(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Mean over images of the IoU of masks (N, 3, H, W) in {0, 1} (two empty masks: 1)."""
    p, t = pred[:, 0] > 0.5, true[:, 0] > 0.5
    inter, union = (p & t).flatten(1).sum(1).float(), (p | t).flatten(1).sum(1).float()
    return float(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).mean())


def colour_error(pred: torch.Tensor, true: torch.Tensor, cells: int) -> float:
    """Mean absolute error (0..1) of the cells' colours of colour layouts (N, 3, H, W)."""
    size = (min(cells, pred.shape[-2]), min(cells, pred.shape[-1]))
    return float((F.adaptive_avg_pool2d(pred, size) - F.adaptive_avg_pool2d(true, size)).abs().mean())


def fidelity(kind: str, images: torch.Tensor, conditions: torch.Tensor, cfg: ControlConfig) -> dict:
    """The detector `kind` on generated images (N, C, H, W) in [-1, 1], compared with the input conditions."""
    got = detect(kind, images, cfg)
    if kind == "canny":
        return {"edge_f1": edge_f1(got, conditions)}
    if kind == "mask":
        return {"mask_iou": mask_iou(got, conditions)}
    return {"colour_error": colour_error(got, conditions, cfg.colour_cells)}


# ---- the rows: each draws one image per condition, in chunks of --batch images


def chunks(n: int, size: int):
    for s in range(0, n, size):
        yield s, min(n, s + size)


def draw(ldm, args, labels: list[int], conditions: torch.Tensor, how) -> tuple[torch.Tensor, float]:
    """(images (N, C, H, W), seconds per image) of how(req, s, e) over chunks, req drawing images s..e."""
    out, t0 = [], time.perf_counter()
    for s, e in chunks(len(labels), args.batch):
        req = SampleRequest(n=e - s, labels=labels[s:e], steps=args.steps, seed=args.seed + s, cfg=args.cfg)
        out.append(how(replace(req, batch_size=e - s), s, e))
    return torch.cat(out), (time.perf_counter() - t0) / len(labels)


def run_rows(ldm, net, args, images, labels, conditions, kind, cfg, inception) -> list[dict]:
    plain = lambda req, s, e: generate(ldm, req)[0]  # noqa: E731
    rows = [("no control", plain)]
    init = to_channels(conditions * 2 - 1, ldm.ae_config.in_channels)  # the condition as a picture, in [-1, 1]
    for st in STRENGTHS:
        rows.append((f"img2img {st}", lambda req, s, e, st=st: img2img(ldm, init[s:e], replace(req, n=1), st)[0]))
    for scale in SCALES:

        def steered(req, s, e, scale=scale):
            with controlled(ldm, [Control(net, conditions[s:e], scale)], req.steps):
                return generate(ldm, req)[0]

        rows.append((f"ControlNet {scale}", steered))
    ref = inception_stats(inception, images) if inception else None
    out = []
    for name, how in rows:
        got, seconds = draw(ldm, args, labels, conditions, how)
        row = {"row": name, **fidelity(kind, got, conditions, cfg), "seconds_per_image": round(seconds, 4)}
        if inception:
            row["fid"] = inception_stats(inception, got).fid(ref)
        out.append(row)
        print(f"  {name}: {row}", flush=True)
    base = out[0]["seconds_per_image"]
    for row in out:
        row["cost_ratio"] = round(row["seconds_per_image"] / base, 3) if base > 0 else None
    return out


def inception_stats(inception, images):
    from ldmkit.evaluation.fid import FeatureStats

    return FeatureStats.from_features(inception(images))


# ---- targets and the table


def targets(kind: str, rows: list[dict]) -> dict:
    by = {r["row"]: r for r in rows}
    plain, full = by["no control"], by["ControlNet 1.0"]
    t = {"cost <= 1.5x": full["cost_ratio"] is not None and full["cost_ratio"] <= 1.5}
    if kind == "canny":
        t["edge F1 >= 0.6"] = full["edge_f1"] >= 0.6
        t["edge F1 >= 3x uncontrolled"] = full["edge_f1"] >= 3 * plain["edge_f1"]
    if kind == "mask":
        t["mask IoU >= 0.8"] = full["mask_iou"] >= 0.8
    if "fid" in full:
        t["FID <= 1.1x uncontrolled"] = full["fid"] <= 1.1 * plain["fid"]
    return t


def print_table(kind: str, rows: list[dict], met: dict, n: int) -> None:
    metric = {"canny": "edge_f1", "mask": "mask_iou", "colour": "colour_error"}[kind]
    print(f"\n{kind} condition, {n} held-out images")
    print(f"| row | {metric} | FID | s/image | cost vs uncontrolled |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        fid = f"{r['fid']:.1f}" if "fid" in r else "-"
        print(f"| {r['row']} | {r[metric]:.3f} | {fid} | {r['seconds_per_image']:.3f} | {r['cost_ratio']}x |")
    for name, ok in met.items():
        print(f"target {name}: {'met' if ok else 'missed'}")


# ---- main


def trained_controlnet(args, kind: str) -> Path:
    """The ControlNet of --controlnet, or the one trained into --run (trained now when the run has none, resumed when
    an earlier run was stopped)."""
    if args.controlnet:
        shipped = args.controlnet in CONTROLNETS and not Path(args.controlnet).exists()
        return controlnet_file(args.controlnet) if shipped else Path(args.controlnet)
    path = Path(args.run) / "controlnet.safetensors"
    if path.is_file():
        print(f"using the trained {path}")
        return path
    from ldmkit.cli import main as cli

    argv = ["train", "--task", "control", "--init", args.checkpoint, "--condition", kind, "--data", "fashion-mnist"]
    argv += ["--steps", str(args.train_steps), "--batch-size", str(args.train_batch), "--out", args.run]
    argv += ["--set", "train.sample_every=0", "--quiet"]
    if args.control_rank:
        argv += ["--control-rank", str(args.control_rank)]
    if (Path(args.run) / "train-state.safetensors").is_file():
        print(f"resuming the interrupted training in {args.run}")
        argv.append("--resume")
    if cli(argv) != 0:
        raise SystemExit(f"training the ControlNet failed: ldmkit {' '.join(argv)}")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "weights" / "fashion-mnist.safetensors"))
    ap.add_argument("--condition", choices=DETECTORS, default="mask")
    ap.add_argument("--controlnet", help="a trained ControlNet for --checkpoint (default: train one into --run)")
    ap.add_argument("--run", default=str(ROOT / "benchmarks" / "out" / "control-run"))
    ap.add_argument("--train-steps", type=int, default=2000)
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--control-rank", type=int, default=0, help="train a low-rank ControlNet of this rank (0: full)")
    ap.add_argument("--n", type=int, default=200, help="held-out images (default 200)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=50, help="images per sampling batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-fid", action="store_true", help="skip FID (loads the Inception network)")
    ap.add_argument("--out", default=default_out("control"))
    args = ap.parse_args(argv)
    if args.n < 2 and not args.no_fid:
        ap.error("--n must be at least 2 for FID (or pass --no-fid)")

    t0 = time.time()
    torch.manual_seed(args.seed)
    ldm = LatentDiffusion.load(args.checkpoint)
    if not ldm.class_names:
        ap.error(f"{args.checkpoint} is not a class-conditional model; give one such as weights/fashion-mnist")
    path = trained_controlnet(args, args.condition)
    net, meta = load_controlnet(path, ldm.device, ldm.unet)  # a low-rank one is rebuilt on the model's U-Net
    check_fits(net, ldm.unet, ldm.factor, path)
    kind, cfg = condition_settings(meta, args.condition)
    if kind != args.condition:
        ap.error(f"{path} was trained on {meta.get('condition')!r} conditions, not {args.condition!r}")
    images, labels = held_out(ldm, args.n, args.seed)
    conditions = detect(kind, images, cfg)  # (n, 3, H, W) in [0, 1]
    inception = None
    if not args.no_fid:
        from ldmkit.evaluation.fid import InceptionFeatures

        inception = InceptionFeatures(device="cpu")
    rows = run_rows(ldm, net, args, images, labels, conditions, kind, cfg, inception)
    met = targets(kind, rows)
    print_table(kind, rows, met, args.n)
    result = {
        "checkpoint": args.checkpoint,
        "controlnet": str(path),
        "controlnet_step": meta.get("step"),
        "condition": kind,
        "n": args.n,
        "steps": args.steps,
        "cfg": args.cfg,
        "seed": args.seed,
        "rows": rows,
        "targets": met,
        "seconds": round(time.time() - t0, 1),
    }
    print()
    write_json(args.out, result, note=f" ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
