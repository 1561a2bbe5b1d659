"""Multistep consistency sampling (Song et al. 2023, Algorithm 1; Luo et al. 2023, Algorithm 3 for latent
consistency models), in sigma space: x = x_t / sqrt(abar_t) = x0 + sigma eps.

A consistency model f(x, sigma) maps any point of a probability-flow trajectory to its origin. LCM parameterises it
with the boundary scalings f = c_skip(t) x_t + c_out(t) x0_theta(x_t, t), which `consistency_boundary` wraps around
a denoiser (the denoiser is x0_theta); the sampler itself only denoises to x0 and re-noises to the next sigma.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import InputError
from ..noise import Generators, randn_like
from .common import Callback, DenoiseFn, check_sigmas, denoise_at, report


def consistency_boundary(
    denoise: DenoiseFn,
    timestep: Callable[[torch.Tensor], torch.Tensor],
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
) -> DenoiseFn:
    """The LCM consistency function (Luo et al. 2023, eq. 9) around a VP model's denoiser:
    f(x, sigma) = c_skip(t) x / sqrt(sigma^2 + 1) + c_out(t) D(x, sigma), with s = timestep_scaling * t,
    c_skip = sigma_data^2 / (s^2 + sigma_data^2), c_out = s / sqrt(s^2 + sigma_data^2), so that f = x_t at t = 0.

    denoise: the distilled model's D(x, sigma) (x0_theta); timestep: sigma (B,) -> its training timestep t (B,), e.g.
    a `DiscreteDenoiser`'s `timestep`; timestep_scaling: how sharply c_skip falls from 1 with t (LCM's 10);
    sigma_data: the data standard deviation the scalings assume (LCM's 0.5)."""

    def f(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = timestep_scaling * timestep(sigma).to(device=x.device, dtype=torch.float64)  # (B,)
        c_skip = (sigma_data**2 / (s**2 + sigma_data**2)).to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        c_out = (s / (s**2 + sigma_data**2).sqrt()).to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        x_t = x / (sigma.view(-1, *[1] * (x.ndim - 1)) ** 2 + 1).sqrt()  # the VP latent
        return c_skip * x_t + c_out * denoise(x, sigma)

    return f


def lcm_timesteps(steps: int, num_timesteps: int = 1000, original_steps: int = 50) -> torch.Tensor:
    """LCM's timesteps (steps,), decreasing: `steps` evenly spaced by index from the distillation grid
    t = k c - 1, k = original_steps .. 1, c = num_timesteps // original_steps (Luo et al. 2023, sec. 4.2)."""
    if not 1 <= steps <= original_steps <= num_timesteps:
        raise InputError(
            f"LCM takes 1 to {original_steps} steps (the distillation grid's length) of a {num_timesteps}-timestep "
            f"schedule, got {steps}; choose fewer steps"
        )
    c = num_timesteps // original_steps
    grid = torch.arange(original_steps, 0, -1) * c - 1  # (original_steps,), decreasing
    return grid[(torch.arange(steps) * original_steps) // steps]


def sample_lcm(
    denoise: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): x0 = f(x, sigma), then
    x_next = x0 + sigma_next z with fresh z ~ N(0, I); the step to sigma = 0 returns x0. With a consistency model
    (`consistency_boundary` around an LCM) it needs 1 to 8 steps."""
    sigmas = check_sigmas(x, sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise_at(denoise, x, sigma)
        report(callback, i, x, x0, sigma)
        x = x0
        if float(sigma_next) > 0:
            x = x0 + sigma_next * randn_like(x0, generator)
    return x
