"""Requests with different ControlNet controls, or none, in one forward pass: each image is bit for bit what its
request alone gives."""

import pytest
import torch

from ldmkit.denoisers.controlnet import Control, Controlled, ControlNet
from ldmkit.ldm import LatentDiffusion
from ldmkit.pipelines.batching import generate_together
from ldmkit.pipelines.control import controlled, per_sample_controls
from ldmkit.pipelines.request import SampleRequest

STEPS = 4


def random_controlnet(ldm, seed: int) -> ControlNet:
    """A ControlNet for `ldm` with random weights (an untrained one adds zero)."""
    net = ControlNet.from_unet(ldm.unet, ldm.factor)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def ldm(tiny_text_ldm):
    return LatentDiffusion.load(tiny_text_ldm)


@pytest.fixture(scope="module")
def nets(ldm):
    return random_controlnet(ldm, 1), random_controlnet(ldm, 2)


def alone(ldm, req, controls):
    """The request's images alone, its controls around the model as the command line puts them."""
    with controlled(ldm, list(controls), req.steps):
        return generate_together(ldm, [req])[0]


def test_controlled_and_plain_requests_share_a_batch_and_keep_their_images(ldm, nets):
    edges, colour = nets
    g = torch.Generator().manual_seed(0)
    image = lambda: torch.rand(1, 3, 16, 16, generator=g)  # noqa: E731
    a = (Control(edges, image(), 0.8, 0.0, 0.5),)
    b = (Control(colour, image(), 1.3), Control(edges, image(), 0.5, 0.5, 1.0))  # two, another order and window
    c = (Control(edges, image(), 0.0),)  # scale 0: no control
    d = (Control(edges, image(), 1.0, 0.25, 1.0), Control(colour, image(), 0.6, 0.0, 0.75))
    reqs = [
        SampleRequest(n=1, prompts=["red"], cfg=3.0, seed=5, steps=STEPS),
        SampleRequest(n=2, prompts=["blue"], cfg=4.0, seed=1, steps=STEPS),
        SampleRequest(n=1, prompts=["red"], cfg=3.0, seed=5, steps=STEPS),  # a's seed, no control
        SampleRequest(n=1, prompts=["green"], cfg=2.0, seed=9, steps=STEPS),
        SampleRequest(n=2, prompts=["grey"], cfg=3.0, seed=3, steps=STEPS),
    ]
    controls = [a, b, (), c, d]
    together = generate_together(ldm, reqs, batch_size=4, controls=controls)  # passes of 4, 3: across requests
    assert ldm.denoiser.backbone is ldm.unet, "the model is left as it was"
    for req, steer, got in zip(reqs, controls, together):
        assert torch.equal(got, alone(ldm, req, steer)), steer
        assert torch.equal(got, generate_together(ldm, [req], controls=[steer])[0])
    assert not torch.equal(together[0], together[2]), "the control changes the image of the same seed"
    assert torch.equal(together[3], generate_together(ldm, [reqs[3]])[0]), "scale 0 is no control, bit for bit"


def test_each_controlnet_runs_once_a_step_over_the_images_that_use_it(ldm, nets):
    edges, colour = nets
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    per_image = [(Control(edges, image, 0.8),), (), (Control(edges, 1 - image, 0.5), Control(colour, image, 1.0))]
    calls = []
    hooks = [net.register_forward_hook(lambda m, i, o: calls.append((m, len(i[0])))) for net in nets]
    try:
        with per_sample_controls(ldm, per_image, STEPS):
            ctl = ldm.denoiser.backbone
            assert isinstance(ctl, Controlled) and [c.rows for c in ctl.controls] == [(0,), (2,), (2,)]
            x = torch.randn(6, ldm.latent_channels, 16 // ldm.factor, 16 // ldm.factor)  # 3 images, guidance's 2 copies
            ctl(x, torch.full((6,), 0.5), ldm.conditioning(prompts=["a"] * 6))
    finally:
        for h in hooks:
            h.remove()
    assert ldm.denoiser.backbone is ldm.unet
    assert calls == [(edges, 4), (colour, 2)], "one pass of edges over images 0 and 2 (both branches)"
