"""Noise schedules as pure functions on tensors: betas, alphas_cumprod, sigmas, Karras grids, timestep spacings.

Conventions: a discrete-time model has timesteps t = 0 .. N-1 with cumulative signal fractions alphas_cumprod
(`abar_t`, decreasing in t). In the variance-exploding view every sampler uses, x_sigma = x0 + sigma * eps with
sigma_t = sqrt((1 - abar_t) / abar_t), so x_sigma = x_t / sqrt(abar_t) for the VP latent x_t. Tables are float64;
sampling grids run from high to low noise and end with a final 0.
"""

from __future__ import annotations

import math

import torch

from ..config import DiffusionConfig
from ..errors import InputError

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
SPACINGS = ("leading", "trailing", "linspace")


# --- betas and alphas_cumprod ---------------------------------------------------------------------------------------


def cosine_betas(n: int, max_beta: float = 0.999, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021: abar(t) = cos^2(((t/N + s) / (1 + s)) * pi/2),
    beta_t = min(1 - abar(t+1)/abar(t), max)."""

    def abar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], dtype=torch.float64)


def betas_for(schedule: str, n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Betas (N,) float64: "linear" (Ho et al. 2020), "scaled_linear" (Stable Diffusion: a linspace of sqrt(beta),
    squared) or "cosine" (Nichol & Dhariwal 2021, capped at 0.999)."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    if schedule == "cosine":
        return cosine_betas(n)
    raise InputError(f"unknown beta schedule {schedule!r}; use one of {', '.join(BETA_SCHEDULES)}")


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s <= t} (1 - beta_s), shape (N,), in float64."""
    return torch.cumprod(1 - betas.double(), dim=0)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(abar) so that abar_{N-1} = 0 and abar_0 is unchanged."""
    sqrt_abar = alphas_cumprod(betas).sqrt()  # (N,)
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def sigmas_from_alphas_cumprod(abar: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t); abar_t = 0 (zero terminal SNR) gives sigma = inf."""
    abar = abar.double()
    return torch.where(abar > 0, ((1 - abar) / abar.clamp_min(1e-300)).sqrt(), torch.full_like(abar, math.inf))


def schedule_from_config(cfg: DiffusionConfig) -> torch.Tensor:
    """The discrete training sigmas (N,) float64, increasing in t, of an eps / v model's configuration."""
    if cfg.parameterisation == "edm":
        raise InputError(
            "an EDM model has a continuous sigma range, not a discrete schedule; use "
            "karras_sigmas(steps, cfg.sigma_min, cfg.sigma_max) or set parameterisation to eps or v"
        )
    if cfg.parameterisation == "flow":
        raise InputError(
            "a flow model has a continuous time t in (0, 1), not a discrete schedule; build its grid with "
            "make_denoiser(backbone, cfg).sigmas(steps) or set parameterisation to eps or v"
        )
    betas = betas_for(cfg.schedule, cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
    if cfg.zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return sigmas_from_alphas_cumprod(alphas_cumprod(betas))


# --- continuous grids -----------------------------------------------------------------------------------------------


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 eq. 5: sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho,
    then 0; (n+1,)."""
    if n < 1:
        raise InputError(f"steps {n} must be at least 1")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((hi + ramp * (lo - hi)) ** rho)


# --- timesteps <-> sigmas -------------------------------------------------------------------------------------------


def sigma_to_t(sigma: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Fractional timestep of `sigma` (any shape) by linear interpolation of log sigma over the increasing training
    `table` (N,); a sigma equal to table[k] gives exactly k; values outside the table clamp to 0 or N-1."""
    log_table = table.double().to(sigma.device).log()  # (N,)
    log_sigma = sigma.double().log()
    lo = (torch.searchsorted(log_table, log_sigma.reshape(-1), right=True) - 1).clamp(0, len(table) - 2)
    lo = lo.reshape(sigma.shape)
    w = ((log_sigma - log_table[lo]) / (log_table[lo + 1] - log_table[lo])).clamp(0, 1)
    w = torch.nan_to_num(w, nan=1.0)  # inf - inf at a zero-terminal-SNR end: the top of the table
    return (1 - w) * lo + w * (lo + 1)


def t_to_sigma(t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """sigma at fractional timesteps `t` by linear interpolation in log sigma over `table` (N,); integer t is exact."""
    t = t.double().clamp(0, len(table) - 1)
    log_table = table.double().to(t.device).log()
    table = table.double().to(t.device)
    lo = t.floor().long().clamp(max=len(table) - 2)
    w = t - lo
    between = ((1 - w) * log_table[lo] + w * log_table[lo + 1]).exp()
    return torch.where(w == 0, table[lo], torch.where(w == 1, table[lo + 1], between))


def spaced_timesteps(
    steps: int, num_timesteps: int = 1000, spacing: str = "trailing", steps_offset: int = 0
) -> torch.Tensor:
    """Descending timesteps (steps,) float64 as diffusers' DDIM / DDPM / Euler schedulers space them (Lin et al.
    2023, Table 2): "leading" k * (N // n) + steps_offset, "trailing" round(N - k * N / n) - 1, "linspace"
    linspace(0, N-1, n) (unrounded as Euler; DDIM and DDPM round it). DPM-Solver's "linspace" / "leading" are these
    with steps + 1 points and the last (lowest) dropped."""
    if steps < 1 or steps > num_timesteps:
        raise InputError(f"steps {steps} must be between 1 and the {num_timesteps} training timesteps")
    n, N = steps, num_timesteps
    if spacing == "leading":
        return (torch.arange(n, dtype=torch.float64) * (N // n)).flip(0) + steps_offset
    if spacing == "trailing":
        return torch.round(N - torch.arange(n, dtype=torch.float64) * (N / n)) - 1
    if spacing == "linspace":
        return torch.linspace(0, N - 1, n, dtype=torch.float64).flip(0)
    raise InputError(f"unknown timestep spacing {spacing!r}; use one of {', '.join(SPACINGS)} (or karras)")


def discrete_sigmas(
    table: torch.Tensor, steps: int, spacing: str = "trailing", steps_offset: int = 0, rho: float = 7.0
) -> torch.Tensor:
    """A sampling grid (steps + 1,) float32 ending in 0 for a discrete model with training sigmas `table` (N,):
    the sigmas of spaced timesteps, or a Karras grid between the table's ends (spacing "karras")."""
    if spacing == "karras":
        out = karras_sigmas(steps, float(table[0]), float(table[-1]), rho)
    else:
        ts = spaced_timesteps(steps, len(table), spacing, steps_offset).clamp(0, len(table) - 1)
        out = append_zero(t_to_sigma(ts, table))
    return out.float()
