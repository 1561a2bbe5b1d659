"""ControlNet parity with diffusers (a test oracle only): a tiny ControlNetModel converted to ldmkit gives the same
residuals, and the U-Net with them the same output, to 1e-4; the key map holds both ways."""

import pytest
import torch

from ldmkit.conditioning.types import Conditioning
from ldmkit.denoisers.controlnet import Control, Controlled
from ldmkit.interop.diffusers import unet_from_diffusers
from ldmkit.interop.diffusers_controlnet import (
    controlnet_from_diffusers,
    controlnet_state_to_diffusers,
    controlnet_to_diffusers,
)
from tests.tiny_sd import TINY_UNET, randomize


@pytest.fixture(scope="module")
def models():
    diffusers = pytest.importorskip("diffusers")
    unet = randomize(diffusers.UNet2DConditionModel(**TINY_UNET), 0, std=0.05)
    hint = (8, 16, 16, 32)  # the hint encoder's channels
    a = randomize(diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint), 1, std=0.05)
    b = randomize(diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint), 2, std=0.05)
    return unet, a, b


def _inputs():
    g = torch.Generator().manual_seed(5)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([3, 640]),
        torch.randn(2, 7, 16, generator=g),
        torch.rand(2, 3, 64, 64, generator=g),
    )


@torch.no_grad()
def test_a_converted_controlnet_gives_diffusers_residuals_and_unet_output(models):
    unet, a, b = models
    x, t, ctx, image = _inputs()
    ours_unet, ours_a, ours_b = unet_from_diffusers(unet), controlnet_from_diffusers(a), controlnet_from_diffusers(b)
    down, mid = a(x, t, encoder_hidden_states=ctx, controlnet_cond=image, return_dict=False)
    mine = ours_a(x, t.float(), Conditioning(context=ctx), image)
    assert len(mine) == len(down) + 1
    for theirs, own in zip([*down, mid], mine):
        assert (theirs - own).abs().max() < 1e-4

    # two ControlNets at different scales, summed, into the U-Net
    down_b, mid_b = b(
        x, t, encoder_hidden_states=ctx, controlnet_cond=1 - image, conditioning_scale=0.4, return_dict=False
    )
    down_a, mid_a = a(x, t, encoder_hidden_states=ctx, controlnet_cond=image, conditioning_scale=0.7, return_dict=False)
    want = unet(
        x,
        t,
        encoder_hidden_states=ctx,
        down_block_additional_residuals=[p + q for p, q in zip(down_a, down_b)],
        mid_block_additional_residual=mid_a + mid_b,
    ).sample
    got = Controlled(ours_unet, [Control(ours_a, image, 0.7), Control(ours_b, 1 - image, 0.4)])(
        x, t.float(), Conditioning(context=ctx)
    )
    err = (want - got).abs().max()
    assert err < 1e-4, err
    assert (want - unet(x, t, encoder_hidden_states=ctx).sample).abs().max() > 1e-3  # the control mattered


def test_the_key_map_holds_both_ways(models):
    _, a, _ = models
    config, state = controlnet_state_to_diffusers(controlnet_from_diffusers(a))
    theirs = a.state_dict()
    assert set(state) == set(theirs)
    assert all(torch.equal(state[k], theirs[k]) for k in theirs)
    assert config["conditioning_embedding_out_channels"] == [8, 16, 16, 32]
    x, t, ctx, image = _inputs()
    back = controlnet_to_diffusers(controlnet_from_diffusers(a))
    with torch.no_grad():
        for p, q in zip(
            torch.utils._pytree.tree_leaves(a(x, t, ctx, image, return_dict=False)),
            torch.utils._pytree.tree_leaves(back(x, t, ctx, image, return_dict=False)),
        ):
            assert torch.equal(p, q)
