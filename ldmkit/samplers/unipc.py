"""UniPC (Zhao et al. 2023), the unified predictor-corrector solver, in data-prediction form and sigma space.

With lambda = -log sigma, a step from sigma_s to sigma_t has h = lambda_t - lambda_s and starts from the first-order
(DPM-Solver++) update (sigma_t / sigma_s) x_s - (e^{-h} - 1) D_s. Older evaluations D_{s_m} enter as the divided
differences D_m / r_m, D_m = D_{s_m} - D_s, r_m = (lambda_{s_m} - lambda_s) / h, weighted by B(h) and the coefficients
a that solve R_p a = g_p(h) / B(h): R_p[k, m] = r_m^k, g_p[k] = (k+1)! h phi_{k+2}(-h) (h's sign flipped for data
prediction, phi_1(z) = (e^z - 1) / z, phi_{k+1}(z) = (phi_k(z) - 1/k!) / z), and B(h) = -h ("bh1") or e^{-h} - 1
("bh2"). The predictor UniP-p uses the p - 1 older points; the corrector UniC-p refines the predicted x_t with the
evaluation at x_t itself (r_p = 1), which the next step needs anyway, so a step costs one evaluation and the
corrector raises the order by one.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import InputError
from ..noise import Generators
from .common import Callback, DenoiseFn, check_sigmas, denoise_at, report

VARIANTS = ("bh1", "bh2")


def _g_over_b(h: float, p: int, variant: str) -> tuple[list[float], float]:
    """(g_p(h) / B(h) as p floats, B(h)) for the data-prediction form, hh = -h."""
    hh = -h
    b_h = hh if variant == "bh1" else math.expm1(hh)
    hh_phi = math.expm1(hh) / hh - 1  # hh phi_2(hh)
    g, factorial = [], 1
    for k in range(1, p + 1):
        g.append(hh_phi * factorial / b_h)  # k! hh phi_{k+1}(hh) / B(h)
        factorial *= k + 1
        hh_phi = hh_phi / hh - 1 / factorial  # hh phi_{k+2}(hh)
    return g, b_h


def _solve(rs: list[float], g: list[float]) -> list[float]:
    """a with sum_m a_m r_m^k = g[k], k = 0..len(rs)-1 (the Vandermonde system R a = g)."""
    r = torch.tensor(rs, dtype=torch.float64)
    R = torch.stack([r**k for k in range(len(rs))])  # (p, p)
    return torch.linalg.solve(R, torch.tensor(g, dtype=torch.float64)).tolist()


def _uni_update(
    x: torch.Tensor,
    sigma_t: torch.Tensor,
    past: Sequence[tuple[torch.Tensor, torch.Tensor]],
    variant: str,
    d_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """UniP-p (d_t None) or UniC-p (d_t = D(x_t, sigma_t)) from x at past[0]'s sigma to sigma_t, p = len(past);
    past: (sigma, D) pairs, newest first. Orders 2 (UniP) and 1 (UniC) take a = 1/2, as the paper's solver does."""
    (sigma_s, d_s), p = past[0], len(past)
    lam_s = -math.log(float(sigma_s))
    h = math.log(float(sigma_s)) - math.log(float(sigma_t))
    rs = [(-math.log(float(s)) - lam_s) / h for s, _ in past[1:]]  # r_m, m = 1..p-1
    diffs = [(d - d_s) / r for (_, d), r in zip(past[1:], rs)]  # D_m / r_m
    g, b_h = _g_over_b(h, p, variant)
    if d_t is None:
        a = [0.5] if p == 2 else (_solve(rs, g[: p - 1]) if p > 2 else [])
    else:
        a = [0.5] if p == 1 else _solve(rs + [1.0], g)
        diffs = diffs + [d_t - d_s]  # r_p = 1
    x_t = (float(sigma_t) / float(sigma_s)) * x - math.expm1(-h) * d_s
    for a_m, diff in zip(a, diffs):
        x_t = x_t - (b_h * a_m) * diff
    return x_t


def sample_unipc(
    denoise: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    order: int = 2,
    variant: str = "bh2",
    lower_order_final: bool = True,
    disable_corrector: Sequence[int] = (),
) -> torch.Tensor:
    """UniPC-p (Zhao et al. 2023, Algorithm 2 with B(h) = e^{-h} - 1 ("bh2") or -h ("bh1")): step i corrects x_i by
    UniC with D(x_i) unless i - 1 is in disable_corrector, then predicts x_{i+1} by UniP of order
    min(order, i + 1, and with lower_order_final the steps left); the step to sigma = 0 returns D.
    order: 1 to 3 (2 is diffusers' default; the paper advises 3 unguided, 2 guided)."""
    if order not in (1, 2, 3):
        raise InputError(f"UniPC order {order} is not supported; use 1, 2 or 3")
    if variant not in VARIANTS:
        raise InputError(f"unknown UniPC variant {variant!r}; use 'bh2' (as diffusers) or 'bh1'")
    sigmas = check_sigmas(x, sigmas)
    steps = len(sigmas) - 1
    past: list[tuple[torch.Tensor, torch.Tensor]] = []  # (sigma, D), newest first, at most `order` long
    x_prev, p_prev = None, 0  # x where the last prediction started, and its order
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise_at(denoise, x, sigma)
        report(callback, i, x, x0, sigma)
        # corrector: refine the predicted x_i with D(x_i)
        if x_prev is not None and (i - 1) not in disable_corrector:
            x = _uni_update(x_prev, sigma, past[:p_prev], variant, d_t=x0)
        past = [(sigma, x0)] + past[: order - 1]
        if float(sigma_next) == 0:
            x = x0
            continue
        # predictor: x_{i+1} from x_i and the last p evaluations
        p = min(order, len(past), steps - i if lower_order_final else order)
        x_prev, p_prev = x, p
        x = _uni_update(x, sigma_next, past[:p], variant)
    return x


def sample_unipc_bh1(
    denoise: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    order: int = 2,
    lower_order_final: bool = True,
    disable_corrector: Sequence[int] = (),
) -> torch.Tensor:
    """UniPC-p with B(h) = -h (Zhao et al. 2023, "bh1"; the paper's choice for unconditional sampling at few
    steps); otherwise as `sample_unipc`."""
    return sample_unipc(
        denoise,
        x,
        sigmas,
        generator=generator,
        callback=callback,
        order=order,
        variant="bh1",
        lower_order_final=lower_order_final,
        disable_corrector=disable_corrector,
    )
