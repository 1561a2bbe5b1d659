"""Part 2 of benchmarks/gpu_check.py: speed against diffusers on the same weights in the same process.

The Stable Diffusion 1.5 U-Net layout (ldmkit's "sd15" preset), randomly initialised, in fp16, on 64x64 latents with
a 77x768 context: one step at batch 2 and 8, eager and compiled, for ldmkit and for diffusers (the weights copied by
ldmkit.interop.diffusers, and checked to give the same output); the SD autoencoder layout decoding a 64x64 latent to
512x512; one bf16 training step (forward, backward, AdamW) at batch 32, as TFLOP/s counted by PyTorch's FLOP
counter. The dry run uses a tiny U-Net and autoencoder in float32 on the CPU, and torch.compile's "eager" backend.
"""

from __future__ import annotations

import copy
import gc
import os
import statistics
import time
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from ldmkit.autoencoder import build_autoencoder
from ldmkit.conditioning.types import Conditioning
from ldmkit.config import AutoencoderConfig
from ldmkit.denoisers import UNET_PRESETS
from ldmkit.denoisers.unet import UNet

ITERS = 20  # timed iterations per figure (the median is reported)
WARMUP = 5
# (row, target as (comparison, value), H100 reference of diffusers + torch.compile reduce-overhead / eager training)
TARGETS = {"unet b2": 4.5, "unet b8": 12.0, "vae decode 512": 10.0}  # ms, at most
TRAIN_TARGET, TRAIN_REFERENCE = 400.0, 214.0  # TFLOP/s, at least; diffusers' eager training step on one H100
REFERENCE = {"unet b2": 7.75, "unet b8": 21.0}  # ms, diffusers + torch.compile reduce-overhead on one H100
VARIANTS = ("ldmkit eager", "diffusers eager", "ldmkit compiled", "diffusers compile reduce-overhead",
            "diffusers compile default")  # fmt: skip
SLOW = ("compiled", "compile")  # rows that compile: each needs about a minute on a GPU


def row_names() -> list[str]:
    names = ["unet parity ldmkit vs diffusers"]
    names += [f"unet b{b} {v}" for v in VARIANTS[:2] for b in (2, 8)]
    names += ["vae decode 512 ldmkit fp32", "vae decode 512 diffusers fp32"]
    names += ["train step b32 bf16 ldmkit", "train step b32 bf16 diffusers"]
    for v in VARIANTS[2:]:
        names += [f"unet b{b} {v}" for b in (2, 8)] + [f"compile time {v}"]
    return names


class Setting:
    """Shapes and types of the run: the issue's on CUDA, tiny ones on the CPU (dry run)."""

    def __init__(self, dry: bool):
        self.cuda = torch.cuda.is_available() and not dry
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.float16 if self.cuda else torch.float32
        base = UNET_PRESETS["sd15"]
        if self.cuda:
            self.unet = replace(base, in_channels=4, out_channels=4)
            self.latent, self.ctx, self.vae_latent = 64, (77, 768), 64
            self.vae = AutoencoderConfig(
                in_channels=3, base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4,
                norm_groups=32, scaling_factor=0.18215,
            )  # fmt: skip
            self.train_batch = 32
        else:
            self.unet = replace(
                base, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                num_heads=(2,), context_dim=32, norm_groups=8, in_channels=4, out_channels=4,
            )  # fmt: skip
            self.latent, self.ctx, self.vae_latent = 8, (4, 32), 8
            self.vae = AutoencoderConfig(
                in_channels=3, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4,
                norm_groups=4,
            )  # fmt: skip
            self.train_batch = 2
        self.iters, self.warmup = (ITERS, WARMUP) if self.cuda else (3, 1)  # the dry run: code paths, not figures

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def median_ms(s: Setting, fn, iters: int | None = None, warmup: int | None = None) -> float:
    """Median milliseconds of fn() over `iters` synchronised runs after `warmup` untimed ones (CUDA events on a GPU)."""
    for _ in range(s.warmup if warmup is None else warmup):
        fn()
    s.sync()
    times = []
    for _ in range(iters or s.iters):
        if s.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def verdict(value: float, target: float, at_most: bool = True) -> str:
    """'target met' or by how much it is missed."""
    if (value <= target) if at_most else (value >= target):
        return "target met"
    miss = value / target - 1 if at_most else 1 - value / target
    return f"missed by {miss:.0%}"


