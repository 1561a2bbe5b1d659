"""Euler, Euler ancestral and Heun samplers of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma."""

from __future__ import annotations

import torch

from ..noise import Generators, randn_like
from .common import Callback, DenoiseFn, ancestral_step, check_sigmas, denoise_at, report


def sample_euler(
    denoise: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler's method (Karras et al. 2022, Algorithm 2 without churn): x <- x + (sigma_next - sigma) d,
    d = (x - D(x, sigma)) / sigma. Equals deterministic DDIM in sigma space."""
    sigmas = check_sigmas(x, sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise_at(denoise, x, sigma)
        report(callback, i, x, x0, sigma)
        d = (x - x0) / sigma  # (B, C, H, W)
        x = x + d * (sigma_next - sigma)
    return x


def sample_euler_ancestral(
    denoise: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    eta: float = 1.0,
) -> torch.Tensor:
    """Ancestral Euler (k-diffusion's sample_euler_ancestral): an Euler step to sigma_down, then fresh noise of
    std sigma_up (see `ancestral_step`); eta scales the noise (0 gives Euler)."""
    sigmas = check_sigmas(x, sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise_at(denoise, x, sigma)
        report(callback, i, x, x0, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + (x - x0) / sigma * (sigma_down - sigma)
        noise = randn_like(x, generator)  # drawn every step, so the stream matches diffusers' step for step
        x = x + noise * sigma_up
    return x


def sample_heun(
    denoise: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1 without churn); the last step to sigma = 0 is an
    Euler step. Two denoiser calls per step except the last."""
    sigmas = check_sigmas(x, sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise_at(denoise, x, sigma)
        report(callback, i, x, x0, sigma)
        d = (x - x0) / sigma
        x_euler = x + d * (sigma_next - sigma)
        if float(sigma_next) == 0:
            x = x_euler
            continue
        d_next = (x_euler - denoise_at(denoise, x_euler, sigma_next)) / sigma_next
        x = x + (d + d_next) / 2 * (sigma_next - sigma)
    return x
