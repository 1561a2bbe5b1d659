"""Sample quality at equal compute: ldmkit's recipe against diffusers' standard recipe, FID on Fashion-MNIST.

    .venv/bin/python benchmarks/quality_vs_diffusers.py                        # the full comparison (a GPU)
    .venv/bin/python benchmarks/quality_vs_diffusers.py --steps 5 --batch-size 8 --n 20 --limit 64 \
        --autoencoder PATH --set unet.model_channels=16 --set unet.norm_groups=8    # a CPU smoke run

Both sides train a denoiser of the same architecture and parameter count on the same cached latents (Fashion-MNIST
train encoded once by the `--autoencoder` checkpoint, scaled by its scaling factor) for the same number of images
seen: equal compute means the same optimizer steps at the same batch size, with the same learning rate, warm-up,
gradient clipping, EMA decay and label dropout (the null label, so both sample with the same guidance scale).
Both draw step s's batch from the same seeded latent indices, posterior samples and label drops.

- ldmkit: `train_denoiser` with recipes/fashion-mnist/denoiser.toml (v-prediction, cosine schedule, min-SNR
  weighting), sampled with ldmkit's DPM-Solver++ 2M.
- diffusers: its `UNet2DConditionModel` laid out like ldmkit's U-Net (`unet_config_to_diffusers`; a class-only
  U-Net has no cross-attention, so each transformer block takes diffusers' own no-cross-attention form, attn2 =
  norm2 = None), `DDPMScheduler()` (1000 steps, linear betas, eps-prediction), `torch.optim.AdamW` with the
  weight decay of its text-to-image example (1e-2), a constant learning rate after warm-up, and its
  `EMAModel`; the loop of its training examples: uniform timesteps, `add_noise`, MSE on the noise. Sampled with
  `DPMSolverMultistepScheduler.from_config(ddpm.config)` and batched classifier-free guidance on class labels.

bf16 autocast on CUDA for both trainings. FID of --n samples per setting (labels cycle through the classes)
against the Fashion-MNIST test set (min(--n, 10000) images), one InceptionFeatures instance for all. Targets:
FID(ldmkit, 25 steps) <= 0.7 * FID(diffusers, 25 steps), and FID(ldmkit, 10 steps) <= FID(diffusers, 25 steps).
Writes benchmarks/out/quality_vs_diffusers.json. diffusers is needed only here (it is the peer, not a dependency).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import default_out, write_json  # noqa: E402

from ldmkit.autoencoder.files import load_autoencoder  # noqa: E402
from ldmkit.config import DenoiserRun, load_run  # noqa: E402
from ldmkit.data import build_dataset  # noqa: E402
from ldmkit.data.latents import LatentCache, encode_dataset  # noqa: E402
from ldmkit.evaluation.fid import InceptionFeatures, compute_stats, reference_stats  # noqa: E402
from ldmkit.ldm import LatentDiffusion  # noqa: E402
from ldmkit.noise import generators_from_seed, randn  # noqa: E402
from ldmkit.pipelines.generate import generate  # noqa: E402
from ldmkit.pipelines.request import SampleRequest  # noqa: E402
from ldmkit.runtime import autocast, resolve_device  # noqa: E402
from ldmkit.training.loop import batch_indices, step_generator  # noqa: E402
from ldmkit.training.runs import train_denoiser  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import diffusers_unet  # noqa: E402

RECIPE = ROOT / "recipes" / "fashion-mnist" / "denoiser.toml"
DEFAULT_AE = ROOT / "runs" / "recipes" / "fashion-mnist" / "ae" / "autoencoder.safetensors"
DIFFUSERS_WEIGHT_DECAY = 1e-2  # AdamW weight decay of diffusers' train_text_to_image example
TARGET_RATIO = 0.7  # FID(ldmkit, 25) / FID(diffusers, 25) must not exceed this


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--autoencoder",
        default=str(DEFAULT_AE),
        help="an autoencoder checkpoint (`python recipes/build.py fashion-mnist` writes the default)",
    )
    ap.add_argument("--recipe", default=str(RECIPE), help="ldmkit's denoiser recipe (TOML)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps of both sides (default: the recipe's)")
    ap.add_argument("--batch-size", type=int, default=None, help="batch of both sides (default: the recipe's)")
    ap.add_argument("--lr", type=float, default=None, help="learning rate of both sides (default: the recipe's)")
    ap.add_argument("--limit", type=int, default=0, help="train on the first N images only (0: all)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more overrides of the recipe (both sides build the same U-Net from it)",
    )
    ap.add_argument("--n", type=int, default=10000, help="generated images per FID (and reference images, <= 10000)")
    ap.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale of both sides")
    ap.add_argument("--sample-steps", type=int, nargs="+", default=[25, 10], help="sampler steps to measure")
    ap.add_argument("--sample-batch", type=int, default=250, help="images per sampling batch")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out-dir", default=str(ROOT / "runs" / "bench" / "quality_vs_diffusers"))
    ap.add_argument("--json", default=default_out("quality_vs_diffusers"))
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.n < 2:
        ap.error(f"--n {args.n}: FID needs at least 2 images (10,000 is the usual figure)")
    return args


def load_recipe(args) -> DenoiserRun:
    """ldmkit's recipe with the benchmark's overrides; no intermediate checkpoints or sample grids."""
    over = [
        f"autoencoder={args.autoencoder}",
        f"train.device={args.device}",
        "train.ckpt_every=0",
        "train.sample_every=0",
        f"data.limit={args.limit}",
    ]
    over += [f"train.steps={args.steps}"] if args.steps else []
    over += [f"train.batch_size={args.batch_size}"] if args.batch_size else []
    over += [f"train.lr={args.lr}"] if args.lr else []
    if not Path(args.autoencoder).is_file():
        raise FileNotFoundError(
            f"no autoencoder at {args.autoencoder}; train one with `python recipes/build.py "
            f"fashion-mnist` or pass --autoencoder PATH"
        )
    return load_run(DenoiserRun, args.recipe, over + list(args.set))


def cached_latents(run: DenoiserRun, device: torch.device, progress: bool) -> tuple[DenoiserRun, LatentCache]:
    """Encode the training set once, exactly as `train_denoiser` does, so its run reuses this cache file."""
    ae, ae_run = load_autoencoder(run.autoencoder, device)
    if run.data.channels != ae_run.model.in_channels:
        run = replace(run, data=replace(run.data, channels=ae_run.model.in_channels))
    with autocast(run.train.mixed_precision, device):
        latents = encode_dataset(ae, run.autoencoder, build_dataset(run.data), run.data, device, progress=progress)
    return run, latents


def train_diffusers(
    unet, ldm: LatentDiffusion, latents: LatentCache, run: DenoiserRun, device: torch.device, progress: bool
) -> list[float]:
    """diffusers' eps-prediction DDPM training loop (as its examples write it); leaves the EMA weights in `unet`."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    t, k = run.train, run.unet.num_classes
    ddpm = DDPMScheduler()  # 1000 steps, linear betas 1e-4 .. 0.02, prediction_type="epsilon"
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=DIFFUSERS_WEIGHT_DECAY)
    lr_sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=t.warmup_steps)
    unet.to(device).train()
    ema = EMAModel(params, decay=t.ema_decay)
    losses = []
    for step in tqdm(range(t.steps), desc="diffusers training", disable=not progress):
        # the batch of ldmkit's step `step`: same indices, posterior samples and label drops
        gen = step_generator(t.seed, step)
        idx = batch_indices(t.seed, step, t.batch_size, len(latents))
        z = ldm.to_latent(latents.draw(idx, gen)).to(device)  # (B, c, h, w)
        drop = torch.rand(len(idx), generator=gen) < run.data.caption_dropout  # (B,)
        labels = None
        if k:
            labels = latents.labels[idx].clone()
            labels[drop | (labels < 0)] = k  # the null label
            labels = labels.to(device)
        noise = torch.randn(z.shape, generator=gen).to(device)
        timesteps = torch.randint(0, ddpm.config.num_train_timesteps, (len(idx),), generator=gen).to(device)
        noisy = ddpm.add_noise(z, noise, timesteps)
        with autocast(t.mixed_precision, device):
            pred = unet(noisy, timesteps, None, class_labels=labels).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        ema.step(params)
        losses.append(loss.item())
    ema.copy_to(params)
    unet.eval().requires_grad_(False)
    return losses


