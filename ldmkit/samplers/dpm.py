"""DPM-Solver++ multistep samplers (Lu et al. 2022), in sigma space: lambda = -log sigma, h = lambda_next - lambda."""

from __future__ import annotations

import torch

from ..errors import InputError
from ..noise import Generators, randn_like
from .common import Callback, DenoiseFn, check_sigmas, denoise_at, report


def sample_dpmpp_2m(
    denoise: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): x_next = (sigma_next / sigma) x - (e^{-h} - 1) D_hat with
    D_hat = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1} / h; first order on the first step and on the last step
    to sigma = 0 (where it returns D)."""
    sigmas = check_sigmas(x, sigmas)
    x0_prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise_at(denoise, x, sigma)
        report(callback, i, x, x0, sigma)
        if float(sigma_next) == 0:
            x = x0
            continue
        h = sigma.log() - sigma_next.log()  # lambda_next - lambda
        d = x0
        if x0_prev is not None:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = (sigma_next / sigma) * x - torch.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


def sample_dpmpp_2m_sde(
    denoise: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    solver: str = "midpoint",
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, sec. 5 / diffusers' "sde-dpmsolver++"):
    x_next = (sigma_next / sigma) e^{-eta h} x + phi D + c D1 + sigma_next sqrt(1 - e^{-2 eta h}) z,
    phi = 1 - e^{-(1+eta) h}, D1 = (D - D_prev) / r, r = h_prev / h, and c = phi / 2 ("midpoint", as diffusers)
    or 1 - phi / ((1+eta) h) ("heun"); first order on the first step, D itself on the last step to sigma = 0;
    eta = 0 is the deterministic 2M solver."""
    if solver not in ("midpoint", "heun"):
        raise InputError(f"unknown dpmpp_2m_sde solver {solver!r}; use 'midpoint' (as diffusers) or 'heun'")
    sigmas = check_sigmas(x, sigmas)
    x0_prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise_at(denoise, x, sigma)
        report(callback, i, x, x0, sigma)
        noise = randn_like(x, generator)  # drawn every step, so the stream matches diffusers' step for step
        if float(sigma_next) == 0:
            x = x0
            continue
        h = sigma.log() - sigma_next.log()
        eta_h = eta * h
        phi = -torch.expm1(-h - eta_h)  # 1 - e^{-(1+eta) h}
        x = (sigma_next / sigma) * torch.exp(-eta_h) * x + phi * x0
        if x0_prev is not None:
            d1 = (x0 - x0_prev) / (h_prev / h)
            coeff = 0.5 * phi if solver == "midpoint" else 1 - phi / (h + eta_h)
            x = x + coeff * d1
        if eta > 0:
            x = x + sigma_next * (-torch.expm1(-2 * eta_h)).sqrt() * noise
        x0_prev, h_prev = x0, h
    return x
