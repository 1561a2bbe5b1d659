"""Rectified flow: the sigma-space view of x_t = (1 - t) x0 + t eps, its velocity loss, logit-normal times, the shift,
and every sampler driven by the closed-form ideal velocity of Gaussian data; diffusers' flow-matching Euler
scheduler as the oracle of the native flow sampler."""

import math

import pytest
import torch
from torch import nn

from ldmkit.conditioning.types import Conditioning
from ldmkit.config import DenoiserRun, DiffusionConfig, load_run
from ldmkit.diffusion.guidance import bind
from ldmkit.diffusion.parameterisation import FLOW_T_MAX, FlowDenoiser, make_denoiser
from ldmkit.diffusion.schedules import schedule_from_config
from ldmkit.errors import InputError
from ldmkit.samplers import SAMPLERS, sample_euler, sample_flow_euler

FLOW = DiffusionConfig(parameterisation="flow")
# largest relative error of std(output) allowed at 50 steps of the flow grid; measured for sd in {0.5, 1, 2} and
# shift 1 or 3: euler / ddim / flow_euler 2.5-5.7 %, ddpm / euler_ancestral 4.7-12 %, heun / dpmpp_2m 0.01-2.1 %,
# dpmpp_2m_sde 0.07-4.3 % (the stochastic ones with the 0.3 % sampling error of the std of 65,536 values)
TOL_50 = dict(euler=0.07, ddim=0.07, flow_euler=0.07, ddpm=0.15, euler_ancestral=0.15, heun=0.03, dpmpp_2m=0.03)
TOL_50["dpmpp_2m_sde"] = 0.06
TOL_50 |= dict(unipc=0.01, unipc_bh1=0.025)  # measured at most 0.0048 and 0.015 (sd 0.5, shift 3)
CONSISTENCY = {"lcm"}  # walks a consistency function, not the ODE: samplers/test_samplers_unipc.py has its known answer


class IdealVelocity(nn.Module):
    """E[eps - x0 | x_t] for x0 ~ N(0, sd^2), x_t = (1 - t) x0 + t eps, in closed form:
    x_t (t - (1 - t) sd^2) / ((1 - t)^2 sd^2 + t^2), reading t = c_noise / 1000."""

    def __init__(self, sd: float):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))  # so that the denoiser has a device
        self.sd = sd
        self.calls = []

    def forward(self, x_t, c_noise, cond):
        self.calls.append((x_t, c_noise))
        t, sd2 = (c_noise.double() / 1000).view(-1, 1, 1, 1), self.sd**2
        return (x_t * (t - (1 - t) * sd2) / ((1 - t) ** 2 * sd2 + t**2)).float()


def test_the_config_builds_a_flow_denoiser_with_a_shifted_grid():
    den = make_denoiser(IdealVelocity(1.0), FLOW)
    assert isinstance(den, FlowDenoiser) and den.shift == 1.0
    grid = den.sigmas(10)
    assert len(grid) == 11 and grid[-1] == 0 and bool((grid[:-1] > grid[1:]).all())
    t = grid / (1 + grid)  # evenly spaced in t from FLOW_T_MAX to 0
    torch.testing.assert_close(t.double(), torch.linspace(FLOW_T_MAX, 0, 11, dtype=torch.float64), atol=1e-6, rtol=0)
    shifted = make_denoiser(IdealVelocity(1.0), DiffusionConfig(parameterisation="flow", flow_shift=3.0))
    torch.testing.assert_close(shifted.sigmas(10), 3 * grid)  # the shift multiplies sigma
    torch.testing.assert_close(den.sigmas(10, shift=3.0), 3 * grid)
    assert shifted.sigma_max == pytest.approx(3 * 999) and 0 < shifted.sigma_min < 0.01
    run = load_run(DenoiserRun, None, ["diffusion.parameterisation=flow", "diffusion.flow_shift=3"])
    assert run.diffusion.flow_shift == 3.0
    with pytest.raises(ValueError, match="not a discrete schedule"):
        schedule_from_config(FLOW)
    with pytest.raises(ValueError, match="linear in t"):
        den.sigmas(10, "karras")
    with pytest.raises(ValueError, match="eps, v, edm, flow"):
        make_denoiser(IdealVelocity(1.0), DiffusionConfig(parameterisation="rf"))


@pytest.mark.parametrize("sd", [0.5, 2.0])
def test_the_ideal_velocity_gives_the_ideal_gaussian_denoiser(sd):
    """D(x, sigma) built from the closed-form velocity is E[x0 | x] = x sd^2 / (sigma^2 + sd^2), and the backbone
    sees x_t = x / (1 + sigma) at c_noise = 1000 t."""
    backbone = IdealVelocity(sd)
    den = make_denoiser(backbone, FLOW)
    x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0)) * 3
    sigma = torch.tensor([0.05, 1.0, 7.0, 300.0])
    expect = x * sd**2 / (sigma.view(-1, 1, 1, 1) ** 2 + sd**2)
    torch.testing.assert_close(den(x, sigma), expect, rtol=1e-4, atol=1e-5)
    x_t, c_noise = backbone.calls[-1]
    torch.testing.assert_close(x_t, x / (1 + sigma.view(-1, 1, 1, 1)))
    torch.testing.assert_close(c_noise, 1000 * sigma / (1 + sigma))


