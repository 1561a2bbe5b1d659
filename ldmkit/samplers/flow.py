"""The rectified-flow sampler in the flow's own variables: x_t = (1 - t) x0 + t eps, velocity v = dx_t / dt."""

from __future__ import annotations

import torch

from ..noise import Generators
from .common import Callback, DenoiseFn, check_sigmas, denoise_at, report


def sample_flow_euler(
    denoise: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler's method on the flow ODE dx_t/dt = v (Esser et al. 2024; diffusers' FlowMatchEulerDiscreteScheduler):
    x_t <- x_t + (t_next - t) v with v = (x_t - D) / t, at t = sigma / (1 + sigma) and x_t = x / (1 + sigma). x comes
    in and goes out in sigma space, as with every sampler. In exact arithmetic these are the steps of `sample_euler`
    (both are DDIM on this path); this form is the flow's own and checks the sigma-space view."""
    sigmas = check_sigmas(x, sigmas)
    ts = sigmas / (1 + sigmas)  # (steps + 1,)
    x_t = x / (1 + sigmas[0])  # (B, C, H, W)
    for i in range(len(sigmas) - 1):
        sigma, t, t_next = sigmas[i], ts[i], ts[i + 1]
        x_sigma = x_t * (1 + sigma)
        x0 = denoise_at(denoise, x_sigma, sigma)
        report(callback, i, x_sigma, x0, sigma)
        v = (x_t - x0) / t  # eps - x0
        x_t = x_t + (t_next - t) * v
    return x_t * (1 + sigmas[-1])
