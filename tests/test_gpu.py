"""Correctness on a CUDA device (issue 31, part 1 of `benchmarks/gpu_check.py`): bf16 training, fp16 / bf16
sampling, CPU against CUDA, exact resume and batch invariance, each on tiny models.

Every test is marked `gpu` and skipped without CUDA. `gpu_check.py --dry-run` sets LDMKIT_GPU_CHECK_DEVICE=cpu to
run the same code on the CPU, so the checks cannot rot between lent devices. What a test measures (differences,
whether cuDNN is batch-invariant, what deterministic kernels cost) is recorded with `record_property` and lands in
the check's table.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import replace

# cuBLAS is deterministic only with a fixed workspace, set before its first use
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402

from ldmkit import checkpoint  # noqa: E402
from ldmkit.autoencoder.files import load_autoencoder  # noqa: E402
from ldmkit.config import AutoencoderRun, DenoiserRun, TrainConfig, UNetConfig  # noqa: E402
from ldmkit.data.latents import encode_dataset  # noqa: E402
from ldmkit.denoisers import build_backbone  # noqa: E402
from ldmkit.diffusion.sample import sample_latents  # noqa: E402
from ldmkit.ldm import LatentDiffusion  # noqa: E402
from ldmkit.noise import generators_from_seed  # noqa: E402
from ldmkit.training.autoencoder import AutoencoderTask  # noqa: E402
from ldmkit.training.denoiser import DenoiserTask, resolve_run  # noqa: E402
from ldmkit.training.loop import STATE_FILE, train  # noqa: E402
from tests.factory import attention_unet, normal_init, tiny_autoencoder_run, tiny_denoiser_run  # noqa: E402


def _device() -> torch.device | None:
    forced = os.environ.get("LDMKIT_GPU_CHECK_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda") if torch.cuda.is_available() else None


DEVICE = _device()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE is None, reason="needs a CUDA device; this machine has none"),
]

# Tolerances, stated once. bf16 keeps 8 bits of mantissa (relative error about 4e-3 per operation); fp16 10 bits.
LOSS_RTOL_BF16 = 0.05  # one training step's loss, bf16 autocast against float32
IMAGE_TOL = {torch.float16: 0.05, torch.bfloat16: 0.15}  # mean |difference| of decoded images in [-1, 1] to fp32
CPU_CUDA_TOL = (0.01, 0.05)  # (mean, max) |difference| of float32 images in [-1, 1], CPU against CUDA (TF32 convs)
BATCH_TOL = 0.02  # max |difference| of an image sampled alone and in a batch, on CUDA (on the CPU: bit for bit)
ON_GPU = DEVICE is not None and DEVICE.type == "cuda"
STEPS = 6 if ON_GPU else 2  # sampler steps; the dry run on a CPU keeps to seconds
KERNEL_MODES = (False, True) if ON_GPU else (True,)  # deterministic kernels off / on (the CPU's are deterministic)


@contextlib.contextmanager
def deterministic(on: bool = True):
    """PyTorch's deterministic kernels (what a `--deterministic` option would switch on), restored afterwards."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)
    saved_bench = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = on, False if on else saved_bench
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved_bench


def sync():
    if DEVICE is not None and DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


# --- the two training stages, tiny ----------------------------------------------------------------------------------


def ae_run(steps: int = 1, **train_kw) -> AutoencoderRun:
    """A tiny KL autoencoder with its discriminator active from step 0 (the GAN path runs too); no perceptual term
    (its TF-Inception network is not on a lent GPU machine)."""
    train = dict(steps=steps, batch_size=8, lr=1e-3, warmup_steps=1, ema_decay=0.0, log_every=1, **train_kw)
    return tiny_autoencoder_run(model=dict(mid_attention=True), loss=dict(disc_start=0), train=train)


def denoiser_task(tiny_ae, blobs, **train_kw) -> DenoiserTask:
    """A tiny class-conditional U-Net on the tiny autoencoder's latents of `blobs`, weights drawn with seed 0 (not
    the zero-output initialisation, so the loss depends on every layer)."""
    ae, ae_cfg = load_autoencoder(tiny_ae, DEVICE)
    train = dict(batch_size=8, lr=1e-3, warmup_steps=1, ema_decay=0.9, log_every=1, **train_kw)
    run = tiny_denoiser_run(tiny_ae, unet=attention_unet(), train=train)
    latents = encode_dataset(ae, tiny_ae, blobs, run.data, DEVICE, progress=False, cache=False)
    run = resolve_run(run, ae_cfg.model, latents)
    torch.manual_seed(0)
    unet = normal_init(build_backbone(run))
    return DenoiserTask(run, LatentDiffusion(ae, ae_cfg.model, unet.to(DEVICE), run), latents, DEVICE)