def class_labels(ldm: LatentDiffusion, s: int, e: int) -> list[int] | None:
    """Labels of images s..e-1: every class in turn."""
    return [i % ldm.num_classes for i in range(s, e)] if ldm.num_classes else None


@torch.no_grad()
def sample_diffusers(unet, scheduler, ldm: LatentDiffusion, n: int, steps: int, cfg: float, batch: int):
    """diffusers' sampling loop with batched guidance; yields decoded image batches (b, C, H, W) in [-1, 1]."""
    h, w = ldm.run.data.resolution // ldm.factor, ldm.run.data.resolution // ldm.factor
    dev = ldm.device
    for s in range(0, n, batch):
        e = min(n, s + batch)
        cond, uncond = ldm.conditioning(labels=class_labels(ldm, s, e), n=e - s), ldm.null_conditioning(e - s)
        y = torch.cat([cond.labels, uncond.labels]) if cond.labels is not None else None  # (2b,)
        scheduler.set_timesteps(steps, device=dev)
        x = randn((e - s, ldm.latent_channels, h, w), generators_from_seed(s, e - s), device=dev)
        x = x * scheduler.init_noise_sigma  # (b, c, h, w), image i from seed i as on ldmkit's side
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([x, x]), t)
            c, u = unet(inp, t, None, class_labels=y).sample.chunk(2)
            x = scheduler.step(u + cfg * (c - u), t, x).prev_sample
        yield ldm.decode(x).cpu()


