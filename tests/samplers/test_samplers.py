"""Samplers driven by the ideal denoiser of zero-mean Gaussian data: right spread, right order, seeded noise."""

import pytest
import torch

from ldmkit.diffusion.schedules import karras_sigmas
from ldmkit.noise import generators_from_seed
from ldmkit.samplers import SAMPLERS, get_sampler

# discretisation order of each method, and the largest relative error of std(output) allowed at 50 Karras steps.
# The errors measured for sd in {0.5, 1, 2}: euler / ddim 4.6-5.6 %, ddpm / euler_ancestral 9.2-11 %, heun /
# dpmpp_2m 0.4-0.7 %, dpmpp_2m_sde 1.2-1.8 %; the bounds leave room for the 0.3 % sampling error of the std of
# 65,536 values (sd / sqrt(2N)) in the stochastic samplers. UniPC-2's corrector raises it to third order:
# unipc 0.10-0.19 %, unipc_bh1 0.18-0.33 %.
ORDER = {
    "euler": 1,
    "ddim": 1,
    "ddpm": 1,
    "euler_ancestral": 1,
    "heun": 2,
    "dpmpp_2m": 2,
    "dpmpp_2m_sde": 2,
    "flow_euler": 1,
    "unipc": 3,
    "unipc_bh1": 3,
}
TOL_50 = {
    "euler": 0.07,
    "flow_euler": 0.07,  # the same steps as euler
    "ddim": 0.07,
    "ddpm": 0.13,
    "euler_ancestral": 0.13,
    "heun": 0.012,
    "dpmpp_2m": 0.012,
    "dpmpp_2m_sde": 0.03,
    "unipc": 0.004,
    "unipc_bh1": 0.005,
}
# the error ratio when the step halves (1/2^order), with room for the sampling error of the stochastic methods
RATIO_WINDOW = {1: (0.4, 0.62), 2: (0.12, 0.4), 3: (0.06, 0.18)}
CONSISTENCY = {"lcm"}  # walk a consistency function, not an ODE: test_samplers_unipc.py has their known answer
STOCHASTIC = {"ddpm", "euler_ancestral", "dpmpp_2m_sde", "lcm"}


def gaussian_denoiser(sd: float):
    """E[x0 | x] for x0 ~ N(0, sd^2): x sd^2 / (sigma^2 + sd^2)."""
    return lambda x, sigma: x * sd**2 / (sigma.view(-1, 1, 1, 1) ** 2 + sd**2)


def relative_std_error(name: str, sd: float, steps: int, n: int = 1024) -> float:
    sigmas = karras_sigmas(steps, 0.002, 80.0)
    noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x = noise / noise.std() * float(sigmas[0] ** 2 + sd**2) ** 0.5  # exactly the marginal std at sigma_max
    out = SAMPLERS[name](gaussian_denoiser(sd), x, sigmas, generator=torch.Generator().manual_seed(1))
    return out.std().item() / sd - 1


def test_registry_lists_every_method_and_names_them_on_error():
    assert set(SAMPLERS) == set(ORDER) | CONSISTENCY
    with pytest.raises(ValueError, match="unknown sampler 'nope'.*dpmpp_2m"):
        get_sampler("nope")


@pytest.mark.parametrize("sd", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("name", sorted(ORDER))
def test_ideal_gaussian_denoiser_gives_data_std_and_error_shrinks_with_the_method_order(name, sd):
    e25, e50 = relative_std_error(name, sd, 25), relative_std_error(name, sd, 50)
    assert abs(e50) < TOL_50[name]
    # halving the step size divides the discretisation error by 2 ** order (0.5 first order, 0.25 second order,
    # 0.125 third order); the window allows for the sampling error of the stochastic methods
    ratio = e50 / e25
    lo, hi = RATIO_WINDOW[ORDER[name]]
    assert lo < ratio < hi, (e25, e50)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_same_seed_same_output_and_per_sample_generators_are_batch_independent(name):
    sd, sigmas = 1.0, karras_sigmas(6, 0.002, 80.0)
    x = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(3)) * sigmas[0]
    fn = SAMPLERS[name]
    a = fn(gaussian_denoiser(sd), x, sigmas, generator=generators_from_seed(10, 4))
    b = fn(gaussian_denoiser(sd), x, sigmas, generator=generators_from_seed(10, 4))
    assert torch.equal(a, b)
    alone = fn(gaussian_denoiser(sd), x[2:3], sigmas, generator=generators_from_seed(12, 1))
    torch.testing.assert_close(alone, a[2:3], rtol=1e-5, atol=1e-6)
    c = fn(gaussian_denoiser(sd), x, sigmas, generator=generators_from_seed(20, 4))
    assert torch.equal(a, c) != (name in STOCHASTIC)


def test_callback_sees_every_step_before_its_update():
    sigmas = karras_sigmas(5, 0.002, 80.0)
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    seen = []
    out = SAMPLERS["euler"](
        gaussian_denoiser(1.0), x, sigmas, callback=lambda i, xi, x0, s: seen.append((i, xi.clone(), x0, float(s)))
    )
    assert [s[0] for s in seen] == list(range(5)) and torch.equal(seen[0][1], x)
    assert seen[-1][3] == pytest.approx(0.002, rel=1e-5)
    torch.testing.assert_close(out, seen[-1][2])  # the last step to sigma 0 lands on the x0 prediction


def test_ddim_eta_one_is_ddpm_and_eta_zero_is_euler():
    sigmas = karras_sigmas(8, 0.002, 80.0)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    d = gaussian_denoiser(0.7)
    ddim1 = SAMPLERS["ddim"](d, x, sigmas, generator=torch.Generator().manual_seed(5), eta=1.0)
    ddpm = SAMPLERS["ddpm"](d, x, sigmas, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ddim1, ddpm)
    torch.testing.assert_close(SAMPLERS["ddim"](d, x, sigmas), SAMPLERS["euler"](d, x, sigmas))


def test_malformed_sigmas_are_refused_with_a_hint():
    with pytest.raises(ValueError, match="denoiser.sigmas"):
        SAMPLERS["euler"](gaussian_denoiser(1.0), torch.zeros(1, 1, 2, 2), torch.tensor([1.0]))


@pytest.mark.parametrize("solver", ["midpoint", "heun"])
def test_dpmpp_2m_sde_solver_variants_and_eta_zero(solver):
    sigmas = karras_sigmas(50, 0.002, 80.0)
    noise = torch.randn(1024, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x = noise / noise.std() * float(sigmas[0] ** 2 + 1) ** 0.5
    out = SAMPLERS["dpmpp_2m_sde"](
        gaussian_denoiser(1.0), x, sigmas, generator=torch.Generator().manual_seed(1), solver=solver
    )
    assert abs(out.std().item() - 1) < 0.03  # as TOL_50 above
    ode = SAMPLERS["dpmpp_2m_sde"](gaussian_denoiser(1.0), x, sigmas, eta=0.0, solver="midpoint")
    torch.testing.assert_close(ode, SAMPLERS["dpmpp_2m"](gaussian_denoiser(1.0), x, sigmas), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="midpoint"):
        SAMPLERS["dpmpp_2m_sde"](gaussian_denoiser(1.0), x, sigmas, solver="rk4")