def first_loss(task, cfg: TrainConfig, out) -> float:
    res = train(task, replace(cfg, steps=1), out, DEVICE, progress=False)
    return res.history[0]["loss"]


def test_one_bf16_training_step_of_each_stage_is_finite_and_matches_float32(tmp_path, blobs, tiny_ae, record_property):
    losses = {}
    for precision in ("no", "bf16"):
        run = ae_run(mixed_precision=precision)
        torch.manual_seed(0)
        task = AutoencoderTask(run, blobs, DEVICE)
        losses[("autoencoder", precision)] = first_loss(task, run.train, tmp_path / f"a{precision}")
        task = denoiser_task(tiny_ae, blobs, mixed_precision=precision)
        losses[("denoiser", precision)] = first_loss(task, task.run.train, tmp_path / f"d{precision}")
    for stage in ("autoencoder", "denoiser"):
        fp32, bf16 = losses[(stage, "no")], losses[(stage, "bf16")]
        rel = abs(bf16 - fp32) / abs(fp32)
        record_property(f"{stage} loss fp32 / bf16 / relative difference", f"{fp32:.5g} / {bf16:.5g} / {rel:.2e}")
        assert torch.isfinite(torch.tensor([fp32, bf16])).all(), (stage, fp32, bf16)
        assert rel < LOSS_RTOL_BF16, f"{stage}: bf16 loss {bf16} vs float32 {fp32} (tolerance {LOSS_RTOL_BF16})"


# --- sampling -------------------------------------------------------------------------------------------------------


def draw(ldm: LatentDiffusion, dtype=torch.float32, labels=(0, 1, 0, 1), seed: int = 0, steps: int = STEPS):
    """Images (B, C, H, W) in [-1, 1] sampled under autocast to `dtype` (none for float32), decoded by ldm.decode."""
    n, dev = len(labels), ldm.device
    with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
        z = sample_latents(
            ldm.denoiser,
            (n, ldm.latent_channels, 8, 8),
            ldm.conditioning(labels=list(labels)),
            ldm.null_conditioning(n),
            steps=steps,
            cfg_scale=2.0,
            generator=generators_from_seed(seed, n),
        )
        return ldm.decode(z)  # decodes in float32 even inside autocast


def not_black(images: torch.Tensor) -> bool:
    """Every image has visible content: not all pixels at -1, and not one flat value."""
    flat = images.flatten(1)
    return bool(((flat.amax(1) > -0.99) & (flat.std(1) > 1e-3)).all())


def test_fp16_and_bf16_sampling_decode_in_float32_without_nan_or_black_images(tiny_ldm, record_property):
    ldm = LatentDiffusion.load(tiny_ldm, DEVICE)
    ref = draw(ldm)
    assert ref.dtype == torch.float32 and torch.isfinite(ref).all() and not_black(ref)
    for dtype in (torch.float16, torch.bfloat16):
        images = draw(ldm, dtype)
        diff = (images - ref).abs().mean().item()
        record_property(f"{dtype} sampling: mean |image - float32 image|", f"{diff:.2e} (tolerance {IMAGE_TOL[dtype]})")
        assert images.dtype == torch.float32, "the autoencoder must decode in float32"
        assert torch.isfinite(images).all(), f"{dtype} sampling gave NaN or infinite pixels"
        assert not_black(images), f"{dtype} sampling gave black or flat images"
        assert diff < IMAGE_TOL[dtype]
    # the autoencoder alone, on latents far out in the tails, stays finite in float32
    z = torch.randn(2, ldm.latent_channels, 8, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE) * 8
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        assert torch.isfinite(ldm.decode(z)).all()


def test_the_same_seed_gives_the_same_images_on_cpu_and_on_the_device(tiny_ldm, record_property):
    on_cpu = draw(LatentDiffusion.load(tiny_ldm, "cpu"))
    on_dev = draw(LatentDiffusion.load(tiny_ldm, DEVICE)).cpu()
    diff = (on_dev - on_cpu).abs()
    record_property("CPU vs device: mean / max |difference|", f"{diff.mean().item():.2e} / {diff.max().item():.2e}")
    record_property("CPU vs device tolerance (mean, max)", str(CPU_CUDA_TOL))
    assert diff.mean().item() < CPU_CUDA_TOL[0] and diff.max().item() < CPU_CUDA_TOL[1]


