"""Inpainting agrees with diffusers' StableDiffusionInpaintPipeline (a test oracle) on the final latents, for a
dedicated 9-channel inpainting U-Net (concat conditioning) and for a plain 4-channel U-Net (the latent blend).

Shared alignment: tiny random diffusers U-Net and VAE (f=2), converted to ldmkit; fixed prompt embeddings given to
diffusers as prompt_embeds / negative_prompt_embeds (no tokenizer or text model); guidance 3; EulerDiscreteScheduler
with timestep_spacing="trailing" (ldmkit's default grid, starting from noise * sigma_max as ldmkit does); one CPU
generator per image seeded seed + i; the mask covers whole 2 x 2 pixel cells, so diffusers' nearest-neighbour
resize to latent size and ldmkit's max-pooling give the same latent mask; output_type="latent".
"""

from dataclasses import replace

import pytest
import torch

from ldmkit.interop.convert import convert
from ldmkit.ldm import LatentDiffusion
from ldmkit.noise import generators_from_seed, randn
from ldmkit.pipelines.inpaint import inpaint
from ldmkit.pipelines.request import SampleRequest

diffusers = pytest.importorskip("diffusers")

from tests.tiny_sd import SD_SCHEDULE, sd_pipeline, tiny_sd  # noqa: E402

N, STEPS, SEED, CFG = 2, 10, 7, 3.0


def picture_and_mask():
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1  # (1, 3, 16, 16)
    m = torch.zeros(1, 1, 16, 16)
    m[..., 2:10, 4:14] = 1  # whole 2 x 2 cells
    return x, m


def ldmkit_latents(ldm, x, m):
    """The final latents of ldmkit's inpaint pipeline (the input of its decode)."""
    captured = []
    decode = ldm.decode
    ldm.decode = lambda z: captured.append(z) or decode(z)
    try:
        req = SampleRequest(n=N, prompts=["a cat"], sampler="euler", steps=STEPS, cfg=CFG, seed=SEED, batch_size=N)
        inpaint(ldm, req, x, m)
    finally:
        del ldm.decode
    return captured[0]


def pipeline(unet, vae):
    sched = diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="trailing")
    return sd_pipeline(diffusers.StableDiffusionInpaintPipeline, unet, vae, sched)


def relative(ours, theirs) -> float:
    return float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max())


def test_a_9_channel_inpainting_model_matches_diffusers():
    """Concat conditioning (latent, mask, masked-image latents). Alignment beyond the module's: diffusers is given
    the masked image's latents (masked_image_latents = ldmkit's posterior mean of the image with the masked pixels
    at 0), since its own encoding samples the posterior; the initial noise then comes from the generators alone."""
    unet, vae, embeds, ldm = tiny_sd(diffusers, 9)
    x, m = picture_and_mask()
    ours = ldmkit_latents(ldm, x, m)
    theirs = pipeline(unet, vae)(
        prompt_embeds=embeds["a cat"].expand(N, -1, -1),
        negative_prompt_embeds=embeds[""].expand(N, -1, -1),
        image=(x + 1) / 2,  # diffusers' tensor range [0, 1]; unused, as the masked image's latents are given
        mask_image=m,
        masked_image_latents=ldm.encode(x * (1 - m)),
        height=16,
        width=16,
        strength=1.0,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        generator=[torch.Generator("cpu").manual_seed(SEED + i) for i in range(N)],
        output_type="latent",
    ).images
    assert ours.shape == theirs.shape == (N, 4, 8, 8)
    assert relative(ours, theirs) < 1e-4, f"relative difference {relative(ours, theirs):.2e}"
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # not vacuous: the two seeds give two images


def test_a_4_channel_model_matches_diffusers_blend_mode():
    """The latent blend. Both keep the latent cells outside the mask at the original noised to the current level
    with one fixed noise, and end on the original. Alignment beyond the module's:
    - noise: ldmkit draws the initial noise n1 and then the blend's noise n2 from each image's generator; diffusers
      uses one tensor for both, so it is given latents = keep * n2 + (1 - keep) * n1 (noise is elementwise).
    - the first step: diffusers blends after each step, so its first U-Net call sees pure noise in the kept cells;
      ldmkit blends before every call, so its first sees the original noised to sigma_max. diffusers is started
      from ldmkit's first input (its prepare_latents wrapped to blend once); every later step is diffusers' own.
    - the image latents: diffusers gets ldmkit's posterior mean (a 4-channel `image` is taken as latents)."""
    unet, vae, embeds, ldm = tiny_sd(diffusers, 4)
    x, m = picture_and_mask()
    ours = ldmkit_latents(ldm, x, m)

    x0 = ldm.encode(x)  # (1, 4, 8, 8)
    keep = 1 - torch.nn.functional.max_pool2d(m, 2)  # (1, 1, 8, 8)
    gens = generators_from_seed(SEED, N)
    n1 = randn((N, 4, 8, 8), gens)  # ldmkit's initial noise, then the blend's, from the same generators
    n2 = randn((N, 4, 8, 8), gens)
    pipe = pipeline(unet, vae)
    prepare = pipe.prepare_latents

    def first_blend(*args, **kwargs):
        latents, noise, image_latents = prepare(*args, **kwargs)
        known = image_latents + pipe.scheduler.init_noise_sigma * noise
        return keep * known + (1 - keep) * latents, noise, image_latents

    pipe.prepare_latents = first_blend
    theirs = pipe(
        prompt_embeds=embeds["a cat"].expand(N, -1, -1),
        negative_prompt_embeds=embeds[""].expand(N, -1, -1),
        image=x0,
        mask_image=m,
        masked_image_latents=x0,  # unused by a 4-channel U-Net; given so that no pixels are masked
        latents=keep * n2 + (1 - keep) * n1,
        height=16,
        width=16,
        strength=1.0,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        output_type="latent",
    ).images
    assert ours.shape == theirs.shape == (N, 4, 8, 8)
    assert relative(ours, theirs) < 1e-4, f"relative difference {relative(ours, theirs):.2e}"
    assert torch.allclose(ours * keep, (x0 * keep).expand_as(ours), atol=1e-5)  # the kept cells end on the original
    assert ((ours - x0) * (1 - keep)).abs().max() > 1e-2  # not vacuous: the masked cells were sampled


def test_an_ldmkit_inpainting_model_keeps_its_task_through_a_diffusers_folder(tmp_path):
    """The folder records the task (model_index.json's _ldmkit entry); before, the model came back as "generate",
    and inpaint brought its mask to latent size by nearest neighbour instead of the max-pooling it was trained with."""
    _, _, _, ldm = tiny_sd(diffusers, 9)
    ldm.run = replace(ldm.run, task="inpaint")
    ldm.text_encoder = None  # FixedText has no weights to export; the U-Net keeps its cross-attention
    folder = convert(ldm.save(tmp_path / "inpaint.safetensors"), tmp_path / "folder", to="diffusers")
    back = LatentDiffusion.load(convert(folder, tmp_path / "back.safetensors", to="ldm"))
    assert back.task == "inpaint"