def test_the_loss_target_is_the_velocity_of_the_straight_path():
    """A backbone returning eps - x0 has zero loss, and its input is (1 - t) x0 + t eps exactly."""
    backbone = IdealVelocity(1.0)
    den = make_denoiser(backbone, DiffusionConfig(parameterisation="flow", flow_shift=2.0))
    x0 = torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(7)  # the loss draws sigma, then the noise: replay the draws
    sigma = den.sample_training_sigma(6, g)
    noise = torch.randn(x0.shape, generator=g)
    t = (sigma / (1 + sigma)).float().view(-1, 1, 1, 1)
    seen = []
    backbone.forward = lambda x_in, c_noise, cond: seen.append(x_in) or (noise - x0)
    loss = den.loss(x0, Conditioning(), generator=torch.Generator().manual_seed(7))
    assert loss.shape == (6,) and loss.abs().max() < 1e-10
    torch.testing.assert_close(seen[0], (1 - t) * x0 + t * noise, rtol=1e-5, atol=1e-6)


def test_training_times_are_logit_normal_then_shifted():
    den = FlowDenoiser(IdealVelocity(1.0), shift=3.0, logit_mean=0.5, logit_std=0.8)
    sigma = den.sample_training_sigma(20000, torch.Generator().manual_seed(0))
    logit = (sigma / 3.0).log()  # logit(t) of the unshifted t = ln of the unshifted sigma
    # standard errors 0.8 / sqrt(20000) = 0.0057 (mean) and 0.004 (std): 4 of them allowed
    assert logit.mean().item() == pytest.approx(0.5, abs=0.023) and logit.std().item() == pytest.approx(0.8, abs=0.016)
    t = sigma / (1 + sigma)
    t0 = torch.sigmoid(logit)
    torch.testing.assert_close(t, 3 * t0 / (1 + 2 * t0))  # Esser et al. eq. 23's shift of t


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("sd", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - CONSISTENCY))
def test_every_sampler_on_the_flow_grid_returns_data_of_std_sd(name, sd, shift):
    den = FlowDenoiser(IdealVelocity(sd), shift=shift)

    def error(steps):
        sigmas = den.sigmas(steps)
        noise = torch.randn(1024, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        x = noise / noise.std() * float(sigmas[0] ** 2 + sd**2) ** 0.5  # the marginal std at the first sigma
        out = SAMPLERS[name](bind(den, None), x, sigmas, generator=torch.Generator().manual_seed(1))
        return out.std().item() / sd - 1

    e25, e50 = error(25), error(50)
    assert abs(e50) < TOL_50[name], (e25, e50)
    if name in ("euler", "ddim", "flow_euler"):
        assert 0.4 < e50 / e25 < 0.62  # first order: halving the step halves the error


def test_flow_euler_takes_the_steps_of_euler():
    den = FlowDenoiser(IdealVelocity(0.7), shift=3.0)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(4)) * den.sigma_max
    for sigmas in (den.sigmas(12), torch.tensor([80.0, 10.0, 1.0, 0.1, 0.0])):
        a = sample_flow_euler(bind(den, None), x, sigmas)
        b = sample_euler(bind(den, None), x, sigmas)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def toy_velocity(x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """A fixed smooth velocity field depending on the input and the timestep (1000 t)."""
    t = timestep.float().view(-1, 1, 1, 1) / 1000
    return 0.9 * x_t - 0.4 * torch.tanh(x_t.roll(1, dims=1)) * (1 - t) + 0.2 * t


class ToyBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x_t, c_noise, cond):
        return toy_velocity(x_t, c_noise)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_matches_diffusers_flow_matching_scheduler_step_for_step(shift):
    """diffusers' FlowMatchEulerDiscreteScheduler on our t grid (its shift applied to t, ours to sigma): the same
    x_t after every step, from the same x_t = noise; the model sees the same 1000 t."""
    diffusers = pytest.importorskip("diffusers")
    steps = 12
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    t = torch.linspace(FLOW_T_MAX, 0, steps + 1, dtype=torch.float64)[:-1]
    sched.set_timesteps(sigmas=t.tolist())
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    sample, theirs = noise.clone(), [noise.clone()]
    for ts in sched.timesteps:
        sample = sched.step(toy_velocity(sample, ts.expand(2)), ts, sample).prev_sample
        theirs.append(sample)

    den = FlowDenoiser(ToyBackbone(), shift=shift)
    sigmas = den.sigmas(steps)
    torch.testing.assert_close(sigmas[:-1] / (1 + sigmas[:-1]), sched.sigmas[:-1], rtol=1e-5, atol=1e-6)
    ours = []
    out = sample_flow_euler(
        bind(den, None),
        noise * (1 + sigmas[0]),  # x_t = noise, in sigma space
        sigmas,
        callback=lambda i, x, x0, s: ours.append(x / (1 + s)),
    )
    ours.append(out)
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        err = (a.double() - b.double()).abs().max() / b.double().abs().max()
        assert err < 1e-5, f"step {i}: relative difference {err:.2e}"


def test_a_flow_model_samples_from_pure_noise_through_sample_latents():
    """The shared entry point draws x = noise * sigma_max; the result is finite and near the data's spread."""
    from ldmkit.diffusion.sample import sample_latents

    den = FlowDenoiser(IdealVelocity(0.5))
    g = torch.Generator().manual_seed(0)
    z = sample_latents(den, (256, 1, 8, 8), Conditioning(), sampler="flow_euler", steps=40, generator=g)
    assert torch.isfinite(z).all() and z.std().item() == pytest.approx(0.5, rel=0.06)
    assert math.isfinite(den.sigma_max)
    with pytest.raises(InputError, match="at least 1"):
        den.sigmas(0)
