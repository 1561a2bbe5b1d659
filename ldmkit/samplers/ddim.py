"""DDIM and DDPM (ancestral) samplers, written in sigma space: x = x_t / sqrt(abar_t) = x0 + sigma eps."""

from __future__ import annotations

import torch

from ..noise import Generators, randn_like
from .common import Callback, DenoiseFn, ancestral_step, check_sigmas, denoise_at, report


def _posterior_walk(
    denoise: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    eta: float,
    generator: Generators,
    callback: Callback | None,
) -> torch.Tensor:
    """x_next = x0 + sqrt(sigma_next^2 - sigma_up^2) eps_hat + sigma_up z, eps_hat = (x - x0) / sigma."""
    sigmas = check_sigmas(x, sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise_at(denoise, x, sigma)
        report(callback, i, x, x0, sigma)
        eps = (x - x0) / sigma  # (B, C, H, W)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x0 + sigma_down * eps
        if eta > 0:
            x = x + sigma_up * randn_like(x, generator)
    return x


def sample_ddim(
    denoise: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_next = x0 + sqrt(sigma_next^2 - s^2) eps_hat + s z with
    s = eta sigma_next sqrt(sigma^2 - sigma_next^2) / sigma; eta = 0 is deterministic, eta = 1 is DDPM."""
    return _posterior_walk(denoise, x, sigmas, eta, generator, callback)


def sample_ddpm(
    denoise: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral DDPM (Ho et al. 2020, eq. 6-7, "fixed small" variance) over the grid: x_next ~ q(x_next | x, x0)
    with mean x0 + (sigma_next^2 / sigma^2)(x - x0) and variance sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2."""
    return _posterior_walk(denoise, x, sigmas, 1.0, generator, callback)
