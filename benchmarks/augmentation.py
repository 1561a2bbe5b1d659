"""Do synthetic images help a classifier? Fashion-MNIST test accuracy of one fixed small CNN trained on real,
synthetic and mixed training sets.

    .venv/bin/python benchmarks/augmentation.py                 # the full setting (hours on two CPU cores)
    .venv/bin/python benchmarks/augmentation.py --quick         # a smoke run of every stage, minutes

Every row trains the same classifier (`ldmkit.synth.classifier`: architecture, AdamW, one-cycle schedule, batch
128) for the same number of epochs, with 3 seeds, and reports the mean and standard deviation of its accuracy on
the real test split (10,000 images):
  1. the real training set (60,000 images);
  2. synthetic images only, as many as the real set, from the shipped fashion-mnist model (`ldmkit synth`): the
     Classification Accuracy Score of Ravuri & Vinyals (2019);
  3. 10% of the real set (600 per class, drawn once with a fixed seed);
  4. the same 10% plus synthetic images from a model (autoencoder and denoiser) trained on that 10% only;
  5. the same 10% with classic augmentation (random crops of 2 px and mirror flips);
  6. 4 and 5 together;
  3b. a control: the 10% for as many optimiser steps as row 4 takes (same epochs means more steps for a larger
      set, so this row separates the effect of the synthetic images from that of training longer).
Targets: (2) reaches at least 85% of (1); (4) beats (3) by at least 2 points.

Every stage is kept under --work and reused by a rerun (the 10% folder, the small model's runs, the synthetic
folders, which `ldmkit synth` resumes, and each row's accuracies), so an interrupted benchmark continues where it
stopped. Writes benchmarks/out/augmentation.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import write_json  # noqa: E402

from ldmkit.data.fashion_mnist import CLASS_NAMES, load_arrays  # noqa: E402
from ldmkit.synth.classifier import BATCH, train_classifier  # noqa: E402
from ldmkit.training.loop import STATE_FILE  # noqa: E402


def to_tensor(a: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> (N, 1, 32, 32) in [-1, 1], padded with black as ldmkit's Fashion-MNIST is."""
    a = np.pad(a, ((0, 0), (2, 2), (2, 2)))
    return torch.from_numpy(a).float().div(127.5).sub(1)[:, None]


