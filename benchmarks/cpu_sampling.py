"""Images per second on this CPU: ldmkit against diffusers running the same weights in the same process.

    .venv/bin/python benchmarks/cpu_sampling.py                              # the shipped fashion-mnist model
    .venv/bin/python benchmarks/cpu_sampling.py weights/emoji.safetensors --prompt "red apple"
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cpu_sampling.py weights/emoji.safetensors

Both sides generate n images at `steps` DPM-Solver++ 2M steps with classifier-free guidance (one batched U-Net
pass per step for both branches) and decode them: ldmkit through `generate`, diffusers through its
UNet2DConditionModel, AutoencoderKL and DPMSolverMultistepScheduler, built from the same weights by
`ldmkit.interop.diffusers`. Each side runs in float32 and, where the CPU computes bfloat16 natively (AVX-512 BF16 or
AMX), in bf16: ldmkit with `precision="bf16"` (its steps under autocast, decoding in float32), diffusers under
`torch.autocast("cpu", torch.bfloat16)` around its whole loop. The rows are interleaved, each keeps its best of
`--repeats` after a warm-up, and the headline ratio is best against best. A second table times one image, warm
(n = 1), the same way. With the openvino extra installed, ldmkit also runs with `backend="openvino"` (rows
"ldmkit-ov": its backbone exported to OpenVINO, each image one inference). Every row reports its mean absolute
pixel difference from ldmkit's float32 images.
Writes benchmarks/out/cpu_sampling.json. diffusers is needed only here (it is the peer, not a dependency).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import cpu_name, default_out, write_json  # noqa: E402

from ldmkit.interop.diffusers import vae_to_diffusers  # noqa: E402
from ldmkit.interop.diffusers_config import diffusion_config_to_scheduler  # noqa: E402
from ldmkit.ldm import LatentDiffusion  # noqa: E402
from ldmkit.pipelines.generate import generate  # noqa: E402
from ldmkit.pipelines.request import SampleRequest  # noqa: E402
from ldmkit.runtime import native_bf16  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import diffusers_copy  # noqa: E402


def conditions(ldm: LatentDiffusion, n: int, prompt: str):
    labels = [i % ldm.num_classes for i in range(n)] if ldm.num_classes else None
    prompts = [prompt] * n if ldm.text_encoder is not None else None
    return labels, prompts


def run_ldmkit(ldm, n, steps, cfg, labels, prompts, precision="fp32", backend="torch"):
    req = SampleRequest(
        n=n,
        labels=labels,
        prompts=prompts,
        sampler="dpmpp_2m",
        steps=steps,
        cfg=cfg,
        batch_size=n,
        precision=precision,
        backend=backend,
    )
    return generate(ldm, req)[0]


@torch.no_grad()
def run_diffusers(ldm, unet, vae, scheduler, n, steps, cfg, labels, prompts):
    """The usual diffusers sampling loop (as its pipelines write it) with batched guidance."""
    cond, uncond = ldm.conditioning(labels=labels, prompts=prompts, n=n), ldm.null_conditioning(n)
    both = type(cond).cat([cond, uncond])
    kwargs = {"encoder_hidden_states": both.context}  # None for a class-only U-Net (no cross-attention)
    if both.labels is not None:
        kwargs["class_labels"] = both.labels
    if both.context_mask is not None:  # padding tokens masked out of cross-attention, as ldmkit does
        kwargs["encoder_attention_mask"] = both.context_mask
    scheduler.set_timesteps(steps)
    h = ldm.run.data.resolution // ldm.factor
    shape = (1, ldm.latent_channels, h, h)  # image i's noise from seed i, as ldmkit draws it at the default seed 0
    noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(n)])
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        out = unet(x, t, **kwargs).sample
        c, u = out.chunk(2)
        latents = scheduler.step(u + cfg * (c - u), t, latents).prev_sample
    z = latents / ldm.ae_config.scaling_factor + ldm.ae_config.shift_factor
    return vae.decode(z).sample.clamp(-1, 1)


def peer_scheduler(ldm: LatentDiffusion):
    """diffusers' DPM-Solver++ 2M on the grid ldmkit samples: the discrete scheduler with trailing spacing for an eps
    or v model, the EDM one (the same c_skip, c_out, c_in and c_noise = ln(sigma) / 4, Karras grid to 0) for EDM."""
    from diffusers import DPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler

    if ldm.run.diffusion.parameterisation == "edm":
        d = ldm.denoiser
        return EDMDPMSolverMultistepScheduler(
            sigma_min=d.sigma_min, sigma_max=d.sigma_max, sigma_data=d.sigma_data, sigma_schedule="karras", rho=7.0
        )
    cfg = {
        k: v
        for k, v in diffusion_config_to_scheduler(ldm.run.diffusion).items()
        if k not in ("_class_name", "clip_sample", "set_alpha_to_one")
    }
    cfg["timestep_spacing"] = "trailing"  # the spacing ldmkit's grids use, so both take the same steps
    return DPMSolverMultistepScheduler(**cfg)


def interleaved(rows: dict, repeats: int) -> dict:
    """{name: (best seconds, images)} of each row's fn, after one warm-up each, the rows taken in turn `repeats`
    times so that load from other processes hits them alike."""
    out = {name: [float("inf"), fn()] for name, fn in rows.items()}  # warm-up
    for _ in range(repeats):
        for name, fn in rows.items():
            t = time.perf_counter()
            images = fn()
            out[name] = [min(out[name][0], time.perf_counter() - t), images]
    return {name: tuple(v) for name, v in out.items()}


def bf16_autocast(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def table(n: int, timed: dict) -> list[dict]:
    """One row per (pipeline, precision): images/s, seconds and the mean pixel difference from ldmkit fp32."""
    ref = timed[("ldmkit", "fp32")][1]
    rows = []
    for (who, precision), (seconds, images) in timed.items():
        diff = float((images.float() - ref.float()).abs().mean())
        rows.append(
            {"pipeline": who, "precision": precision, "images_per_s": n / seconds, "seconds": seconds, "diff": diff}
        )
    return rows


def show(title: str, rows: list[dict]) -> None:
    print(title)
    print(f"{'pipeline':<10} {'precision':<10} {'images/s':>9} {'seconds':>8} {'mean |diff| vs ldmkit fp32':>27}")
    for r in rows:
        print(
            f"{r['pipeline']:<10} {r['precision']:<10} {r['images_per_s']:>9.2f} {r['seconds']:>8.3f} "
            f"{r['diff']:>27.4f}"
        )


def best(rows: list[dict], who: str) -> dict:
    """The fastest row of `who` (ldmkit: of any of its backends)."""
    return max((r for r in rows if r["pipeline"].split("-")[0] == who), key=lambda r: r["images_per_s"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", default=str(ROOT / "weights" / "fashion-mnist.safetensors"))
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--prompt", default="red apple")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--precisions",
        default="auto",
        help="fp32 or fp32,bf16 (fp32 always runs: the reference); auto: bf16 where native",
    )
    ap.add_argument(
        "--backends",
        default="auto",
        help="ldmkit's backends: torch, or torch,openvino (rows ldmkit and ldmkit-ov); auto: openvino where installed",
    )
    ap.add_argument("--out", default=default_out("cpu_sampling"))
    args = ap.parse_args(argv)
    if args.backends == "auto":
        backends = ["torch", "openvino"] if importlib.util.find_spec("openvino") else ["torch"]
    else:  # the torch rows are the reference
        backends = ["torch", *(b for b in args.backends.split(",") if b != "torch")]
    native = native_bf16(torch.device("cpu"))
    if args.precisions == "auto":
        precisions = ["fp32", "bf16"] if native else ["fp32"]
        if not native:
            print("this CPU computes bfloat16 only emulated: float32 rows only", file=sys.stderr)
    else:  # ldmkit's float32 images are every row's reference, so its fp32 row always runs
        precisions = ["fp32", *(p for p in args.precisions.split(",") if p != "fp32")]
    ldm = LatentDiffusion.load(args.checkpoint, "cpu")
    unet = diffusers_copy(ldm.unet).eval()  # a class-only U-Net too (see peers.py)
    vae = vae_to_diffusers(ldm.autoencoder).eval()
    scheduler = peer_scheduler(ldm)

    def rows_for(n: int) -> dict:
        labels, prompts = conditions(ldm, n, args.prompt)
        rows = {}
        for backend in backends:
            for precision in precisions:
                name = "ldmkit" if backend == "torch" else "ldmkit-ov"
                rows[(name, precision)] = lambda p=precision, b=backend: run_ldmkit(
                    ldm, n, args.steps, args.cfg, labels, prompts, p, b
                )
        for precision in precisions:

            def peer(p=precision):
                with bf16_autocast(p == "bf16"):
                    return run_diffusers(ldm, unet, vae, scheduler, n, args.steps, args.cfg, labels, prompts)

            rows[("diffusers", precision)] = peer
        return rows

    batch = table(args.n, interleaved(rows_for(args.n), args.repeats))
    alone = table(1, interleaved(rows_for(1), args.repeats))
    where = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    show(f"{args.n} images, {args.steps} steps, guidance {args.cfg} ({where})", batch)
    show("one image, warm", alone)
    ours, peer = best(batch, "ldmkit"), best(batch, "diffusers")
    ratio = ours["images_per_s"] / peer["images_per_s"]
    print(
        f"best against best: {ours['pipeline']} {ours['precision']} {ours['images_per_s']:.2f} images/s, diffusers "
        f"{peer['precision']} {peer['images_per_s']:.2f}: {ratio:.2f}x (target >= 1.5); one image, warm: ldmkit "
        f"{best(alone, 'ldmkit')['seconds']:.3f} s"
    )
    result = {
        "checkpoint": args.checkpoint,
        "backends": backends,
        "ldmkit_best": f"{ours['pipeline']} {ours['precision']}",
        "n": args.n,
        "steps": args.steps,
        "cfg": args.cfg,
        "batch": batch,
        "one_image": alone,
        "best_against_best": ratio,
        "ldmkit_images_per_s": ours["images_per_s"],
        "diffusers_images_per_s": peer["images_per_s"],
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "native_bf16": native,
        "torch": torch.__version__,
        "all_finite": all(bool(torch.isfinite(torch.as_tensor(r["diff"]))) for r in batch + alone),
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
