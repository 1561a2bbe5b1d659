"""Pieces every sampler shares: the per-step sigma batch, the callback, the ancestral split of a step."""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import InputError

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B,C,H,W), sigma (B,)) -> x0 (B,C,H,W)
Callback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]  # (i, x, x0_pred, sigma)


def check_sigmas(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """sigmas as a 1-D float tensor on x's device, at least two long."""
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise InputError(
            f"sigmas must be a 1-D tensor of at least 2 noise levels ending in 0, got shape "
            f"{tuple(sigmas.shape)}; build one with denoiser.sigmas(steps)"
        )
    return sigmas.to(device=x.device, dtype=torch.float32)


def denoise_at(denoise: DenoiseFn, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """D(x, sigma) with sigma (a 0-d tensor) broadcast to the batch (B,)."""
    return denoise(x, sigma.expand(x.shape[0]))


def report(callback: Callback | None, i: int, x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> None:
    """callback(i, x, x0_pred, sigma): the state at step i (before its update) and its x0 prediction."""
    if callback is not None:
        callback(i, x, x0, sigma)


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0):
    """Split a step sigma -> sigma_next into a deterministic part to sigma_down and fresh noise of std sigma_up with
    sigma_down^2 + sigma_up^2 = sigma_next^2, sigma_up = eta * sigma_next sqrt(sigma^2 - sigma_next^2) / sigma.
    At eta = 1 this is the DDPM posterior q(x_next | x, x0) (Ho et al. 2020, eq. 7) in sigma space; the same
    sigma_up is DDIM's sigma_t(eta) (Song et al. 2021, eq. 16) divided by sqrt(abar_next)."""
    if eta == 0 or float(sigma_next) == 0:
        return sigma_next, torch.zeros_like(sigma_next)
    up = eta * sigma_next * (sigma**2 - sigma_next**2).clamp_min(0).sqrt() / sigma
    up = torch.minimum(up, sigma_next)
    return (sigma_next**2 - up**2).clamp_min(0).sqrt(), up
