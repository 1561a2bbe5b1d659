"""Images per second on this CPU: ldmkit against diffusers running the same weights in the same process.

    .venv/bin/python benchmarks/cpu_sampling.py                              # the shipped fashion-mnist model
    .venv/bin/python benchmarks/cpu_sampling.py runs/demo/denoiser/model.safetensors --n 16 --steps 25

Both sides generate n images at `steps` DPM-Solver++ 2M steps with classifier-free guidance (one batched U-Net
pass per step for both branches) and decode them: ldmkit through `generate`, diffusers through its
UNet2DConditionModel, AutoencoderKL and DPMSolverMultistepScheduler, built from the same weights by
`ldmkit.interop.diffusers`. Each side runs once to warm up, then `--repeats` times; the best time counts.
Writes benchmarks/out/cpu_sampling.json. diffusers is needed only here (it is the peer, not a dependency).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import default_out, write_json  # noqa: E402

from ldmkit.interop.diffusers import vae_to_diffusers  # noqa: E402
from ldmkit.interop.diffusers_config import diffusion_config_to_scheduler  # noqa: E402
from ldmkit.ldm import LatentDiffusion  # noqa: E402
from ldmkit.pipelines.generate import generate  # noqa: E402
from ldmkit.pipelines.request import SampleRequest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import diffusers_copy  # noqa: E402


def conditions(ldm: LatentDiffusion, n: int, prompt: str):
    labels = [i % ldm.num_classes for i in range(n)] if ldm.num_classes else None
    prompts = [prompt] * n if ldm.text_encoder is not None else None
    return labels, prompts


def run_ldmkit(ldm, n, steps, cfg, labels, prompts):
    req = SampleRequest(n=n, labels=labels, prompts=prompts, sampler="dpmpp_2m", steps=steps, cfg=cfg, batch_size=n)
    return generate(ldm, req)[0]


@torch.no_grad()
def run_diffusers(ldm, unet, vae, scheduler, n, steps, cfg, labels, prompts):
    """The usual diffusers sampling loop (as its pipelines write it) with batched guidance."""
    cond, uncond = ldm.conditioning(labels=labels, prompts=prompts, n=n), ldm.null_conditioning(n)
    both = type(cond).cat([cond, uncond])
    kwargs = {"encoder_hidden_states": both.context}  # None for a class-only U-Net (no cross-attention)
    if both.labels is not None:
        kwargs["class_labels"] = both.labels
    scheduler.set_timesteps(steps)
    h = ldm.run.data.resolution // ldm.factor
    g = torch.Generator().manual_seed(0)
    latents = torch.randn((n, ldm.latent_channels, h, h), generator=g) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        out = unet(x, t, **kwargs).sample
        c, u = out.chunk(2)
        latents = scheduler.step(u + cfg * (c - u), t, latents).prev_sample
    z = latents / ldm.ae_config.scaling_factor + ldm.ae_config.shift_factor
    return vae.decode(z).sample.clamp(-1, 1)


def best_of(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", default=str(ROOT / "weights" / "fashion-mnist.safetensors"))
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--prompt", default="red apple")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=default_out("cpu_sampling"))
    args = ap.parse_args(argv)
    from diffusers import DPMSolverMultistepScheduler

    ldm = LatentDiffusion.load(args.checkpoint, "cpu")
    unet = diffusers_copy(ldm.unet).eval()  # a class-only U-Net too (see peers.py)
    vae = vae_to_diffusers(ldm.autoencoder).eval()
    sched_cfg = {
        k: v
        for k, v in diffusion_config_to_scheduler(ldm.run.diffusion).items()
        if k not in ("_class_name", "clip_sample", "set_alpha_to_one")
    }
    sched_cfg["timestep_spacing"] = "trailing"  # the spacing ldmkit's grids use, so both take the same steps
    scheduler = DPMSolverMultistepScheduler(**sched_cfg)
    labels, prompts = conditions(ldm, args.n, args.prompt)
    t_ours, a = best_of(lambda: run_ldmkit(ldm, args.n, args.steps, args.cfg, labels, prompts), args.repeats)
    t_peer, b = best_of(
        lambda: run_diffusers(ldm, unet, vae, scheduler, args.n, args.steps, args.cfg, labels, prompts), args.repeats
    )
    rows = [("ldmkit", args.n / t_ours, t_ours), ("diffusers", args.n / t_peer, t_peer)]
    print(f"{'pipeline':<10} {'images/s':>9} {'seconds':>8}")
    for name, ips, s in rows:
        print(f"{name:<10} {ips:>9.2f} {s:>8.2f}")
    ratio = t_peer / t_ours
    print(f"ldmkit / diffusers speed: {ratio:.2f}x  (target >= 1.0)")
    result = {
        "checkpoint": args.checkpoint,
        "n": args.n,
        "steps": args.steps,
        "cfg": args.cfg,
        "ldmkit_images_per_s": args.n / t_ours,
        "diffusers_images_per_s": args.n / t_peer,
        "speed_ratio": ratio,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "both_finite": bool(torch.isfinite(a).all() and torch.isfinite(b).all()),
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
