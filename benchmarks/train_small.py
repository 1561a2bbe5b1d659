"""Train the demo-sized autoencoder and denoiser and report their speed and final losses.

    .venv/bin/python benchmarks/train_small.py [--device cpu|cuda] [--ae-steps 150] [--steps 700]

Prints a table and writes benchmarks/out/train_small.json. The configuration is the `make demo-train` one (presets
demo-autoencoder and demo-denoiser), so the figures say how long the demo takes on this machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import write_json  # noqa: E402

from ldmkit.config import AutoencoderRun, DenoiserRun, load_run  # noqa: E402
from ldmkit.training.runs import train_autoencoder, train_denoiser  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--ae-steps", type=int, default=None, help="default: the preset's")
    ap.add_argument("--steps", type=int, default=None, help="denoiser steps; default: the preset's")
    ap.add_argument("--out", default="benchmarks/out/train_small")
    args = ap.parse_args()
    out = Path(args.out)

    ae_over = [f"train.device={args.device}"] + ([f"train.steps={args.ae_steps}"] if args.ae_steps else [])
    ae_run = load_run(AutoencoderRun, "demo-autoencoder", ae_over)
    t0 = time.time()
    ae = train_autoencoder(ae_run, out / "autoencoder", progress=True, overwrite=True)
    t_ae = time.time() - t0

    dn_over = [f"autoencoder={ae['checkpoint']}", f"train.device={args.device}"]
    dn_over += [f"train.steps={args.steps}"] if args.steps else []
    dn_run = load_run(DenoiserRun, "demo-denoiser", dn_over)
    t0 = time.time()
    dn = train_denoiser(dn_run, out / "denoiser", progress=True, overwrite=True)
    t_dn = time.time() - t0

    ae_log = [json.loads(line) for line in (out / "autoencoder" / "log.jsonl").read_text().splitlines()]
    rows = [
        (
            "autoencoder",
            ae_run.train.steps,
            ae_run.train.batch_size,
            t_ae,
            ae_log[-1]["loss"],
            ae.get("holdout", {}).get("psnr"),
        ),
        ("denoiser", dn_run.train.steps, dn_run.train.batch_size, t_dn, dn["final_loss"], None),
    ]
    device = ae_run.train.device if ae_run.train.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"\ntrain_small on {device} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads), torch {torch.__version__}"
    )
    print(
        f"{'stage':<12}{'steps':>7}{'batch':>7}{'seconds':>10}{'steps/s':>9}{'img/s':>9}{'final loss':>12}{'PSNR':>8}"
    )
    result = {"date": str(date.today()), "device": device, "torch": torch.__version__, "stages": []}
    for name, steps, batch, secs, loss, psnr in rows:
        print(
            f"{name:<12}{steps:>7}{batch:>7}{secs:>10.1f}{steps / secs:>9.2f}{steps * batch / secs:>9.1f}"
            f"{loss:>12.4f}{psnr if psnr is None else round(psnr, 2)!s:>8}"
        )
        result["stages"].append(
            {
                "stage": name,
                "steps": steps,
                "batch_size": batch,
                "seconds": round(secs, 2),
                "steps_per_s": round(steps / secs, 3),
                "final_loss": loss,
                "holdout_psnr": psnr,
            }
        )
    result["holdout_ssim"] = ae.get("holdout", {}).get("ssim")
    write_json(out.parent / "train_small.json", result)


if __name__ == "__main__":
    main()
