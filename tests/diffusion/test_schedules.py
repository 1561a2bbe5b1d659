"""Noise schedules: closed-form values, zero terminal SNR, timestep <-> sigma round trips, spacings."""

import math

import pytest
import torch

from ldmkit.config import DiffusionConfig
from ldmkit.diffusion.schedules import (
    alphas_cumprod,
    betas_for,
    discrete_sigmas,
    karras_sigmas,
    rescale_zero_terminal_snr,
    schedule_from_config,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
    t_to_sigma,
)


def test_scaled_linear_alphas_cumprod_matches_closed_form():
    abar = alphas_cumprod(betas_for("scaled_linear", 1000, 0.00085, 0.012))
    assert abar[0].item() == pytest.approx(1 - 0.00085, rel=1e-12)
    betas = [(math.sqrt(0.00085) + i / 999 * (math.sqrt(0.012) - math.sqrt(0.00085))) ** 2 for i in range(1000)]
    assert abar[-1].item() == pytest.approx(math.prod(1 - b for b in betas), rel=1e-9)
    assert abar[-1].item() == pytest.approx(0.0046, abs=1e-4)  # Stable Diffusion's sigma_max of about 14.6


def test_linear_and_cosine_betas():
    lin = betas_for("linear", 1000, 1e-4, 0.02)
    assert (lin[0].item(), lin[-1].item()) == pytest.approx((1e-4, 0.02))
    cos = betas_for("cosine", 1000)

    def f(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    assert cos[0].item() == pytest.approx(1 - f(1e-3) / f(0), rel=1e-12)
    assert cos.max().item() == pytest.approx(0.999) and (cos > 0).all()
    with pytest.raises(ValueError, match="linear, scaled_linear, cosine"):
        betas_for("quadratic")


def test_zero_terminal_snr_ends_at_pure_noise_and_keeps_the_first_step():
    betas = betas_for("scaled_linear", 1000)
    abar = alphas_cumprod(rescale_zero_terminal_snr(betas))
    assert abar[-1].item() == 0.0
    assert abar[0].item() == pytest.approx(alphas_cumprod(betas)[0].item(), rel=1e-12)
    sig = sigmas_from_alphas_cumprod(abar)
    assert math.isinf(sig[-1].item()) and torch.isfinite(sig[:-1]).all()
    assert sigma_to_t(torch.tensor([math.inf]), sig).item() == 999  # inf maps to the last timestep


def test_timestep_sigma_round_trip_is_exact_at_integers_and_log_linear_between():
    table = schedule_from_config(DiffusionConfig())
    t = torch.tensor([0.0, 1.0, 17.25, 500.5, 998.9, 999.0], dtype=torch.float64)
    s = t_to_sigma(t, table)
    assert s[0] == table[0] and s[-1] == table[-1] and s[1] == table[1]
    torch.testing.assert_close(sigma_to_t(s, table), t, rtol=0, atol=1e-9)
    mid = math.sqrt(table[500].item() * table[501].item())  # the log-midpoint is t = 500.5
    assert s[3].item() == pytest.approx(mid, rel=1e-12)
    assert sigma_to_t(table, table).equal(torch.arange(1000, dtype=torch.float64))


def test_spacings_match_diffusers_definitions():
    assert spaced_timesteps(20, 1000, "leading", steps_offset=1).tolist()[:3] == [951, 901, 851]
    assert spaced_timesteps(20, 1000, "leading", steps_offset=1)[-1] == 1
    assert spaced_timesteps(20, 1000, "trailing").tolist()[:2] == [999, 949] and spaced_timesteps(20)[-1] == 49
    lin = spaced_timesteps(20, 1000, "linspace")
    assert lin[0] == 999 and lin[-1] == 0 and lin[1].item() == pytest.approx(999 - 999 / 19)
    assert len(spaced_timesteps(30, 1000, "trailing")) == 30
    with pytest.raises(ValueError, match="leading, trailing, linspace"):
        spaced_timesteps(10, 1000, "uniform")


def test_karras_grid_and_discrete_grids_end_in_zero():
    k = karras_sigmas(10, 0.002, 80.0, rho=7.0)
    assert len(k) == 11 and k[-1] == 0 and k[0].item() == pytest.approx(80.0) and k[-2].item() == pytest.approx(0.002)
    assert (k[:-1].diff() < 0).all()
    mid = (80.0 ** (1 / 7) + 0.5 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7  # eq. 5 at i / (n-1) = 1/2
    assert karras_sigmas(3, 0.002, 80.0)[1].item() == pytest.approx(mid, rel=1e-12)
    table = schedule_from_config(DiffusionConfig())
    for spacing in ("trailing", "leading", "linspace", "karras"):
        g = discrete_sigmas(table, 12, spacing, steps_offset=1)
        assert len(g) == 13 and g[-1] == 0 and (g[:-1].diff() < 0).all() and g.dtype == torch.float32


def test_schedule_from_config_refuses_edm():
    with pytest.raises(ValueError, match="karras_sigmas"):
        schedule_from_config(DiffusionConfig(parameterisation="edm"))
