"""UniPC and LCM sampling against known answers: Gaussian data, the solvers they reduce to, the exact consistency
function."""

import pytest
import torch

from ldmkit.diffusion.schedules import karras_sigmas
from ldmkit.samplers import SAMPLERS
from ldmkit.samplers.lcm import consistency_boundary, lcm_timesteps
from ldmkit.samplers.unipc import sample_unipc
from tests.samplers.test_samplers import gaussian_denoiser


def gaussian_start(sd: float, steps: int, n: int = 1024):
    sigmas = karras_sigmas(steps, 0.002, 80.0)
    noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return noise / noise.std() * float(sigmas[0] ** 2 + sd**2) ** 0.5, sigmas  # exactly the marginal std


def unipc_error(sd: float, steps: int, **options) -> float:
    x, sigmas = gaussian_start(sd, steps)
    return sample_unipc(gaussian_denoiser(sd), x, sigmas, **options).std().item() / sd - 1


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_gives_data_std_with_the_corrector_raising_the_order_by_one(order, variant):
    # measured at 20 -> 40 Karras steps, sd in {0.5, 1, 2}: ratios 0.21-0.26 (order 1), 0.09-0.11 (2), 0.04-0.08 (3)
    # against 1/4, 1/8, 1/16 for orders 2, 3, 4
    lo, hi = {1: (0.17, 0.33), 2: (0.07, 0.16), 3: (0.02, 0.1)}[order]
    for sd in (0.5, 2.0):
        e20, e40 = unipc_error(sd, 20, order=order, variant=variant), unipc_error(sd, 40, order=order, variant=variant)
        assert abs(e40) < {1: 0.02, 2: 0.008, 3: 0.002}[order]
        assert lo < e40 / e20 < hi, (e20, e40)


def test_unipc_without_its_corrector_is_dpm_solver_plus_plus():
    x, sigmas = gaussian_start(1.0, 12, n=8)
    d = gaussian_denoiser(1.0)
    off = range(len(sigmas))
    # UniP-1 is DPM-Solver++(1), i.e. Euler in sigma space; UniP-2 with B(h) = e^{-h} - 1 is DPM-Solver++(2M)
    euler, dpm2m = SAMPLERS["euler"](d, x, sigmas), SAMPLERS["dpmpp_2m"](d, x, sigmas)
    torch.testing.assert_close(sample_unipc(d, x, sigmas, order=1, disable_corrector=off), euler)
    torch.testing.assert_close(sample_unipc(d, x, sigmas, order=2, disable_corrector=off), dpm2m)
    assert not torch.allclose(sample_unipc(d, x, sigmas, order=2), dpm2m, atol=1e-4)  # the corrector acts


def test_unipc_bh1_is_the_variant_option_and_differs_from_bh2():
    x, sigmas = gaussian_start(1.0, 8, n=4)
    d = gaussian_denoiser(0.7)
    bh1 = SAMPLERS["unipc_bh1"](d, x, sigmas, order=3)
    torch.testing.assert_close(bh1, sample_unipc(d, x, sigmas, order=3, variant="bh1"), rtol=0, atol=0)
    assert not torch.allclose(bh1, SAMPLERS["unipc"](d, x, sigmas, order=3), atol=1e-4)


def test_unipc_refuses_orders_and_variants_it_lacks_with_the_choices():
    x, sigmas = gaussian_start(1.0, 4, n=1)
    with pytest.raises(ValueError, match="use 1, 2 or 3"):
        sample_unipc(gaussian_denoiser(1.0), x, sigmas, order=4)
    with pytest.raises(ValueError, match="'bh2'.*'bh1'"):
        sample_unipc(gaussian_denoiser(1.0), x, sigmas, variant="bh3")


def exact_consistency(sd: float):
    """The probability-flow ODE's map to sigma = 0 for x0 ~ N(0, sd^2): x sd / sqrt(sigma^2 + sd^2)."""
    return lambda x, sigma: x * sd / (sigma.view(-1, 1, 1, 1) ** 2 + sd**2).sqrt()


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("sd", [0.5, 1.0, 2.0])
def test_lcm_with_the_exact_consistency_function_gives_data_std_at_any_step_count(sd, steps):
    x, sigmas = gaussian_start(sd, steps)
    out = SAMPLERS["lcm"](exact_consistency(sd), x, sigmas, generator=torch.Generator().manual_seed(1))
    # one step is exact; later steps re-noise and add only the sampling error of the std of 65,536 values (0.3 %)
    assert abs(out.std().item() / sd - 1) < (1e-5 if steps == 1 else 0.01)


def test_lcm_returns_the_last_x0_and_renoises_to_each_sigma_in_between():
    sigmas = torch.tensor([10.0, 2.0, 0.0])
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 10
    seen = []
    out = SAMPLERS["lcm"](
        lambda x, s: torch.zeros_like(x),
        x,
        sigmas,
        generator=torch.Generator().manual_seed(4),
        callback=lambda i, xi, x0, s: seen.append(xi),
    )
    assert torch.equal(out, torch.zeros_like(x))
    torch.testing.assert_close(seen[1], 2.0 * torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(4)))


def test_consistency_boundary_is_the_vp_latent_at_t_zero_and_the_denoiser_at_large_t():
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((3,), 0.5)
    d = gaussian_denoiser(1.0)
    at_zero = consistency_boundary(d, lambda s: torch.zeros_like(s))
    torch.testing.assert_close(at_zero(x, sigma), x / 1.25**0.5)  # f(x_t, 0) = x_t, x_t = x / sqrt(sigma^2 + 1)
    far = consistency_boundary(d, lambda s: torch.full_like(s, 999.0))  # c_skip 2.5e-8, c_out 1 - 1.3e-8
    torch.testing.assert_close(far(x, sigma), d(x, sigma), rtol=1e-6, atol=1e-6)


def test_lcm_timesteps_are_spread_by_index_over_the_distillation_grid():
    assert lcm_timesteps(4).tolist() == [999, 759, 499, 259]
    assert lcm_timesteps(1).tolist() == [999]
    assert lcm_timesteps(50).tolist() == list(range(999, 0, -20))
    with pytest.raises(ValueError, match="choose fewer steps"):
        lcm_timesteps(51)