def load_diffusers():
    """The diffusers module, or None with the reason."""
    try:
        import diffusers
    except ImportError as e:
        return None, f"skipped: diffusers is not importable ({e}); {os.environ.get('LDMKIT_GPU_CHECK_DIFFUSERS', '')}"
    return diffusers, ""


def inputs(s: Setting, batch: int):
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 4, s.latent, s.latent, generator=g).to(s.device, s.dtype)
    t = torch.full((batch,), 500.0, device=s.device)
    ctx = torch.randn(batch, *s.ctx, generator=g).to(s.device, s.dtype)
    return x, t, ctx


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compile_kwargs(s: Setting, mode: str | None) -> dict:
    """torch.compile's arguments: inductor with `mode` on a GPU; the "eager" backend in the dry run (it traces the
    same graph in seconds; inductor's C++ build would take minutes on a CPU)."""
    if not s.cuda:
        return {"backend": "eager"}
    return {"mode": mode} if mode else {}


def unet_rows(s: Setting, emit, deadline: float, diffusers, why: str) -> None:
    torch.manual_seed(0)
    with torch.device(s.device):
        unet = UNet(s.unet)
    for p in unet.parameters():  # random weights everywhere (the zero-initialised output layers too)
        torch.nn.init.normal_(p, std=0.02)
    unet = unet.to(s.dtype).eval().requires_grad_(False)
    dunet = None
    if diffusers is not None:
        from ldmkit.interop.diffusers import unet_to_diffusers

        with torch.device(s.device):
            dunet = unet_to_diffusers(unet).to(s.device, s.dtype).eval().requires_grad_(False)
    ours = {b: inputs(s, b) for b in (2, 8)}

    def call_ours(model, b):
        x, t, ctx = ours[b]
        return lambda: model(x, t, Conditioning(context=ctx))

    def call_theirs(model, b):
        x, t, ctx = ours[b]
        return lambda: model(x, t, encoder_hidden_states=ctx).sample

    with torch.inference_mode():
        if dunet is None:
            emit("unet parity ldmkit vs diffusers", why)
        else:
            a, b_ = call_ours(unet, 2)().float(), call_theirs(dunet, 2)().float()
            rel = ((a - b_).norm() / b_.norm()).item()
            emit("unet parity ldmkit vs diffusers", "ok" if rel < 1e-2 else "failed: outputs differ", rel,
                 "rel. L2", f"same weights, {s.dtype}; tolerance 1e-2")  # fmt: skip
        for name, model, call in (("ldmkit eager", unet, call_ours), ("diffusers eager", dunet, call_theirs)):
            for b in (2, 8):
                key = f"unet b{b} {name}"
                if model is None:
                    emit(key, why)
                    continue
                ms = median_ms(s, call(model, b))
                emit(key, *_judged(s, f"unet b{b}", ms))
    return unet, dunet, ours, call_ours, call_theirs


def _judged(s: Setting, key: str, ms: float) -> tuple:
    """(status, value, unit, note) of a timed U-Net or VAE figure against its target."""
    if not s.cuda:
        return "ok", ms, "ms", "dry run: tiny model on the CPU"
    ref = f"; H100 reference (diffusers compiled): {REFERENCE[key]} ms" if key in REFERENCE else ""
    return verdict(ms, TARGETS[key]), ms, "ms", f"target <= {TARGETS[key]} ms{ref}"


def compiled_rows(s: Setting, emit, deadline: float, state, diffusers, why: str) -> None:
    unet, dunet, ours, call_ours, call_theirs = state
    jobs = [
        ("ldmkit compiled", unet, call_ours, "reduce-overhead", True),
        ("diffusers compile reduce-overhead", dunet, call_theirs, "reduce-overhead", False),
        ("diffusers compile default", dunet, call_theirs, None, False),
    ]
    for name, model, call, mode, channels_last in jobs:
        names = [f"unet b2 {name}", f"unet b8 {name}", f"compile time {name}"]
        if model is None:
            for n in names:
                emit(n, why)
            continue
        if time.time() > deadline - (60 if s.cuda else 2):
            for n in names:
                emit(n, "skipped: out of time", note="less than a compile's minute left")
            continue
        torch._dynamo.reset()
        m = copy.deepcopy(model)
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        compiled = torch.compile(m, **compile_kwargs(s, mode))
        graphs = s.cuda and mode == "reduce-overhead"
        compile_s = 0.0
        with torch.inference_mode():
            for b in (2, 8):
                fn = call(compiled, b)
                step = (lambda fn=fn: (torch.compiler.cudagraph_mark_step_begin(), fn())) if graphs else fn
                t = time.perf_counter()
                step()
                step()  # reduce-overhead records its CUDA graph on the second call
                s.sync()
                compile_s += time.perf_counter() - t
                ms = median_ms(s, step)
                emit(f"unet b{b} {name}", *_judged(s, f"unet b{b}", ms))
        how = "channels-last, " if channels_last else ""
        note = f"{how}mode {mode or 'default'}" if s.cuda else "dry run: backend eager"
        emit(f"compile time {name}", "ok", compile_s, "s", f"first two calls at batch 2 and 8; {note}")
        del compiled, m
        free()