def subset(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of per_class images of every class, drawn once with `seed`."""
    g = np.random.default_rng(seed)
    return np.sort(np.concatenate([g.choice(np.flatnonzero(y == c), per_class, replace=False) for c in range(10)]))


def write_folder(root: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """The images as a class-subfolder image folder (the small model's training data), written once."""
    done = root / ".complete"
    if done.is_file():
        return root
    for i, (a, c) in enumerate(zip(x, y, strict=True)):
        d = root / f"{c}-{CLASS_NAMES[c].lower().replace('/', '-')}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.pad(a, 2), "L").save(d / f"{i:05d}.png")
    done.touch()
    return root


def ldmkit(*args: str) -> None:
    cmd = [sys.executable, "-m", "ldmkit", *args]
    print("$ ldmkit " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def train_small_model(data: Path, work: Path, args) -> Path:
    """An autoencoder and a denoiser trained on `data` alone, with the shipped recipe's settings (fewer steps)."""
    ae, dn = work / "small-autoencoder", work / "small-denoiser"
    recipe = ROOT / "recipes" / "fashion-mnist"
    if not (ae / "metrics.json").is_file():  # written when a run finishes
        resume = ["--resume"] if (ae / STATE_FILE).is_file() else []
        ldmkit(
            "train-autoencoder",
            "--config",
            str(recipe / "autoencoder.toml"),
            "--data",
            str(data),
            "--out",
            str(ae),
            "--steps",
            str(args.ae_steps),
            "--batch-size",
            "32",
            "--set",
            f"loss.disc_start={args.ae_steps * 2 // 3}",
            "--set",
            f"data.holdout={min(200, args.fraction_per_class * 2)}",
            "--set",
            f"loss.perceptual_weight={args.ae_perceptual_weight}",
            "--quiet",
            *resume,
        )
    if not (dn / "metrics.json").is_file():
        resume = ["--resume"] if (dn / STATE_FILE).is_file() else []
        ldmkit(
            "train",
            "--config",
            str(recipe / "denoiser.toml"),
            "--autoencoder",
            str(ae / "autoencoder.safetensors"),
            "--data",
            str(data),
            "--out",
            str(dn),
            "--steps",
            str(args.dn_steps),
            "--batch-size",
            "64",
            "--quiet",
            *resume,
        )
    return dn / "model.safetensors"


def synth(model: str, out: Path, per_class: int, args) -> tuple[torch.Tensor, torch.Tensor]:
    """`ldmkit synth` into `out` (resumed when there), then its images and labels as tensors."""
    ldmkit(
        "synth",
        model,
        "--per-class",
        str(per_class),
        "--out",
        str(out),
        "--steps",
        str(args.steps),
        "--cfg",
        str(args.cfg),
        "--batch-size",
        "250",
        "--quiet",
    )
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["index"] < per_class]  # a folder once extended further keeps its extra images
    rows.sort(key=lambda r: (r["class"], r["index"]))
    x = torch.stack([torch.from_numpy(np.array(Image.open(out / r["file_name"]).convert("L"))) for r in rows])
    return x.float().div(127.5).sub(1)[:, None], torch.tensor([r["class"] for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="fashion-mnist", help="the shipped model of row 2")
    ap.add_argument("--epochs", type=int, default=4, help="classifier epochs, every row")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--fraction-per-class", type=int, default=600, help="real images per class of rows 3-6 (10%%)")
    ap.add_argument("--synth-per-class", type=int, default=6000, help="row 2's synthetic images per class")
    ap.add_argument("--small-synth-per-class", type=int, default=1200, help="rows 4 and 6: synthetic images per class")
    ap.add_argument("--steps", type=int, default=10, help="sampling steps of `ldmkit synth` (DPM-Solver++ 2M)")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--ae-steps", type=int, default=800, help="the small model's autoencoder steps (batch 32)")
    ap.add_argument(
        "--ae-perceptual-weight",
        type=float,
        default=0.2,
        help="the small autoencoder's perceptual loss (0: off, faster)",
    )
    ap.add_argument("--dn-steps", type=int, default=2000, help="the small model's denoiser steps (batch 64)")
    ap.add_argument("--real-limit", type=int, default=0, help="row 1: only the first N real training images (0: all)")
    ap.add_argument(
        "--full-reference", action="store_true", help="with --real-limit: also train on the whole real set (row 1f)"
    )
    ap.add_argument("--test-limit", type=int, default=0, help="use only this many test images (0: all)")
    ap.add_argument("--work", default="benchmarks/out/augmentation", help="where every stage is kept")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny sets, few steps, 1 seed")
    ap.add_argument("--out", default="benchmarks/out/augmentation.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds, args.fraction_per_class = 1, 1, 20
        args.synth_per_class, args.small_synth_per_class, args.steps = 30, 20, 2
        args.ae_steps, args.dn_steps, args.real_limit, args.test_limit = 4, 4, 600, 500
        args.work = args.work.rstrip("/") + "-quick"
        args.out = args.out.removesuffix(".json") + "-quick.json"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    xa, ya = load_arrays("train")
    xt, yt = load_arrays("test")
    if args.test_limit:
        xt, yt = xt[: args.test_limit], yt[: args.test_limit]
    test_x, test_y = to_tensor(xt), torch.from_numpy(yt.astype(np.int64))
    idx = subset(ya, args.fraction_per_class, seed=0)  # always from the whole training set
    few_x, few_y = to_tensor(xa[idx]), torch.from_numpy(ya[idx].astype(np.int64))
    n_real = args.real_limit or len(xa)  # row 1 (and with it the size row 2 aims at) may be cut for time
    real_x, real_y = to_tensor(xa[:n_real]), torch.from_numpy(ya[:n_real].astype(np.int64))
    folder = write_folder(work / "real-fraction", xa[idx], ya[idx])

    small = train_small_model(folder, work, args)
    small_x, small_y = synth(str(small), work / "synth-small", args.small_synth_per_class, args)
    syn_x, syn_y = synth(args.model, work / "synth-full", args.synth_per_class, args)
    mixed_x, mixed_y = torch.cat([few_x, small_x]), torch.cat([few_y, small_y])
    control_epochs = args.epochs * math.ceil(len(mixed_x) / BATCH) / math.ceil(len(few_x) / BATCH)

    rows = [
        ("1", f"real training set ({n_real:,} images)", real_x, real_y, False, args.epochs),
        ("2", f"synthetic only ({args.model}), as many as real", syn_x, syn_y, False, args.epochs),
        ("3", "10% real", few_x, few_y, False, args.epochs),
        ("4", "10% real + synthetic from a model of that 10%", mixed_x, mixed_y, False, args.epochs),
        ("5", "10% real + classic augmentation", few_x, few_y, True, args.epochs),
        ("6", "10% real + synthetic + classic augmentation", mixed_x, mixed_y, True, args.epochs),
        ("3b", "10% real, as many steps as row 4 (control)", few_x, few_y, False, round(control_epochs)),
    ]
    if args.full_reference and n_real < len(xa):  # row 1 cut by --real-limit: the whole set too, for reference
        all_x, all_y = to_tensor(xa), torch.from_numpy(ya.astype(np.int64))
        rows.insert(1, ("1f", f"the whole real training set ({len(xa):,} images)", all_x, all_y, False, args.epochs))
    cache_path = work / "accuracies.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    table = []
    for key, what, x, y, augmented, epochs in rows:
        accs = []
        for seed in range(args.seeds):
            name = f"{key}/{len(x)}/{epochs}/{int(augmented)}/{seed}/{len(test_x)}"
            if name not in cache:
                t = time.perf_counter()
                clf = train_classifier(x, y, CLASS_NAMES, epochs=epochs, seed=seed, augmented=augmented)
                cache[name] = {"accuracy": clf.accuracy(test_x, test_y), "seconds": time.perf_counter() - t}
                cache_path.write_text(json.dumps(cache, indent=1))
                print(f"row {key} seed {seed}: {cache[name]['accuracy']:.4f}", flush=True)
            accs.append(cache[name]["accuracy"])
        steps = epochs * math.ceil(len(x) / BATCH)
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        table.append(
            {
                "row": key,
                "training set": what,
                "images": len(x),
                "epochs": epochs,
                "steps": steps,
                "accuracy": statistics.mean(accs),
                "std": sd,
                "accuracies": accs,
            }
        )
    by = {r["row"]: r for r in table}
    cas_ratio = by["2"]["accuracy"] / by["1"]["accuracy"]
    gain = 100 * (by["4"]["accuracy"] - by["3"]["accuracy"])
    print()
    print("| row | training set | images | epochs | steps | test accuracy (mean ± sd, %d seeds) |" % args.seeds)
    print("| --- | --- | --- | --- | --- | --- |")
    for r in table:
        print(
            f"| {r['row']} | {r['training set']} | {r['images']:,} | {r['epochs']} | {r['steps']:,} | "
            f"{100 * r['accuracy']:.2f} ± {100 * r['std']:.2f} |"
        )
    print()
    print(f"(2) / (1) = {cas_ratio:.3f} (target at least 0.85): {'met' if cas_ratio >= 0.85 else 'missed'}")
    if "1f" in by:
        print(f"(2) / (1f) = {by['2']['accuracy'] / by['1f']['accuracy']:.3f} (against the whole real set)")
    print(f"(4) - (3) = {gain:+.2f} points (target at least +2): {'met' if gain >= 2 else 'missed'}")
    result = {
        "settings": vars(args),
        "rows": table,
        "cas_ratio": cas_ratio,
        "gain_4_over_3_points": gain,
        "seconds": time.perf_counter() - t0,
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
