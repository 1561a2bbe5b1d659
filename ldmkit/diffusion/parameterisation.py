"""Parameterisations: a backbone F becomes a denoiser D(x, sigma, cond) ~ E[x0 | x], and owns its training loss.

Every wrapper follows Karras et al. 2022 (EDM), eq. 7:
    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), cond)
with x = x0 + sigma * eps. The loss is the mean squared error of F against its target
F* = (x0 - c_skip x) / c_out (the noise for eps, the velocity for v), so one set of samplers serves every model.

- `EpsDenoiser`: discrete-time noise prediction (DDPM / Stable Diffusion 1.x): c_skip = 1, c_out = -sigma,
  c_in = 1 / sqrt(sigma^2 + 1), c_noise = the fractional timestep of sigma.
- `VDenoiser`: discrete-time v-prediction (Salimans & Ho 2022, Stable Diffusion 2.x), sigma_data = 1:
  c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1), c_in = 1 / sqrt(sigma^2 + 1).
- `EDMDenoiser`: continuous sigma with EDM's preconditioning and c_noise = log(sigma) / 4.
- `FlowDenoiser`: rectified flow, x_t = (1 - t) x0 + t eps with a velocity target (Esser et al. 2024). In sigma
  space x = x_t / (1 - t), sigma = t / (1 - t): c_skip = 1 - t, c_out = -t, c_in = 1 - t = 1 / (1 + sigma),
  c_noise = 1000 t; the backbone sees x_t itself and predicts v = eps - x0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..conditioning.types import Conditioning
from ..config import DiffusionConfig
from ..errors import InputError
from ..nn.invariant import batch_invariant
from ..noise import Generators, randn_like
from .schedules import discrete_sigmas, karras_sigmas, schedule_from_config, sigma_to_t

PARAMETERISATIONS = ("eps", "v", "edm", "flow")
FLOW_T_MAX = 0.999  # a flow grid's first t (before the shift): t = 1 is sigma = inf, which sigma space cannot hold
ZERO_SNR_ABAR = 2.0**-24  # abar used for a zero-terminal-SNR last timestep, as diffusers' schedulers do
# The highest sigma an eps model's sampling grid starts from: Stable Diffusion's start (its last sigma is 14.615).
# The first x0 estimate is x - sigma * eps_theta, so an error in eps_theta reaches it multiplied by the start sigma:
# the cosine schedule's last sigma is 20291 (abar 2.4e-9), a zero-terminal-SNR schedule's 4096, DDPM's linear
# betas' 157. A schedule that ends higher starts at its last sigma at or below this one instead (the data's share of
# x there is 1 / sigma, 7%, as in Stable Diffusion). scaled_linear models sample exactly as before. Measured in
# benchmarks/RESULTS.md, "eps-prediction and the schedule's last sigma".
EPS_START_SIGMA_MAX = 14.7


def _bcast(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) matching x's rank, in float32 on x's device."""
    return c.to(device=x.device, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))


