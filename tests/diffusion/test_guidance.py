"""Guidance wrappers: CFG in one batched pass, guidance rescale in the prediction space, inpainting blend."""

import pytest
import torch
from torch import nn

from ldmkit.conditioning.types import Conditioning
from ldmkit.config import DiffusionConfig
from ldmkit.diffusion.guidance import CFGDenoiser, InpaintBlend, bind, rescale_guidance
from ldmkit.diffusion.parameterisation import make_denoiser
from ldmkit.samplers import SAMPLERS


class LabelNet(nn.Module):
    """A tiny deterministic backbone whose output depends on x, the noise level and the label; counts its calls."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Parameter(torch.randn(4, 2, generator=g))  # label -> per-channel offset
        self.calls = []

    def forward(self, x_in, c_noise, cond):
        self.calls.append(x_in.shape[0])
        off = self.emb[cond.labels].view(-1, 2, 1, 1)
        return torch.tanh(x_in) * (1 + c_noise.view(-1, 1, 1, 1) / 1000) + off


@pytest.fixture(params=["eps", "v"])
def setup(request):
    net = LabelNet()
    den = make_denoiser(net, DiffusionConfig(parameterisation=request.param))
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1)) * 2
    sigma = den.sigmas(10)[torch.tensor([2, 5, 7])]
    cond, uncond = Conditioning(labels=torch.tensor([0, 1, 2])), Conditioning(labels=torch.tensor([3, 3, 3]))
    return net, den, x, sigma, cond, uncond


def test_scale_one_is_the_conditional_branch_in_one_pass(setup):
    net, den, x, sigma, cond, uncond = setup
    out = CFGDenoiser(den, cond, uncond, 1.0)(x, sigma)
    assert net.calls == [3]
    torch.testing.assert_close(out, bind(den, cond)(x, sigma))


def test_batched_cfg_equals_two_separate_passes_combined(setup):
    net, den, x, sigma, cond, uncond = setup
    out = CFGDenoiser(den, cond, uncond, 4.0)(x, sigma)
    assert net.calls == [6]  # one forward pass with both branches
    d_c, d_u = den(x, sigma, cond), den(x, sigma, uncond)
    torch.testing.assert_close(out, d_u + 4.0 * (d_c - d_u), rtol=1e-5, atol=1e-5)
    # linear, so the same in the model's own prediction space
    f_c, f_u = den.prediction(x, sigma, d_c), den.prediction(x, sigma, d_u)
    torch.testing.assert_close(den.prediction(x, sigma, out), f_u + 4.0 * (f_c - f_u), rtol=1e-4, atol=1e-4)


def test_guidance_rescale_matches_the_std_of_the_conditional_prediction(setup):
    net, den, x, sigma, cond, uncond = setup
    plain = CFGDenoiser(den, cond, uncond, 7.0)(x, sigma)
    full = CFGDenoiser(den, cond, uncond, 7.0, rescale=1.0)(x, sigma)
    half = CFGDenoiser(den, cond, uncond, 7.0, rescale=0.5)(x, sigma)
    f_cond = den.prediction(x, sigma, den(x, sigma, cond))
    f_full = den.prediction(x, sigma, full)
    # phi = 1: the guided prediction takes the per-sample std of the conditional one (Lin et al. 2023, eq. 15)
    torch.testing.assert_close(f_full.flatten(1).std(1), f_cond.flatten(1).std(1), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(f_full, den.prediction(x, sigma, plain), atol=1e-3)
    # phi blends linearly between the two in the prediction space (not in x0 space, for v)
    f_half = den.prediction(x, sigma, half)
    torch.testing.assert_close(f_half, 0.5 * f_full + 0.5 * den.prediction(x, sigma, plain), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="between 0 and 1"):
        CFGDenoiser(den, cond, uncond, 7.0, rescale=1.5)


def test_rescale_guidance_function():
    g = torch.tensor([[2.0, -2.0, 4.0, 0.0]])
    c = torch.tensor([[1.0, -1.0, 2.0, 0.0]])
    torch.testing.assert_close(rescale_guidance(g, c, 1.0), c)  # same direction, std brought back to cond's
    torch.testing.assert_close(rescale_guidance(g, c, 0.0), g)


def test_inpaint_blend_keeps_the_known_region_and_feeds_the_noised_original():
    sd, x0 = 1.0, torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1  # keep the left half
    seen = []

    def ideal(x, sigma):
        seen.append((x.clone(), sigma.clone()))
        return x * sd**2 / (sigma.view(-1, 1, 1, 1) ** 2 + sd**2)

    blend = InpaintBlend(ideal, x0, mask, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0])
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(5)) * 10
    out = SAMPLERS["euler"](blend, x, sigmas)
    torch.testing.assert_close(out[..., :2], x0[..., :2])  # the known half is the original
    x_in, s = seen[1]
    torch.testing.assert_close(x_in[..., :2], (x0 + 3.0 * noise)[..., :2])  # noised original at sigma = 3
    assert not torch.allclose(out[..., 2:], x0[..., 2:], atol=1e-2)  # the rest is generated
    with pytest.raises(ValueError, match="resize the mask"):
        InpaintBlend(ideal, x0, torch.ones(1, 1, 8, 8))
