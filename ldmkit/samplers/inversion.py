"""Deterministic DDIM inversion (Song et al. 2021, sec. 4.3; Dhariwal & Nichol 2021, appendix F), in sigma space:
x = x_t / sqrt(abar_t) = x0 + sigma eps, where DDIM (eta = 0) is Euler's method on the probability-flow ODE
dx / dsigma = eps(x, sigma) = (x - D(x, sigma)) / sigma for every parameterisation (eps, v, EDM, flow).

DDIM's step down from sigma_next to sigma is x = x_next + (sigma - sigma_next) eps(x_next, sigma_next). Inversion
runs the grid upward and solves that step for x_next:

    x_next = x + (sigma_next - sigma) eps(x_next, sigma_next),

which is implicit in x_next. The usual inversion takes eps at the point it already has, eps(x, sigma) (x_next's
first guess); a few fixed-point iterations of the equation then make the walk the exact inverse of the DDIM
sampler, so that `sample_ddim` from the result returns x0 up to the iteration's residual (Pan et al. 2023,
"Effective Real Image Editing with Accelerated Iterative Diffusion Inversion"). Not a sampler:
it walks the sigmas upward.

The same equation has a second form, x_next = r x - (r - 1) D(x_next, sigma_next) with r = sigma_next / sigma
(DDIM's step as x = x_next / r + (1 - 1 / r) D). With lambda = dD/dx, iterating the eps form contracts by
(1 - 1 / r)(1 - lambda), the D form by (r - 1) lambda: the first fails where D barely depends on x (high noise, a
cosine schedule's top sigma 20291, where a plain inversion's error is O(1) in x0), the second where D is nearly x
(low noise, or an untrained model). Each iteration takes the blend a * eps form + (1 - a) * D form with
a = r lambda / (1 - lambda + r lambda), which cancels the contraction for a scalar lambda; lambda starts at the
Gaussian denoiser's 1 / (sigma_next^2 + 1) and is then measured per sample by the secant of the last two
evaluations (a one-dimensional Anderson acceleration). Both forms share the one model call an iteration makes.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .common import Callback, DenoiseFn, check_sigmas, denoise_at, report


def invert_ddim(
    denoise: DenoiseFn,
    x0: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    iterations: int = 2,
    callback: Callback | None = None,
) -> torch.Tensor:
    """The latent x at sigmas[0] from which deterministic DDIM over `sigmas` returns x0 (B, C, H, W).

    sigmas: the sampling grid (decreasing, ending in 0) the result will be sampled on; it is walked from its end
    upward. iterations: fixed-point iterations per step after the first evaluation (0: the plain inversion, one
    model call a step; each iteration adds one). callback(i, x, x0_pred, sigma) is called once per step with the
    state reached: x at sigma = sigmas[-2 - i] and the prediction it was reached with."""
    sigmas = check_sigmas(x0, sigmas)
    if float(sigmas[-1]) != 0.0 or not bool((sigmas[:-1] > sigmas[1:]).all()):
        raise InputError("inversion walks a sampling grid that decreases to 0; build one with denoiser.sigmas(steps)")
    if iterations < 0:
        raise InputError(f"iterations {iterations} is negative; use 0 (plain inversion) or more")
    up = sigmas.flip(0)  # (steps + 1,), increasing from 0
    x = x0
    for i in range(len(up) - 1):
        sigma, sigma_next = up[i], up[i + 1]
        # the first guess takes eps where the walk is (at sigma 0, where eps is undefined: at sigma_next)
        at = sigma if float(sigma) > 0 else sigma_next
        pred = denoise_at(denoise, x, at)
        guess = x + (sigma_next - sigma) * (x - pred) / at
        lam = torch.full_like(x[:, :1, :1, :1], 1 / (float(sigma_next) ** 2 + 1))  # (B, 1, 1, 1): dD/dx
        last = None
        for _ in range(iterations):  # then the implicit step, to its fixed point
            pred = denoise_at(denoise, guess, sigma_next)  # (B, C, H, W)
            if last is not None:
                lam = _secant(guess - last[0], pred - last[1], lam)
            last = guess, pred
            eps_form = x + (sigma_next - sigma) * (guess - pred) / sigma_next
            if float(sigma) == 0:
                guess = eps_form
                continue
            r = sigma_next / sigma
            a = r * lam / (1 - lam + r * lam)
            guess = a * eps_form + (1 - a) * (r * x - (r - 1) * pred)
        x = guess
        report(callback, i, x, pred, sigma_next)
    return x


def _secant(dx: torch.Tensor, dd: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """dD/dx per sample (B, 1, 1, 1) as <dD, dx> / <dx, dx>, in [0, 1]; `lam` where dx is 0."""
    num, den = (dd * dx).flatten(1).sum(1), (dx * dx).flatten(1).sum(1)  # (B,)
    est = torch.where(den > 0, num / den.clamp_min(1e-30), lam.flatten())
    return est.clamp(0, 1).view_as(lam)