def _uniform_like(n: int, generator: Generators, draw) -> torch.Tensor:
    """n draws of `draw(size, generator)`, one per generator when given a list (per-sample seeding)."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([draw(1, g) for g in generator])
    return draw(n, generator)


class Denoiser(nn.Module):
    """Preconditioned denoiser D(x, sigma, cond) = c_skip x + c_out F(c_in x, c_noise, cond) (EDM eq. 7)."""

    def __init__(self, backbone: nn.Module, min_snr_gamma: float = 0.0, sigma_data: float = 1.0):
        """backbone: called as backbone(x_in (B,C,H,W), c_noise (B,), cond) -> (B,C,H,W);
        min_snr_gamma: min-SNR-gamma loss weighting (Hang et al. 2023), 0 disables it;
        sigma_data: the standard deviation of the data (latents) the preconditioning assumes."""
        super().__init__()
        self.backbone = backbone
        self.min_snr_gamma = float(min_snr_gamma)
        self.sigma_data = float(sigma_data)

    # --- to be defined by each parameterisation ------------------------------------------------------------------
    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in), each (B,) float64, for sigma (B,)."""
        raise NotImplementedError

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        """The noise level (B,) float32 as the backbone sees it."""
        raise NotImplementedError

    def sample_training_sigma(self, n: int, generator: Generators = None) -> torch.Tensor:
        """n training noise levels (n,) float64 on the CPU."""
        raise NotImplementedError

    def sigmas(self, steps: int, spacing: str = "karras", **options) -> torch.Tensor:
        """A sampling grid (steps + 1,) float32, decreasing, ending in 0."""
        raise NotImplementedError

    sigma_min: float
    sigma_max: float

    # --- shared ---------------------------------------------------------------------------------------------------
    def _sigma_batch(self, sigma, x: torch.Tensor) -> torch.Tensor:
        """sigma as a float, a 0-d tensor or (B,) -> (B,) on x's device (float64 kept for exact timestep lookup)."""
        s = torch.as_tensor(sigma, device=x.device)
        s = s if s.dtype == torch.float64 else s.float()
        if s.ndim == 0:
            s = s.expand(x.shape[0])
        if s.shape != (x.shape[0],):
            raise InputError(
                f"sigma has shape {tuple(s.shape)} for a batch of {x.shape[0]}; pass a number or one sigma per sample"
            )
        return s

    def forward(self, x: torch.Tensor, sigma, cond: Conditioning | None = None) -> torch.Tensor:
        """D(x, sigma, cond): the denoised estimate of x0, same shape and dtype as x (B, C, H, W)."""
        sigma = self._sigma_batch(sigma, x)  # (B,)
        c_skip, c_out, c_in = (_bcast(c, x) for c in self.scalings(sigma.double()))
        with batch_invariant(x.device):  # sample i's numbers do not depend on the batch (CPU inference)
            f = self.backbone((x.float() * c_in).to(x.dtype), self.c_noise(sigma).to(x.device), cond or Conditioning())
        return (c_skip * x.float() + c_out * f.float()).to(x.dtype)

    def prediction(self, x: torch.Tensor, sigma, denoised: torch.Tensor) -> torch.Tensor:
        """The backbone's output F that gives `denoised` at (x, sigma): F = (D - c_skip x) / c_out (eps, v, ...)."""
        sigma = self._sigma_batch(sigma, x)
        c_skip, c_out, _ = (_bcast(c, x) for c in self.scalings(sigma.double()))
        return ((denoised.float() - c_skip * x.float()) / c_out).to(x.dtype)

    def from_prediction(self, x: torch.Tensor, sigma, f: torch.Tensor) -> torch.Tensor:
        """D = c_skip x + c_out F: the inverse of `prediction`."""
        sigma = self._sigma_batch(sigma, x)
        c_skip, c_out, _ = (_bcast(c, x) for c in self.scalings(sigma.double()))
        return (c_skip * x.float() + c_out * f.float()).to(x.dtype)

    def snr(self, sigma: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio sigma_data^2 / sigma^2 (= abar / (1 - abar) for discrete models)."""
        return self.sigma_data**2 / sigma.double() ** 2

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """Weight (B,) of the F-space MSE. Min-SNR-gamma (Hang et al. 2023) weights the x0-space error by
        min(SNR, gamma); since |F - F*|^2 = |D - x0|^2 / c_out^2 that is min(SNR, gamma) c_out^2 / sigma_data^2:
        min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v and EDM."""
        if self.min_snr_gamma <= 0:
            return torch.ones_like(sigma, dtype=torch.float64)
        _, c_out, _ = self.scalings(sigma.double())
        return self.snr(sigma).clamp(max=self.min_snr_gamma) * c_out**2 / self.sigma_data**2

    def loss(self, x0: torch.Tensor, cond: Conditioning | None = None, generator: Generators = None) -> torch.Tensor:
        """Per-sample training loss (B,): w(sigma) * mean |F(c_in x, c_noise, cond) - F*|^2, x = x0 + sigma eps."""
        sigma = self.sample_training_sigma(x0.shape[0], generator)  # (B,) float64, CPU
        noise = randn_like(x0.float(), generator)  # (B, C, H, W)
        s = _bcast(sigma, x0)
        x = x0.float() + s * noise
        c_skip, c_out, c_in = (_bcast(c, x0) for c in self.scalings(sigma))
        f = self.backbone((x * c_in).to(x0.dtype), self.c_noise(sigma).to(x0.device), cond or Conditioning())
        target = (x0.float() - c_skip * x) / c_out
        mse = ((f.float() - target) ** 2).flatten(1).mean(1)  # (B,)
        return mse * self.loss_weight(sigma).to(device=x0.device, dtype=torch.float32)


class DiscreteDenoiser(Denoiser):
    """A model trained on N discrete timesteps: sigma is mapped to a fractional timestep for the backbone."""

    start_sigma_max = math.inf  # sampling grids start at the schedule's last sigma at or below this

    def __init__(self, backbone: nn.Module, table: torch.Tensor, min_snr_gamma: float = 0.0):
        """backbone: see `Denoiser`; table: the training sigmas (N,), increasing in t (a last sigma of inf, zero
        terminal SNR, is replaced by the sigma of abar = 2^-24 so that sampling starts from a finite level);
        min_snr_gamma: min-SNR-gamma weighting, 0 disables it."""
        super().__init__(backbone, min_snr_gamma, sigma_data=1.0)
        finite = math.sqrt((1 - ZERO_SNR_ABAR) / ZERO_SNR_ABAR)
        table = table.double().cpu()
        self.table = torch.where(torch.isinf(table), torch.full_like(table, finite), table)  # (N,), CPU, float64
        self.table32 = self.table.float()  # the values samplers receive, for exact timestep lookup

    @property
    def num_timesteps(self) -> int:
        return len(self.table)

    @property
    def sigma_min(self) -> float:
        return float(self.table[0])

    @property
    def sigma_max(self) -> float:
        """The first sigma of every sampling grid: the schedule's last at or below `start_sigma_max`."""
        return float(self.table[self.sampled_timesteps - 1])

    @property
    def sampled_timesteps(self) -> int:
        """How many of the schedule's timesteps, from t = 0, sampling grids are spaced over (at least 2)."""
        return max(2, int((self.table <= self.start_sigma_max).sum()))

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep (B,) float64 of sigma by log-sigma interpolation; a sigma equal to a schedule sigma
        (in float64, or its float32 rounding) gives exactly its integer timestep."""
        s = sigma.detach().cpu()
        t = sigma_to_t(s, self.table)
        hit = s.float()[:, None] == self.table32[None, :]  # (B, N)
        return torch.where(hit.any(1), hit.float().argmax(1).double(), t)

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.timestep(sigma).float()

    def sample_training_sigma(self, n: int, generator: Generators = None) -> torch.Tensor:
        """sigma_t with t ~ U{0, ..., N-1}."""
        t = _uniform_like(n, generator, lambda k, g: torch.randint(0, self.num_timesteps, (k,), generator=g))
        return self.table[t]

    def sigmas(self, steps: int, spacing: str = "trailing", steps_offset: int = 1, rho: float = 7.0) -> torch.Tensor:
        """Sampling grid (steps + 1,): spaced timesteps ("trailing", "leading" with steps_offset as Stable Diffusion,
        "linspace") or "karras" (rho) between the schedule's ends; always ending in 0. The grid is spaced over the
        first `sampled_timesteps` timesteps only (all of them unless `start_sigma_max` bounds the start)."""
        k = self.sampled_timesteps
        if spacing != "karras" and k < self.num_timesteps and steps > k:
            raise InputError(
                f"steps {steps} is more than the {k} timesteps sampling uses: it starts at sigma {self.sigma_max:.4g} "
                f"(timestep {k - 1}), not at the schedule's last {self.table[-1]:.4g}, where an eps model's error is "
                f"multiplied by sigma; use at most {k} steps"
            )
        return discrete_sigmas(self.table[:k], steps, spacing, steps_offset, rho)


class EpsDenoiser(DiscreteDenoiser):
    """Noise prediction (Ho et al. 2020): D = x - sigma eps_theta(x / sqrt(sigma^2 + 1), t(sigma)). Sampling starts
    at sigma EPS_START_SIGMA_MAX at most, since an error in eps_theta reaches D multiplied by sigma."""

    start_sigma_max = EPS_START_SIGMA_MAX

    def scalings(self, sigma):
        one = torch.ones_like(sigma)
        return one, -sigma, 1 / (sigma**2 + 1).sqrt()


class VDenoiser(DiscreteDenoiser):
    """v-prediction (Salimans & Ho 2022): D = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) v_theta(...)."""

    def scalings(self, sigma):
        s2 = sigma**2 + 1
        return 1 / s2, -sigma / s2.sqrt(), 1 / s2.sqrt()


class EDMDenoiser(Denoiser):
    """EDM preconditioning (Karras et al. 2022, Table 1) with log-normal training sigmas."""

    def __init__(
        self,
        backbone: nn.Module,
        sigma_data: float = 1.0,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        min_snr_gamma: float = 0.0,
    ):
        """backbone: see `Denoiser`; sigma_data: data standard deviation; p_mean, p_std: ln sigma ~ N(p_mean,
        p_std^2) in training; sigma_min, sigma_max: the sampling range; min_snr_gamma: 0 disables the weighting."""
        super().__init__(backbone, min_snr_gamma, sigma_data)
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def scalings(self, sigma):
        sd2 = self.sigma_data**2
        return sd2 / (sigma**2 + sd2), sigma * self.sigma_data / (sigma**2 + sd2).sqrt(), 1 / (sigma**2 + sd2).sqrt()

    def c_noise(self, sigma):
        return (sigma.double().log() / 4).float()

    def sample_training_sigma(self, n: int, generator: Generators = None) -> torch.Tensor:
        """ln sigma ~ N(P_mean, P_std^2)."""
        z = _uniform_like(n, generator, lambda k, g: torch.randn(k, generator=g, dtype=torch.float64))
        return (self.p_mean + self.p_std * z).exp()

    def sigmas(self, steps: int, spacing: str = "karras", rho: float = 7.0) -> torch.Tensor:
        """Karras et al. 2022 grid (steps + 1,) between sigma_max and sigma_min, then 0."""
        if spacing != "karras":
            raise InputError(f"an EDM model samples on a Karras grid; use spacing='karras', not {spacing!r}")
        return karras_sigmas(steps, self.sigma_min, self.sigma_max, rho).float()


class FlowDenoiser(Denoiser):
    """Rectified flow (Liu et al. 2023; Esser et al. 2024, sec. 2-3): x_t = (1 - t) x0 + t eps, v_theta ~ eps - x0,
    trained with logit-normal t and sampled in sigma space through sigma = t / (1 - t).

    The resolution shift t' = s t / (1 + (s - 1) t) (Esser et al. eq. 23) is sigma' = s sigma in sigma space, so
    it multiplies every training and sampling sigma by `shift`."""

    def __init__(
        self,
        backbone: nn.Module,
        shift: float = 1.0,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        min_snr_gamma: float = 0.0,
    ):
        """backbone: see `Denoiser`; shift: the resolution shift s (1: none); logit_mean, logit_std: training draws
        logit(t) ~ N(logit_mean, logit_std^2) before the shift; min_snr_gamma: 0 disables the weighting."""
        super().__init__(backbone, min_snr_gamma, sigma_data=1.0)
        self.shift, self.logit_mean, self.logit_std = float(shift), float(logit_mean), float(logit_std)
        self.sigma_max = self.shift * FLOW_T_MAX / (1 - FLOW_T_MAX)

    @property
    def sigma_min(self) -> float:
        """The smallest non-zero sigma of a 1000-step grid."""
        return float(self.sigmas(1000)[-2])

    @staticmethod
    def t_of(sigma: torch.Tensor) -> torch.Tensor:
        """t = sigma / (1 + sigma), the flow time of a sigma-space noise level."""
        return sigma / (1 + sigma)

    def scalings(self, sigma):
        t = self.t_of(sigma)
        return 1 - t, -t, 1 - t

    def c_noise(self, sigma):
        return (1000 * self.t_of(sigma.double())).float()

    def sample_training_sigma(self, n: int, generator: Generators = None) -> torch.Tensor:
        """Logit-normal t (Esser et al. eq. 19), shifted: logit(t) = ln sigma ~ N(m, s^2), then sigma * shift."""
        z = _uniform_like(n, generator, lambda k, g: torch.randn(k, generator=g, dtype=torch.float64))
        return self.shift * (self.logit_mean + self.logit_std * z).exp()

    def sigmas(self, steps: int, spacing: str = "linear", shift: float | None = None) -> torch.Tensor:
        """Sampling grid (steps + 1,): t evenly spaced from FLOW_T_MAX to 0 (diffusers' flow-matching spacing),
        as sigma = t / (1 - t), times the shift (`shift` overrides the model's, e.g. for a larger resolution)."""
        if spacing != "linear":
            raise InputError(f"a flow model samples on a grid linear in t; use spacing='linear', not {spacing!r}")
        if steps < 1:
            raise InputError(f"steps {steps} must be at least 1")
        t = torch.linspace(FLOW_T_MAX, 0, steps + 1, dtype=torch.float64)
        return ((self.shift if shift is None else shift) * t / (1 - t)).float()


def make_denoiser(backbone: nn.Module, cfg: DiffusionConfig) -> Denoiser:
    """The denoiser wrapper `cfg.parameterisation` names, around `backbone`."""
    if cfg.parameterisation in ("eps", "v"):
        cls = EpsDenoiser if cfg.parameterisation == "eps" else VDenoiser
        return cls(backbone, schedule_from_config(cfg), cfg.min_snr_gamma)
    if cfg.parameterisation == "edm":
        return EDMDenoiser(
            backbone, cfg.sigma_data, cfg.p_mean, cfg.p_std, cfg.sigma_min, cfg.sigma_max, cfg.min_snr_gamma
        )
    if cfg.parameterisation == "flow":
        return FlowDenoiser(backbone, cfg.flow_shift, cfg.logit_mean, cfg.logit_std, cfg.min_snr_gamma)
    raise InputError(
        f"unknown parameterisation {cfg.parameterisation!r}; set diffusion.parameterisation to one of "
        f"{', '.join(PARAMETERISATIONS)}"
    )


def use_distilled_grid(denoiser: Denoiser, grid_steps: int) -> Denoiser:
    """Make `denoiser.sigmas(steps)` the grid of a consistency-distilled model (training/consistency.py): for
    steps <= grid_steps, `steps` points of the grid it was distilled along, at indices i * grid_steps // steps
    (LCM's rule, Luo et al. 2023 sec. 4.2), then 0. Every step then lands on a sigma the student learned, and none is
    spent at the grid's sigma_min, where a step changes nothing (a Karras grid ends there). More steps, or a grid
    asked with options (spacing), are the model's own grid."""
    own = denoiser.sigmas

    def sigmas(steps: int, *args, **options) -> torch.Tensor:
        if steps > grid_steps or args or options:
            return own(steps, *args, **options)
        grid = own(grid_steps)  # (grid_steps + 1,), ending in 0
        return torch.cat([grid[(torch.arange(steps) * grid_steps) // steps], grid.new_zeros(1)])

    denoiser.sigmas = sigmas  # an instance attribute: every caller of denoiser.sigmas gets the distilled grid
    return denoiser
