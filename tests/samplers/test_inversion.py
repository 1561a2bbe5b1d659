"""DDIM inversion against known answers: deterministic DDIM from the inverted latent returns the start, for the
Gaussian denoiser and for every parameterisation's grid around a fixed non-linear backbone."""

import pytest
import torch
from torch import nn

from ldmkit.config import DiffusionConfig
from ldmkit.diffusion.parameterisation import make_denoiser
from ldmkit.errors import InputError
from ldmkit.samplers import sample_ddim
from ldmkit.samplers.inversion import invert_ddim
from tests.samplers.test_samplers import gaussian_denoiser


def data(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 2, 6, 6, generator=torch.Generator().manual_seed(1))


class Backbone(nn.Module):
    """A fixed non-linear backbone F(x_in, c_noise): a seeded 3x3 convolution and a tanh, halved (a random backbone
    varies with its input faster than a trained one, which slows the fixed point), modulated by c_noise."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, c_noise, cond):
        return 0.5 * torch.tanh(self.conv(x)) * (1 + 0.001 * c_noise.view(-1, 1, 1, 1))


def test_inversion_then_ddim_returns_the_start_for_the_gaussian_denoiser():
    d, x0 = gaussian_denoiser(1.0), data()
    sigmas = make_denoiser(Backbone(), DiffusionConfig(parameterisation="v", schedule="cosine")).sigmas(25)
    x_top = invert_ddim(d, x0, sigmas, iterations=3)
    assert float(x_top.std()) > 100  # at the cosine schedule's top sigma (20291), the latent is noise
    back = sample_ddim(d, x_top, sigmas)
    torch.testing.assert_close(back, x0, atol=2e-3, rtol=0)


@pytest.mark.parametrize("parameterisation", ["eps", "v", "edm", "flow"])
def test_every_parameterisation_reconstructs_and_iterations_make_it_exact(parameterisation):
    schedule = "cosine" if parameterisation == "v" else "scaled_linear"  # the shipped models' cosine: top sigma 20291
    with torch.no_grad():
        denoiser = make_denoiser(Backbone(), DiffusionConfig(parameterisation=parameterisation, schedule=schedule))
        d = lambda x, s: denoiser(x, s)  # noqa: E731
        sigmas, x0 = denoiser.sigmas(12), data(2)
        errors = {}
        for iterations in (0, 4):
            back = sample_ddim(d, invert_ddim(d, x0, sigmas, iterations=iterations), sigmas)
            errors[iterations] = float((back - x0).abs().max())
    assert errors[4] < 0.01, errors  # measured 1e-6 (flow) to 0.006 (eps), against 0.06-1.2 plain
    assert errors[0] > 10 * errors[4], errors  # the plain inversion is only first order in the step


def test_callback_sees_each_state_up_the_grid():
    d, x0 = gaussian_denoiser(1.0), data(1)
    sigmas = torch.tensor([5.0, 1.0, 0.2, 0.0])
    seen = []
    top = invert_ddim(d, x0, sigmas, iterations=1, callback=lambda i, x, x0, s: seen.append((i, float(s), x)))
    assert [(i, round(s, 4)) for i, s, _ in seen] == [(0, 0.2), (1, 1.0), (2, 5.0)]
    assert torch.equal(seen[-1][2], top)


@pytest.mark.parametrize(
    "sigmas, iterations", [(torch.tensor([0.0, 1.0, 5.0]), 1), (torch.tensor([5.0, 1.0, 0.5]), 1), (None, -1)]
)
def test_bad_grids_and_iterations_are_refused(sigmas, iterations):
    sigmas = torch.tensor([5.0, 1.0, 0.0]) if sigmas is None else sigmas
    with pytest.raises(InputError):
        invert_ddim(gaussian_denoiser(1.0), data(1), sigmas, iterations=iterations)