# --- exact resume ---------------------------------------------------------------------------------------------------


def resume_matches(tiny_ae, blobs, out) -> bool:
    """Four denoiser steps in one go against two, then a resume for the other two: is every tensor of the final
    train state (weights, EMA, AdamW moments) bit for bit the same?"""
    task = denoiser_task(tiny_ae, blobs, steps=4, ckpt_every=0)
    train(task, task.run.train, out / "whole", DEVICE, progress=False)
    task = denoiser_task(tiny_ae, blobs, steps=4, ckpt_every=0)
    train(task, task.run.train, out / "parts", DEVICE, progress=False, stop_after=2)
    assert checkpoint.read_metadata(out / "parts" / STATE_FILE)["step"] == 2
    torch.manual_seed(123)  # a fresh process: other initial weights, which the saved state overwrites
    task = denoiser_task(tiny_ae, blobs, steps=4, ckpt_every=0)
    train(task, task.run.train, out / "parts", DEVICE, progress=False, resume=True)
    a, _ = checkpoint.load(out / "whole" / STATE_FILE, "train-state")
    b, _ = checkpoint.load(out / "parts" / STATE_FILE, "train-state")
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_on_the_device_continues_bit_for_bit(tmp_path, tiny_ae, blobs, record_property):
    if ON_GPU:
        with deterministic(False):
            record_property("exact resume with default kernels", resume_matches(tiny_ae, blobs, tmp_path / "default"))
    with deterministic(True):
        exact = resume_matches(tiny_ae, blobs, tmp_path / "deterministic")
    record_property("exact resume with deterministic kernels", exact)
    assert exact, "a resumed run differs from the uninterrupted one under deterministic kernels"


# --- batch invariance and the cost of deterministic kernels ---------------------------------------------------------


def test_images_sampled_in_a_batch_equal_those_sampled_alone(tiny_ldm, record_property):
    ldm = LatentDiffusion.load(tiny_ldm, DEVICE)
    labels = (0, 1, 1, 0)
    results = {}
    for mode in KERNEL_MODES:
        with deterministic(mode):
            batched = draw(ldm, labels=labels)
            alone = torch.cat([draw(ldm, labels=(lab,), seed=i) for i, lab in enumerate(labels)])
        results[mode] = (batched - alone).abs().max().item()
    for mode, diff in results.items():
        kernels = "deterministic" if mode else "default"
        record_property(f"batch vs alone, {kernels} kernels: max |difference| (0: batch-invariant)", f"{diff:.2e}")
    if not ON_GPU:
        assert set(results.values()) == {0.0}, "ldmkit's CPU sampling is batch-invariant bit for bit"
    assert max(results.values()) < BATCH_TOL


def step_seconds(model, x, c_noise, iters: int) -> float:
    """Median seconds of one forward + backward pass of `model`."""
    times = []
    for i in range(iters + 2):
        sync()
        t = time.perf_counter()
        model(x, c_noise).float().square().mean().backward()
        sync()
        if i >= 2:  # two warm-ups
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def test_what_deterministic_kernels_cost_a_training_step(record_property):
    preset = UNetConfig(
        model_channels=64 if ON_GPU else 16, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1,),
        num_heads=(4,), norm_groups=8, in_channels=4, out_channels=4,
    )  # fmt: skip
    torch.manual_seed(0)
    unet = build_backbone(DenoiserRun(unet=preset)).to(DEVICE)
    b, s = (32, 32) if ON_GPU else (2, 8)
    x = torch.randn(b, 4, s, s, device=DEVICE)
    c_noise = torch.rand(b, device=DEVICE) * 999
    iters = 20 if ON_GPU else 2
    with deterministic(False):
        plain = step_seconds(unet, x, c_noise, iters)
    with deterministic(True):
        det = step_seconds(unet, x, c_noise, iters)
    record_property("training step ms, default / deterministic kernels", f"{plain * 1e3:.2f} / {det * 1e3:.2f}")
    record_property("deterministic kernels cost (ratio)", f"{det / plain:.2f}x")
    assert plain > 0 and det > 0