def sample_ldmkit(ldm: LatentDiffusion, n: int, steps: int, cfg: float, batch: int):
    """ldmkit's DPM-Solver++ 2M with guidance; yields decoded image batches (b, C, H, W) in [-1, 1]."""
    for s in range(0, n, batch):
        e = min(n, s + batch)
        req = SampleRequest(
            n=e - s, labels=class_labels(ldm, s, e), sampler="dpmpp_2m", steps=steps, cfg=cfg, seed=s, batch_size=batch
        )
        yield generate(ldm, req)[0]


def reference(run: DenoiserRun, n: int, features, progress: bool):
    """FeatureStats of min(n, size) images of the data set's test split."""
    cfg = replace(run.data, split="test", limit=0, holdout=0, crop="center", flip=False)
    ds = build_dataset(cfg)
    return reference_stats(cfg.dataset, ds, min(n, len(ds)), split="test", features=features, progress=progress)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def train_both(args, progress: bool) -> dict:
    """Train both sides; return the models, the run and the timings."""
    run = load_recipe(args)
    dev = resolve_device(run.train.device)
    run, latents = cached_latents(run, dev, progress)
    out = Path(args.out_dir)
    t0 = time.time()
    res = train_denoiser(run, out / "ldmkit", progress=progress, overwrite=True)
    t_ours = time.time() - t0
    ldm = LatentDiffusion.load(res["checkpoint"], dev)  # EMA weights; ldm.run is the resolved run
    torch.manual_seed(ldm.run.train.seed)
    peer = diffusers_unet(ldm.run.unet)
    n_ours, n_peer = (sum(p.numel() for p in m.parameters()) for m in (ldm.unet, peer))
    print(f"parameters: ldmkit {n_ours:,}  diffusers {n_peer:,}")
    if n_ours != n_peer:
        raise RuntimeError(
            f"the diffusers U-Net has {n_peer:,} parameters, ldmkit's {n_ours:,}; the comparison "
            f"needs equal sizes: check unet_config_to_diffusers for this UNetConfig"
        )
    t0 = time.time()
    losses = train_diffusers(peer, ldm, latents, ldm.run, dev, progress)
    t_peer = time.time() - t0
    peer.save_pretrained(out / "diffusers")
    return {
        "run": ldm.run,
        "ldm": ldm,
        "peer": peer,
        "device": dev,
        "parameters": n_ours,
        "train_s": {"ldmkit": t_ours, "diffusers": t_peer},
        "final_loss": {"ldmkit": res["final_loss"], "diffusers": losses[-1] if losses else None},
    }


