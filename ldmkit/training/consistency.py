"""Latent consistency distillation (Luo et al. 2023, Algorithm 1), in sigma space: x = x0 + sigma eps.

A student f_theta(x, sigma, c) learns to map every point of the teacher's guided probability-flow trajectory to the
trajectory's origin, so that `sample_lcm` (samplers/lcm.py) draws an image in 1 to 8 steps. One training item:

    n ~ U{0, ..., K - 1} on the teacher's K-step sampling grid (the skipping-step solver: one grid step spans
    N / K of the teacher's timesteps), sigma_hi = grid[n], sigma_lo = grid[n + 1];
    x_hi = x0 + sigma_hi eps;
    the teacher's guided DDIM step: D_w = D_u + w (D_c - D_u) at (x_hi, sigma_hi),
        x_lo = D_w + (sigma_lo / sigma_hi)(x_hi - D_w);
    loss = d(f_theta(x_hi, sigma_hi, c), f_target(x_lo, sigma_lo, c)), d the pseudo-Huber distance (Song &
    Dhariwal 2023) with c = 0.001 sqrt(dim).

The consistency function is the denoiser itself, f = D: every parameterisation's D already meets the boundary
condition f(x, 0) = x (c_skip -> 1, c_out -> 0 as sigma -> 0), which LCM's own c_skip, c_out (samplers/lcm.py
`consistency_boundary`) enforce for an eps model; where sigma_lo = 0 the target is x_lo itself. Guidance is folded
in at a fixed scale w (LCM-LoRA's choice; LCM's w-embedding would need one more backbone input). The target network
is the student under stop-gradient, the EMA with decay 0, which improved consistency training found better than a
slow EMA (Song & Dhariwal 2023, sec. 3.2) and LCM-LoRA uses; the run's EMA still averages the exported weights.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..conditioning.types import Conditioning
from ..errors import InputError
from ..noise import Generators, randn

Denoise = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]  # (x, sigma (B,), cond) -> x0
HUBER_C = 0.001  # LCM's pseudo-Huber constant, times sqrt(dim)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sqrt(|a - b|^2 + c^2) - c per sample (B,), c = 0.001 sqrt(dim)."""
    c = HUBER_C * math.sqrt(a[0].numel())
    return (((a.float() - b.float()) ** 2).flatten(1).sum(1) + c**2).sqrt() - c


def draw_steps(n: int, steps: int, generator: Generators) -> torch.Tensor:
    """Each item's grid step n in {0, ..., steps - 1} (B,), one draw per generator (per-item seeding)."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.randint(0, steps, (1,), generator=g) for g in generator])
    return torch.randint(0, steps, (n,), generator=generator)


def consistency_loss(
    student: Denoise,
    teacher: Denoise,
    x0: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    grid: torch.Tensor,
    guidance: float,
    generator: Generators = None,
) -> torch.Tensor:
    """The latent consistency distillation loss (B,) of clean latents x0 (B, C, H, W) under `cond`.

    student: the model trained (called twice: with gradients at sigma_hi, under no_grad as the target at
    sigma_lo); teacher: the frozen model whose guided ODE is distilled; uncond: the guidance's unconditional
    branch (None or guidance 1: no guidance); grid: the teacher's sampling grid (K + 1,), decreasing to 0;
    guidance: the scale w folded in; generator: one per item for batch-size independent draws."""
    if grid.ndim != 1 or len(grid) < 2 or float(grid[-1]) != 0.0:
        raise InputError("the distillation grid must be a sampling grid ending in 0; build one with denoiser.sigmas")
    b = x0.shape[0]
    n = draw_steps(b, len(grid) - 1, generator)  # (B,)
    grid = grid.to(device=x0.device, dtype=torch.float32)
    s_hi, s_lo = grid[n.to(x0.device)], grid[n.to(x0.device) + 1]  # (B,) each
    view = (-1, *[1] * (x0.ndim - 1))
    x_hi = x0.float() + s_hi.view(view) * randn(x0.shape, generator, device=x0.device)  # (B, C, H, W)
    with torch.no_grad():
        d = teacher(x_hi, s_hi, cond)
        if uncond is not None and guidance != 1.0:
            d_u = teacher(x_hi, s_hi, uncond)
            d = d_u + guidance * (d - d_u)
        x_lo = d + (s_lo / s_hi).view(view) * (x_hi - d)  # the teacher's guided DDIM step
        at_zero = (s_lo == 0).view(view)
        target = torch.where(at_zero, x_lo, student(x_lo, s_lo.clamp_min(grid[-2]), cond))  # f(x, 0) = x
    return pseudo_huber(student(x_hi, s_hi, cond), target)
