"""Which backbone and which parameterisation? U-Net against DiT-S at matched parameter count, and eps / v / EDM /
flow for the U-Net, on the shipped fashion-mnist autoencoder's latents (issue 12, "Measured").

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/backbones.py            # issue 12's setting (see below)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/backbones.py --quick    # every stage at toy size, a few minutes

Every row trains a class-conditional denoiser on the 60,000 Fashion-MNIST training images, encoded once by the
autoencoder of weights/fashion-mnist.safetensors (3x8x8 latents), with the same data order, seed, batch, AdamW
settings and EMA as recipes/fashion-mnist/denoiser.toml (the shipped model's recipe), only fewer steps:
  - U-Net eps, U-Net v (the recipe's parameterisation, the baseline), U-Net EDM, U-Net flow: the recipe's U-Net
    (5.4 M parameters), --steps steps each, so every row has seen the same images;
  - DiT-S: the DiT-S/2 layout (12 blocks, patch 2) narrowed to --dit-width 160 with 4 heads, so that its parameter
    count is within 10% of the U-Net's (both printed), with the baseline's parameterisation, --steps steps;
  - DiT-S at the U-Net's wall time: the DiT's seconds per step are measured on its equal-images run, and it is
    trained again for as many steps as fit into the seconds the U-Net baseline took.
Each row's FID is computed by `ldmkit evaluate`'s code (ldmkit.evaluation.evaluate: --n generated images, every
class in turn, DPM-Solver++ 2M with guidance --cfg, against the same number of Fashion-MNIST test images) at 25 and at
10 sampling steps. Training seconds are the loop's own (log.jsonl), without loading and encoding.

The defaults are issue 12's setting: --steps 600 at batch 128 (76,800 images seen, 1.3 epochs) and FID at 2,000
samples with guidance 3. That is a machine's day of work on the 2-core CPU of benchmarks/RESULTS.md when it is
shared (one U-Net step at batch 128 took 12 s there, the FID network 1.8 s an image): run it on a free machine or a
GPU. The setting measured in RESULTS.md fits an hour of one shared core instead:
    --steps 60 --batch-size 32 --data-limit 5000 --n 50 --cfg 1
(1,920 images seen per row out of the first 5,000 training images, FID at 50 samples without guidance).

On a CUDA device the script also measures images/s of training the U-Net baseline on one device and, with several
devices, the scaling efficiency of data-parallel training under torchrun (batch 128 per device: images/s on k
devices / (k x images/s on one)); without CUDA those rows read "needs a GPU".

--eps-study examines why eps-prediction lagged (issue 27): the U-Net trained as eps on the cosine schedule, as eps on
scaled_linear, as v on cosine and as eps on cosine without min-SNR weighting (one change each), then the eps + cosine
models sampled from the schedule's last sigma (20291, as before the fix) or from the last at or below 200, 80 and
14.7 (the default since: EpsDenoiser.start_sigma_max). Each row has its FID and the RMS of the model's first x0
estimate D(sigma_max z, sigma_max) over --n draws z, unconditional (an ideal model gives the data's mean there).
Writes benchmarks/out/backbones-eps.json:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/backbones.py --eps-study --steps 60 --batch-size 32 \
        --data-limit 5000 --n 50 --cfg 1 --sampling-steps 25

Every stage is kept under --work and reused by a rerun: a training run resumes from its last checkpoint, a finished
one is not trained again, and each FID is cached in fid.json. Writes benchmarks/out/backbones.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import write_json  # noqa: E402

from ldmkit.config import DenoiserRun, load_run  # noqa: E402
from ldmkit.diffusion.parameterisation import DiscreteDenoiser, EpsDenoiser  # noqa: E402
from ldmkit.evaluation.evaluate import evaluate  # noqa: E402
from ldmkit.ldm import LatentDiffusion  # noqa: E402
from ldmkit.training.loop import STATE_FILE  # noqa: E402
from ldmkit.training.runs import train_denoiser  # noqa: E402

RECIPE = ROOT / "recipes" / "fashion-mnist" / "denoiser.toml"
AUTOENCODER = ROOT / "weights" / "fashion-mnist.safetensors"
BASELINE = "v"  # the recipe's parameterisation: the DiT rows use it too


def dit_settings(args) -> list[str]:
    return [
        "denoiser.kind=dit",
        "dit.preset=S/2",
        f"dit.hidden_size={args.dit_width}",
        f"dit.num_heads={args.dit_heads}",
        f"dit.depth={args.dit_depth}",
    ]


def row_settings(args) -> list[tuple[str, str, str, list[str]]]:
    """(row key, backbone, parameterisation, overrides) of the equal-images rows."""
    rows = [(f"unet-{p}", "U-Net", p, [f"diffusion.parameterisation={p}"]) for p in ("eps", "v", "edm", "flow")]
    rows.append(("dit-s", "DiT-S", BASELINE, [f"diffusion.parameterisation={BASELINE}", *dit_settings(args)]))
    return rows


def common_settings(args, steps: int, device: str = "cpu", batch: int | None = None) -> list[str]:
    over = [
        f"autoencoder={args.autoencoder}",
        f"train.steps={steps}",
        f"train.batch_size={batch or args.batch_size}",
        f"train.device={device}",
        f"train.log_every={args.log_every}",
        f"train.ckpt_every={args.ckpt_every}",
        f"train.warmup_steps={min(100, max(1, steps // 10))}",
    ]
    return over + ([f"data.limit={args.data_limit}"] if args.data_limit else [])


def train_row(name: str, over: list[str], work: Path) -> dict:
    """Train one row in work/name, resumed or kept when there; its parameters, steps, images seen and seconds."""
    out = work / name
    run = load_run(DenoiserRun, str(RECIPE), over)
    if not (out / "metrics.json").is_file():  # written when a run finishes
        resume = (out / STATE_FILE).is_file()
        print(f"training {name} ({run.train.steps} steps{', resumed' if resume else ''})", flush=True)
        train_denoiser(run, out, resume=resume, overwrite=not resume, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "parameters": metrics["parameters"],
        "steps": metrics["step"],
        "images_seen": metrics["step"] * run.train.batch_size,
        "seconds": training_seconds(out / "log.jsonl", run.train.batch_size),
        "final_loss": metrics["final_loss"],
        "checkpoint": metrics["checkpoint"],
    }


def training_seconds(log: Path, batch: int) -> float:
    """Seconds of the training loop alone, from its log: each record's steps since the one before, at its images/s
    (checkpoint writes inside a logging window count; loading data and building the model do not)."""
    seconds, prev = 0.0, 0
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        seconds += (rec["step"] - prev) * batch / rec["images_per_s"]
        prev = rec["step"]
    return seconds


def fid_of(name: str, checkpoint: str, steps: int, args, cache: dict, cache_path: Path) -> float:
    """FID of a row's model at `steps` sampling steps, from `ldmkit evaluate`'s code; cached in fid.json."""
    key = f"{name}/{Path(checkpoint).stat().st_mtime_ns}/{args.sampler}/{steps}/{args.cfg}/{args.n}"
    if key not in cache:
        t = time.perf_counter()
        r = evaluate(
            checkpoint,
            split="test",
            n=args.n,
            sampler=args.sampler,
            steps=steps,
            cfg=args.cfg,
            seed=0,
            device="cpu",
            batch_size=args.eval_batch,
            progress=False,
        )
        cache[key] = {"fid": r["fid"], "seconds": time.perf_counter() - t}
        cache_path.write_text(json.dumps(cache, indent=1))
        print(f"  {name}, {steps} steps: FID {r['fid']:.2f} ({cache[key]['seconds']:.0f} s)", flush=True)
    return cache[key]["fid"]


# (row, training run, its settings, sampling start bound): the first four change one training setting against eps +
# cosine (parameterisation, schedule, loss weighting); the rest change only where its sampling starts
EPS_COSINE = ["diffusion.parameterisation=eps", "diffusion.schedule=cosine"]
EPS_LINEAR = ["diffusion.parameterisation=eps", "diffusion.schedule=scaled_linear"]
V_COSINE = ["diffusion.parameterisation=v", "diffusion.schedule=cosine"]
EPS_COSINE_UNWEIGHTED = [*EPS_COSINE, "diffusion.min_snr_gamma=0"]
EPS_STUDY = [
    ("eps + cosine, start 20291", "unet-eps-cosine", EPS_COSINE, math.inf),
    ("eps + scaled_linear", "unet-eps-scaled_linear", EPS_LINEAR, math.inf),
    ("v + cosine", "unet-v-cosine", V_COSINE, math.inf),
    ("eps + cosine, min_snr_gamma 0, start 20291", "unet-eps-cosine-gamma0", EPS_COSINE_UNWEIGHTED, math.inf),
    ("eps + cosine, start <= 200", "unet-eps-cosine", EPS_COSINE, 200.0),
    ("eps + cosine, start <= 80", "unet-eps-cosine", EPS_COSINE, 80.0),
    ("eps + cosine, start <= 14.7 (the default)", "unet-eps-cosine", EPS_COSINE, 14.7),
    ("eps + cosine, min_snr_gamma 0, start <= 14.7", "unet-eps-cosine-gamma0", EPS_COSINE_UNWEIGHTED, 14.7),
]


@torch.no_grad()
def first_estimate_rms(checkpoint: str, n: int) -> float:
    """RMS of the first x0 estimate a sampler forms, D(sigma_max z, sigma_max) for n draws z, unconditional."""
    ldm = LatentDiffusion.load(checkpoint, "cpu")
    den = ldm.denoiser
    size = ldm.run.data.resolution // ldm.factor
    z = torch.randn(n, ldm.latent_channels, size, size, generator=torch.Generator().manual_seed(0))
    return float(den(z * den.sigma_max, den.sigma_max, ldm.null_conditioning(n)).pow(2).mean().sqrt())


def eps_study(args, work: Path) -> int:
    """Train the three rows of EPS_STUDY, then each row's FID and first-estimate RMS under its start bound."""
    cache_path = work / "fid.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    rows, steps = [], args.sampling_steps[0]
    for label, name, over, bound in EPS_STUDY:
        row = train_row(name, common_settings(args, args.steps) + over, work)
        saved = EpsDenoiser.start_sigma_max
        EpsDenoiser.start_sigma_max = DiscreteDenoiser.start_sigma_max = bound  # v's grid is bounded alike
        try:
            key = f"{name}@{bound}"
            rms = first_estimate_rms(row["checkpoint"], args.n)
            start = LatentDiffusion.load(row["checkpoint"], "cpu").denoiser.sigma_max
            fid = fid_of(key, row["checkpoint"], steps, args, cache, cache_path)
        finally:
            EpsDenoiser.start_sigma_max, DiscreteDenoiser.start_sigma_max = saved, math.inf
        rows.append({"row": label, "start_sigma": start, "first_x0_rms": rms, "fid": fid, "loss": row["final_loss"]})
        print(f"{label}: start sigma {start:.1f}, first x0 RMS {rms:.3g}, FID {fid:.2f}", flush=True)
    print(f"\n| row | sampling starts at sigma | RMS of the first x0 estimate | final loss | FID {steps} steps |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        cells = f"{r['start_sigma']:.1f} | {r['first_x0_rms']:.3g} | {r['loss']:.4f} | {r['fid']:.2f}"
        print(f"| {r['row']} | {cells} |")
    write_json(args.out.removesuffix(".json") + "-eps.json", {"settings": vars(args), "rows": rows})
    return 0


def gpu_rows(args, work: Path) -> list[dict]:
    """Images/s of training the U-Net baseline on one CUDA device, and under torchrun on every device (batch per
    device fixed): the scaling efficiency. Without CUDA: rows that say so."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return [
            {"measure": "training images/s, 1 device", "value": None, "note": "no CUDA device on this machine"},
            {"measure": "scaling efficiency, all devices", "value": None, "note": "no CUDA device on this machine"},
        ]
    cache_path = work / "gpu.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    counts = [1] + ([count] if count > 1 else [])
    for k in counts:
        key = f"{k}/{args.gpu_steps}/{args.batch_size}"
        if key in cache:
            continue
        out = work / f"gpu-{k}"
        over = common_settings(args, args.gpu_steps, "cuda", args.batch_size * k)
        over += [f"diffusion.parameterisation={BASELINE}", "train.ckpt_every=0"]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={k}"]
        cmd = (launcher if k > 1 else [sys.executable]) + ["-m", "ldmkit", "train", "--config", str(RECIPE)]
        cmd += ["--out", str(out), "--overwrite", "--quiet"] + [a for o in over for a in ("--set", o)]
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        cache[key] = statistics.median(r["images_per_s"] for r in recs[1:] or recs)  # the first window warms up
        cache_path.write_text(json.dumps(cache, indent=1))
    one = cache[f"1/{args.gpu_steps}/{args.batch_size}"]
    rows = [{"measure": "training images/s, 1 device", "value": one, "note": torch.cuda.get_device_name(0)}]
    if count > 1:
        many = cache[f"{count}/{args.gpu_steps}/{args.batch_size}"]
        rows.append({"measure": f"training images/s, {count} devices", "value": many, "note": "torchrun, DDP"})
        rows.append({"measure": f"scaling efficiency, {count} devices", "value": many / (count * one), "note": ""})
    else:
        rows.append({"measure": "scaling efficiency", "value": None, "note": "one device: needs several GPUs"})
    return rows


def print_table(rows: list[dict], steps: tuple[int, ...], gpu: list[dict]) -> None:
    fids = " | ".join(f"FID {s} steps" for s in steps)
    print(f"\n| row | backbone | parameterisation | parameters | steps | images seen | training s | s/step | {fids} |")
    print("| --- " * (8 + len(steps)) + "|")
    for r in rows:
        f = " | ".join(f"{r['fid'][str(s)]:.2f}" for s in steps)
        print(
            f"| {r['row']} | {r['backbone']} | {r['parameterisation']} | {r['parameters']:,} | {r['steps']:,} | "
            f"{r['images_seen']:,} | {r['seconds']:.0f} | {r['seconds'] / r['steps']:.3f} | {f} |"
        )
    print("\n| GPU measure | value | note |\n| --- | --- | --- |")
    for g in gpu:
        v = "needs a GPU" if g["value"] is None else f"{g['value']:.3g}"
        print(f"| {g['measure']} | {v} | {g['note']} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600, help="training steps of every equal-images row")
    ap.add_argument("--batch-size", type=int, default=128, help="training batch of every row")
    ap.add_argument("--n", type=int, default=2000, help="generated (and test) images per FID")
    ap.add_argument("--sampling-steps", type=int, nargs="+", default=[25, 10])
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale of the FID samples")
    ap.add_argument("--dit-width", type=int, default=160, help="DiT-S hidden size (384 in the paper's DiT-S)")
    ap.add_argument("--dit-heads", type=int, default=4)
    ap.add_argument("--dit-depth", type=int, default=12)
    ap.add_argument("--autoencoder", default=str(AUTOENCODER), help="a shipped model's file: its autoencoder")
    ap.add_argument("--data-limit", type=int, default=0, help="train on the first N images only (0: all)")
    ap.add_argument("--eval-batch", type=int, default=100, help="images per sampling / Inception batch")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--gpu-steps", type=int, default=60, help="training steps of each GPU measurement")
    ap.add_argument("--work", default="benchmarks/out/backbones", help="where every stage is kept")
    ap.add_argument("--quick", action="store_true", help="every stage at toy size")
    ap.add_argument("--eps-study", action="store_true", help="why eps lags: schedule and sampling start (issue 27)")
    ap.add_argument("--out", default="benchmarks/out/backbones.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.n, args.sampling_steps = 4, 8, 4, [2]
        args.data_limit, args.eval_batch, args.log_every, args.ckpt_every, args.gpu_steps = 256, 20, 2, 2, 4
        args.work = args.work.rstrip("/") + "-quick"
        args.out = args.out.removesuffix(".json") + "-quick.json"
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.eps_study and args.work == "benchmarks/out/backbones":
        args.work = "benchmarks/out/backbones-eps"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.eps_study:
        return eps_study(args, work)
    t0 = time.perf_counter()
    steps = tuple(args.sampling_steps)

    # train: the equal-images rows, then the DiT again for the U-Net baseline's seconds
    rows = []
    for name, backbone, param, over in row_settings(args):
        rows.append({"row": name, "backbone": backbone, "parameterisation": param, "budget": "equal images"})
        rows[-1] |= train_row(name, common_settings(args, args.steps) + over, work)
    by = {r["row"]: r for r in rows}
    base, dit = by[f"unet-{BASELINE}"], by["dit-s"]
    ratio = dit["parameters"] / base["parameters"]
    print(f"parameters: U-Net {base['parameters']:,}, DiT-S {dit['parameters']:,} ({ratio:.3f} x the U-Net's)")
    dit_steps = max(1, round(base["seconds"] / (dit["seconds"] / dit["steps"])))
    over = [f"diffusion.parameterisation={BASELINE}", *dit_settings(args)]
    rows.append({"row": "dit-s-time", "backbone": "DiT-S", "parameterisation": BASELINE, "budget": "equal time"})
    same = dit_steps == dit["steps"]  # then the equal-images run is also the equal-time one
    trained = {k: v for k, v in dit.items() if k not in rows[-1]}  # its run's figures, not its row name
    rows[-1] |= trained if same else train_row("dit-s-time", common_settings(args, dit_steps) + over, work)

    # evaluate: FID of every row at every step count, the first step count for every row before the next (a run
    # stopped early still compares every row; a rerun continues from fid.json)
    cache_path = work / "fid.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    for s in steps:
        for r in rows:
            r.setdefault("fid", {})[str(s)] = fid_of(r["row"], r["checkpoint"], s, args, cache, cache_path)

    gpu = gpu_rows(args, work)
    print_table(rows, steps, gpu)
    print(
        f"\nDiT-S / U-Net parameters: {ratio:.3f} (target within 10%: {'met' if abs(ratio - 1) <= 0.1 else 'missed'})"
    )
    result = {
        "settings": vars(args),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
        "rows": rows,
        "dit_unet_parameter_ratio": ratio,
        "gpu": gpu,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