def measure(args, trained: dict, progress: bool) -> list[dict]:
    """FID of each (side, steps) setting against the test set."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    ldm, peer = trained["ldm"], trained["peer"]
    features = InceptionFeatures(device=trained["device"])
    ref = reference(trained["run"], args.n, features, progress)
    dpm = DPMSolverMultistepScheduler.from_config(DDPMScheduler().config)
    rows = []
    for side in ("ldmkit", "diffusers"):
        for steps in args.sample_steps:
            t0 = time.time()
            images = (
                sample_ldmkit(ldm, args.n, steps, args.cfg, args.sample_batch)
                if side == "ldmkit"
                else sample_diffusers(peer, dpm, ldm, args.n, steps, args.cfg, args.sample_batch)
            )
            fid = compute_stats(images, features, progress=progress).fid(ref)
            rows.append(
                {
                    "side": side,
                    "sampler": "dpmpp_2m" if side == "ldmkit" else "DPMSolverMultistep",
                    "steps": steps,
                    "fid": fid,
                    "seconds": round(time.time() - t0, 1),
                }
            )
            print(f"{side:<10} {steps:>3} steps  FID {fid:.3f}")
    return rows


def checks(rows: list[dict]) -> dict:
    """The two targets, where the settings they compare were measured."""
    fid = {(r["side"], r["steps"]): r["fid"] for r in rows}
    out = {}
    if ("ldmkit", 25) in fid and ("diffusers", 25) in fid:
        ratio = fid[("ldmkit", 25)] / max(fid[("diffusers", 25)], 1e-12)
        out["ratio_25"] = ratio
        out["ratio_25_pass"] = ratio <= TARGET_RATIO
    if ("ldmkit", 10) in fid and ("diffusers", 25) in fid:
        out["ldmkit10_le_diffusers25"] = fid[("ldmkit", 10)] <= fid[("diffusers", 25)]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    progress = not args.quiet
    trained = train_both(args, progress)
    rows = measure(args, trained, progress)
    verdict = checks(rows)
    run = trained["run"]
    print(f"\n{'side':<10} {'sampler':<20} {'steps':>5} {'FID':>9}")
    for r in rows:
        print(f"{r['side']:<10} {r['sampler']:<20} {r['steps']:>5} {r['fid']:>9.3f}")
    if "ratio_25" in verdict:
        print(
            f"FID ldmkit/diffusers at 25 steps: {verdict['ratio_25']:.3f} (target <= {TARGET_RATIO}): "
            f"{'pass' if verdict['ratio_25_pass'] else 'FAIL'}"
        )
    if "ldmkit10_le_diffusers25" in verdict:
        print(
            f"ldmkit at 10 steps <= diffusers at 25 steps: {'pass' if verdict['ldmkit10_le_diffusers25'] else 'FAIL'}"
        )
    ts = trained["train_s"]
    print(
        f"training: ldmkit {ts['ldmkit']:.1f} s, diffusers {ts['diffusers']:.1f} s ({run.train.steps} steps x "
        f"{run.train.batch_size} images, lr {run.train.lr}) on {device_name(trained['device'])}"
    )
    result = {
        "device": device_name(trained["device"]),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "autoencoder": args.autoencoder,
        "steps": run.train.steps,
        "batch_size": run.train.batch_size,
        "lr": run.train.lr,
        "images_seen": run.train.steps * run.train.batch_size,
        "parameters": trained["parameters"],
        "n": args.n,
        "cfg": args.cfg,
        "train_seconds": {k: round(v, 1) for k, v in ts.items()},
        "final_loss": trained["final_loss"],
        "results": rows,
        **verdict,
        "all_finite": all(math.isfinite(r["fid"]) for r in rows),
        "argv": sys.argv[1:] if argv is None else argv,
    }
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
