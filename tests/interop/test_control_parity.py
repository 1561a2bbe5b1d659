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


@pytest.mark.parametrize("two", [False, True], ids=["one ControlNet", "two at different scales"])
def test_sampling_with_controlnets_matches_diffusers_pipeline(two):
    """ldmkit's guided DDIM sampling with one ControlNet, or two at different scales (the second acting on the first
    half of the steps only), ends at StableDiffusionControlNetPipeline's latents (output_type="latent") to 1e-4.
    Both start from the same noise (one generator per image seeded seed + i, given to diffusers as `latents` in its
    VP space), on the trailing 8-step grid ending at sigma 0, guidance 3 with the empty prompt as the negative."""
    diffusers = pytest.importorskip("diffusers")
    from ldmkit.pipelines.control import controlled
    from ldmkit.pipelines.generate import generate
    from ldmkit.pipelines.request import SampleRequest
    from tests.tiny_sd import SD_SCHEDULE, sd_pipeline, tiny_sd

    unet, vae, embeds, ldm = tiny_sd(diffusers)
    hint = (8, 16)  # one halving: the f=2 VAE's 8x8 latents come from 16x16 images
    a, b = (
        randomize(diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint), s, std=0.05)
        for s in (1, 2)
    )
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    n, steps, seed = 2, 8, 4
    ours_a, ours_b = controlnet_from_diffusers(a), controlnet_from_diffusers(b)
    controls = [Control(ours_a, image, 0.7)] + ([Control(ours_b, 1 - image, 0.4, 0.0, 0.5)] if two else [])
    captured, decode = [], ldm.decode
    ldm.decode = lambda z: captured.append(z) or decode(z)
    try:
        req = SampleRequest(n=n, prompts=["a cat"], sampler="ddim", steps=steps, cfg=3.0, seed=seed, batch_size=n)
        with controlled(ldm, controls, steps):
            generate(ldm, req)
        generate(ldm, req)  # without the controls
    finally:
        del ldm.decode
    ours, plain = captured
    assert (ours - plain).abs().max() > 1e-3  # the comparison is not vacuous: the controls moved the latents

    sched = diffusers.DDIMScheduler(
        **SD_SCHEDULE, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False
    )
    noise = torch.cat([torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])
    # ldmkit starts at x = noise * sigma_max; in diffusers' VP space that is noise * sqrt(1 - abar) at t = 999
    noise = noise * (1 - sched.alphas_cumprod[-1]).sqrt()
    pipe = sd_pipeline(diffusers.StableDiffusionControlNetPipeline, unet, vae, sched, controlnet=[a, b] if two else a)
    theirs = pipe(
        image=[image, 1 - image] if two else image,
        prompt_embeds=embeds["a cat"].expand(n, -1, -1),
        negative_prompt_embeds=embeds[""].expand(n, -1, -1),
        controlnet_conditioning_scale=[0.7, 0.4] if two else 0.7,
        control_guidance_start=[0.0, 0.0] if two else 0.0,
        control_guidance_end=[1.0, 0.5] if two else 1.0,
        num_inference_steps=steps,
        guidance_scale=3.0,
        latents=noise,
        output_type="latent",
    ).images
    assert ours.shape == theirs.shape == (n, 4, 8, 8)
    err = (ours.double() - theirs.double()).abs().max() / theirs.double().abs().max()
    assert err < 1e-4, f"relative difference {err:.2e}"
