"""Parameterisations: exact targets give zero loss, ideal backbones give the ideal denoiser, min-SNR weights."""

import math

import pytest
import torch
from torch import nn

from ldmkit.conditioning.types import Conditioning
from ldmkit.config import DiffusionConfig
from ldmkit.diffusion.parameterisation import EDMDenoiser, EpsDenoiser, VDenoiser, make_denoiser
from ldmkit.diffusion.schedules import schedule_from_config

CONFIGS = {
    "eps": DiffusionConfig(parameterisation="eps"),
    "v": DiffusionConfig(parameterisation="v"),
    "edm": DiffusionConfig(parameterisation="edm", sigma_data=0.5),
}


class Oracle(nn.Module):
    """A backbone that returns what `fn(x_in, c_noise)` says; records its inputs."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))  # so that the denoiser has a device
        self.fn = None
        self.calls = []

    def forward(self, x_in, c_noise, cond):
        self.calls.append((x_in, c_noise, cond))
        return self.fn(x_in, c_noise) + 0 * self.w


def sigma_of(den, c_noise: torch.Tensor) -> torch.Tensor:
    """Invert c_noise: a timestep (discrete) or log(sigma) / 4 (EDM)."""
    if isinstance(den, EDMDenoiser):
        return (4 * c_noise.double()).exp()
    return den.table[c_noise.round().long()]


def ideal_backbone(den, sd: float):
    """The output F that makes D the ideal Gaussian denoiser, built from the preconditioning's inverse."""

    def fn(x_in, c_noise):
        sigma = sigma_of(den, c_noise)
        c_skip, c_out, c_in = (c.float().view(-1, 1, 1, 1) for c in den.scalings(sigma))
        x = x_in / c_in
        return (x * sd**2 / (sigma.float().view(-1, 1, 1, 1) ** 2 + sd**2) - c_skip * x) / c_out

    return fn


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_factory_builds_the_named_wrapper(kind):
    den = make_denoiser(Oracle(), CONFIGS[kind])
    assert type(den) is {"eps": EpsDenoiser, "v": VDenoiser, "edm": EDMDenoiser}[kind]
    assert 0 < den.sigma_min < den.sigma_max
    g = den.sigmas(10)
    assert len(g) == 11 and g[-1] == 0 and g[0].item() == pytest.approx(den.sigma_max, rel=1e-6)
    with pytest.raises(ValueError, match="eps, v, edm"):
        make_denoiser(Oracle(), DiffusionConfig(parameterisation="x"))


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_ideal_backbone_gives_the_ideal_gaussian_denoiser(kind):
    backbone = Oracle()
    den = make_denoiser(backbone, CONFIGS[kind])
    backbone.fn = ideal_backbone(den, 0.8)
    x = torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(0)) * 3
    grid = den.sigmas(4)[:-1]  # sigmas the model was trained at (discrete) or on its Karras grid (EDM)
    sigma = grid[torch.tensor([0, 1, 2, 3, 3])]
    expect = x * 0.64 / (sigma.view(-1, 1, 1, 1) ** 2 + 0.64)
    torch.testing.assert_close(den(x, sigma, None), expect, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(den(x[:1], float(grid[2])), x[:1] * 0.64 / (grid[2] ** 2 + 0.64), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_a_backbone_returning_the_exact_target_has_zero_loss(kind):
    backbone = Oracle()
    den = make_denoiser(backbone, CONFIGS[kind])
    x0 = torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    # the loss draws sigma and then the noise from the generator; replay the same draws to build the target
    sigma = den.sample_training_sigma(6, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    den.sample_training_sigma(6, g)
    noise = torch.randn(x0.shape, generator=g)
    target = {
        "eps": noise,
        "v": (noise - sigma.float().view(-1, 1, 1, 1) * x0) / (sigma.float() ** 2 + 1).sqrt().view(-1, 1, 1, 1),
    }.get(kind)
    if kind == "edm":
        c_skip, c_out, _ = (c.float().view(-1, 1, 1, 1) for c in den.scalings(sigma))
        target = (x0 - c_skip * (x0 + sigma.float().view(-1, 1, 1, 1) * noise)) / c_out
    backbone.fn = lambda x_in, c_noise: target
    loss = den.loss(x0, Conditioning(), generator=torch.Generator().manual_seed(7))
    assert loss.shape == (6,) and loss.abs().max() < 1e-8
    backbone.fn = lambda x_in, c_noise: target + 0.1
    assert loss.shape == (6,) and den.loss(x0, None, generator=torch.Generator().manual_seed(7)).min() > 1e-3


def test_eps_wrapper_reproduces_exact_integer_timesteps_and_input_scaling():
    backbone = Oracle()
    backbone.fn = lambda x_in, c_noise: torch.zeros_like(x_in)
    den = EpsDenoiser(backbone, schedule_from_config(DiffusionConfig()))
    grid = den.sigmas(20, "leading", steps_offset=1)  # float32, as samplers receive them
    x = torch.ones(20, 1, 2, 2)
    den(x, grid[:-1])
    x_in, c_noise, _ = backbone.calls[-1]
    assert c_noise.tolist() == list(range(951, 0, -50))
    torch.testing.assert_close(x_in[:, 0, 0, 0], 1 / (grid[:-1] ** 2 + 1).sqrt())
    den(x[:1], (den.table[10] * den.table[11]).sqrt())  # the log-midpoint of two timesteps
    assert backbone.calls[-1][1].item() == pytest.approx(10.5, abs=1e-5)


def test_zero_terminal_snr_gives_a_finite_sigma_max():
    den = make_denoiser(Oracle(), DiffusionConfig(parameterisation="v", zero_terminal_snr=True))
    assert den.sigma_max == pytest.approx(math.sqrt(2.0**24 - 1)) and math.isfinite(den.sigmas(5)[0].item())


def test_min_snr_weights_have_the_form_of_each_prediction():
    table = schedule_from_config(DiffusionConfig())
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    snr = 1 / sigma**2
    eps = EpsDenoiser(Oracle(), table, min_snr_gamma=5.0)
    v = VDenoiser(Oracle(), table, min_snr_gamma=5.0)
    edm = EDMDenoiser(Oracle(), sigma_data=0.5, min_snr_gamma=5.0)
    torch.testing.assert_close(eps.loss_weight(sigma), snr.clamp(max=5) / snr)
    torch.testing.assert_close(v.loss_weight(sigma), snr.clamp(max=5) / (snr + 1))
    snr_edm = 0.25 / sigma**2
    torch.testing.assert_close(edm.loss_weight(sigma), snr_edm.clamp(max=5) / (snr_edm + 1))
    assert eps.loss_weight(sigma)[0].item() == pytest.approx(5 / 100)  # SNR 100 -> gamma / SNR
    assert EpsDenoiser(Oracle(), table).loss_weight(sigma).eq(1).all()


def test_edm_training_sigmas_are_log_normal():
    edm = EDMDenoiser(Oracle(), p_mean=-1.2, p_std=1.2)
    log_s = edm.sample_training_sigma(20000, torch.Generator().manual_seed(0)).log()
    # standard errors 1.2 / sqrt(20000) = 0.0085 (mean) and 1.2 / sqrt(40000) = 0.006 (std): 4 of them allowed
    assert log_s.mean().item() == pytest.approx(-1.2, abs=0.034) and log_s.std().item() == pytest.approx(1.2, abs=0.024)
    with pytest.raises(ValueError, match="karras"):
        edm.sigmas(10, "trailing")