def vae_rows(s: Setting, emit, diffusers, why: str) -> None:
    torch.manual_seed(0)
    with torch.device(s.device):
        vae = build_autoencoder(s.vae).eval().requires_grad_(False)
    z = torch.randn(1, 4, s.vae_latent, s.vae_latent, generator=torch.Generator().manual_seed(0)).to(s.device)
    with torch.inference_mode():
        ms = median_ms(s, lambda: vae.decode(z))
        key = "vae decode 512"
        status, value, unit, note = _judged(s, key, ms)
        emit("vae decode 512 ldmkit fp32", status, value, unit, note + "; ldmkit decodes in float32")
        if diffusers is None:
            emit("vae decode 512 diffusers fp32", why)
        else:
            from ldmkit.interop.diffusers import vae_to_diffusers

            with torch.device(s.device):
                dvae = vae_to_diffusers(vae).to(s.device).eval()
            ms = median_ms(s, lambda: dvae.decode(z).sample)
            emit("vae decode 512 diffusers fp32", "ok", ms, "ms", "the same weights")


def train_rows(s: Setting, emit, diffusers, why: str) -> None:
    """One bf16 training step (autocast forward, backward, AdamW) at batch 32: median ms and TFLOP/s."""
    for who in ("ldmkit", "diffusers"):
        name = f"train step b32 bf16 {who}"
        if who == "diffusers" and diffusers is None:
            emit(name, why)
            continue
        try:
            ms, flops = train_step(s, who)
        except torch.OutOfMemoryError as e:
            emit(name, f"failed: out of GPU memory ({str(e).splitlines()[0][:120]})")
        else:
            tflops = flops / (ms * 1e-3) / 1e12
            if not s.cuda:
                status, note = "ok", "dry run: tiny model on the CPU"
            elif who == "ldmkit":
                status, note = verdict(tflops, TRAIN_TARGET, at_most=False), f"target >= {TRAIN_TARGET:.0f} TFLOP/s"
            else:
                status, note = "ok", f"H100 reference: {TRAIN_REFERENCE:.0f} TFLOP/s"
            emit(name, status, tflops, "TFLOP/s", f"{note}; {ms:.1f} ms a step", ms=ms)
        free()


def train_step(s: Setting, who: str) -> tuple[float, int]:
    """(median ms of a step, FLOPs of its forward and backward) for "ldmkit" or "diffusers" on the same weights."""
    x, t, ctx = inputs(s, s.train_batch)
    x, ctx = x.float(), ctx.float()
    target = torch.randn_like(x)
    torch.manual_seed(0)
    with torch.device(s.device):
        model = UNet(s.unet)
        if who == "diffusers":
            from ldmkit.interop.diffusers import unet_to_diffusers

            model = unet_to_diffusers(model).to(s.device)
    model.train()

    def forward():
        if who == "ldmkit":
            return model(x, t, Conditioning(context=ctx))
        return model(x, t, encoder_hidden_states=ctx).sample

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=s.cuda)

    def step():
        with torch.autocast(s.device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(forward().float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        with torch.autocast(s.device.type, dtype=torch.bfloat16):
            torch.nn.functional.mse_loss(forward().float(), target).backward()
    opt.zero_grad(set_to_none=True)
    return median_ms(s, step), counter.get_total_flops()


def run(args, emit, deadline: float) -> None:
    s = Setting(args.dry_run)
    if not s.cuda and not args.dry_run:
        for n in row_names():
            emit(n, "skipped: needs a CUDA device; this machine has none")
        return
    diffusers, why = load_diffusers()
    torch.backends.cudnn.benchmark = s.cuda
    state = unet_rows(s, emit, deadline, diffusers, why)
    vae_rows(s, emit, diffusers, why)
    free()
    train_rows(s, emit, diffusers, why)
    compiled_rows(s, emit, deadline, state, diffusers, why)
