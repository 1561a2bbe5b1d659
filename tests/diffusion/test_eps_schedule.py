"""Where an eps model's sampling starts: an error in eps_theta reaches the x0 estimate multiplied by sigma, so the
cosine schedule's last sigma (20291) must not be the start; Stable Diffusion's schedule keeps its grids exactly."""

import math

import pytest
import torch
from torch import nn

from ldmkit.conditioning.types import Conditioning
from ldmkit.config import DiffusionConfig
from ldmkit.diffusion.parameterisation import EPS_START_SIGMA_MAX, EpsDenoiser, make_denoiser
from ldmkit.diffusion.sample import sample_latents
from ldmkit.diffusion.schedules import discrete_sigmas, schedule_from_config, t_to_sigma

SD = 0.5  # the standard deviation of the zero-mean Gaussian data


class NoisyIdealEps(nn.Module):
    """The ideal noise prediction for N(0, SD^2) data, eps* = (x - x SD^2 / (sigma^2 + SD^2)) / sigma, plus a fixed
    error `err`, as a young model's prediction has one; sigma is read back from the timestep."""

    def __init__(self, table: torch.Tensor, err: float):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))  # so that the denoiser has a device
        self.table, self.err = table, err

    def forward(self, x_in, c_noise, cond):
        sigma = t_to_sigma(c_noise.double(), self.table).float().view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        x = x_in * (sigma**2 + 1).sqrt()
        return (x - x * SD**2 / (sigma**2 + SD**2)) / sigma + self.err + 0 * self.w


def eps_model(err: float = 0.0, **settings) -> EpsDenoiser:
    cfg = DiffusionConfig(parameterisation="eps", **settings)
    table = schedule_from_config(cfg)
    return make_denoiser(NoisyIdealEps(table, err), cfg)


def draw(den, sampler: str = "dpmpp_2m", steps: int = 25) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return sample_latents(den, (256, 1, 4, 4), Conditioning(), sampler=sampler, steps=steps, generator=g)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler"])
def test_an_eps_model_with_a_small_error_draws_the_data_on_the_cosine_schedule(sampler):
    # an eps error of 0.01 moves the first x0 estimate by sigma * 0.01: by 203 from sigma 20291
    x = draw(eps_model(0.01, schedule="cosine"), sampler)
    assert abs(x.mean().item()) < 0.1 and x.std().item() == pytest.approx(SD, abs=0.05)


def test_an_eps_model_on_a_zero_terminal_snr_schedule_starts_from_a_bounded_sigma():
    den = eps_model(0.01, zero_terminal_snr=True)
    assert den.sigma_max <= EPS_START_SIGMA_MAX
    x = draw(den)
    assert abs(x.mean().item()) < 0.1 and x.std().item() == pytest.approx(SD, abs=0.05)


def test_the_bounded_start_is_a_training_timestep_and_the_grid_reaches_zero():
    den = eps_model(schedule="cosine")
    table = den.table
    start = int((table <= EPS_START_SIGMA_MAX).sum()) - 1  # the last timestep at or below the bound
    assert table[start] <= EPS_START_SIGMA_MAX < table[start + 1] and den.sigma_max == float(table[start])
    for spacing in ("trailing", "linspace", "karras"):
        g = den.sigmas(10, spacing)
        assert g[0].item() == pytest.approx(den.sigma_max, rel=1e-6) and g[-1] == 0 and (g[:-1] > g[1:]).all()
    assert den.sigmas(10, "leading")[0] <= den.sigma_max  # "leading" never starts at the top
    assert den.timestep(den.sigmas(10)[:1]).item() == start  # the backbone sees the timestep it was trained at
    assert len(den.sigmas(start + 1)) == start + 2  # every sampled timestep once
    with pytest.raises(ValueError, match=f"steps 1000 is more than the {start + 1} timesteps sampling uses"):
        den.sigmas(1000)


def test_stable_diffusions_schedule_keeps_its_grids_bit_for_bit():
    den = eps_model(schedule="scaled_linear")  # Stable Diffusion 1.x: its last sigma is 14.615
    assert den.sigma_max == float(den.table[-1]) and not math.isinf(den.sigma_max)
    for spacing, offset in (("leading", 1), ("trailing", 0), ("linspace", 0), ("karras", 0)):
        assert torch.equal(den.sigmas(20, spacing, offset), discrete_sigmas(den.table, 20, spacing, offset))


def test_a_v_model_keeps_the_cosine_schedules_whole_range():
    # v's x0 estimate at large sigma is about -v_theta: its error is not multiplied by sigma
    cfg = DiffusionConfig(parameterisation="v", schedule="cosine")
    den = make_denoiser(nn.Identity(), cfg)
    assert den.sigma_max == pytest.approx(20291.17, rel=1e-5)
    assert torch.equal(den.sigmas(25), discrete_sigmas(den.table, 25, "trailing", 1))
