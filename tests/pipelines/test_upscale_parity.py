"""ldmkit upscale agrees with diffusers' StableDiffusionUpscalePipeline (a test oracle) on the final latents, and an
upscaler survives conversion to a diffusers folder and back.

Alignment: a tiny random diffusers U-Net with 7 input channels (4 latent + 3 image) and a noise-level class
embedding, the tiny f=2 VAE with the x4 upscaler's latent scale 0.08333 (so the upscale factor is the VAE's, 2, as
the x4 upscaler's is its VAE's 4); fixed prompt embeddings as prompt_embeds / negative_prompt_embeds; guidance 3;
EulerDiscreteScheduler with timestep_spacing="trailing" (ldmkit's grid); the low_res_scheduler is SD x4's
(DDPMScheduler, scaled_linear 0.0001..0.02), ldmkit's default augmentation; one CPU generator seeded SEED, from
which both draw the augmentation noise first and the initial latent noise second; output_type="latent".
"""

from dataclasses import replace

import pytest
import torch

from ldmkit.config import UpscaleConfig
from ldmkit.interop.convert import convert
from ldmkit.ldm import LatentDiffusion
from ldmkit.pipelines.request import SampleRequest
from ldmkit.pipelines.upscale import UpscaleOptions, upscale

diffusers = pytest.importorskip("diffusers")

from tests.tiny_sd import SD_SCHEDULE, tiny_sd  # noqa: E402

STEPS, SEED, CFG, LEVEL = 8, 11, 3.0, 40
LOW_RES = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")


def tiny_upscaler():
    """(diffusers U-Net, VAE, prompt embeddings, the same upscaler in ldmkit): tiny_sd's parts with 7 U-Net inputs,
    400 noise-level embeddings and the x4 upscaler's latent scale."""
    unet, vae, embeds, ldm = tiny_sd(diffusers, 7, num_class_embeds=400, scaling_factor=0.08333)
    ldm.run = replace(ldm.run, task="upscale", upscale=UpscaleConfig(factor=2, max_noise_level=350))
    return unet, vae, embeds, ldm


def low_res_picture():
    return torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1  # (1, 3, 8, 8) in [-1, 1]


def relative(ours, theirs) -> float:
    return float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max())


def test_upscale_matches_diffusers_upscale_pipeline():
    unet, vae, embeds, ldm = tiny_upscaler()
    x = low_res_picture()
    captured = []
    decode = ldm.decode
    ldm.decode = lambda z: captured.append(z) or decode(z)
    req = SampleRequest(n=1, prompts=["a cat"], sampler="euler", steps=STEPS, cfg=CFG, seed=SEED)
    images, _ = upscale(ldm, x, req, UpscaleOptions(noise_level=LEVEL))
    del ldm.decode
    ours = captured[0]

    pipe = diffusers.StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        low_res_scheduler=diffusers.DDPMScheduler(**LOW_RES),
        scheduler=diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="trailing"),
        max_noise_level=350,
    )
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        prompt_embeds=embeds["a cat"],
        negative_prompt_embeds=embeds[""],
        image=(x + 1) / 2,  # diffusers' tensor range [0, 1]
        noise_level=LEVEL,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="latent",
    ).images
    assert ours.shape == theirs.shape == (1, 4, 8, 8)
    assert relative(ours, theirs) < 1e-4, f"relative difference {relative(ours, theirs):.2e}"
    assert images.shape == (1, 3, 16, 16)  # twice the input's size

    # not vacuous: the noise level reaches the U-Net (another level, another result)
    captured.clear()
    ldm.decode = lambda z: captured.append(z) or decode(z)
    upscale(ldm, x, req, UpscaleOptions(noise_level=LEVEL + 100))
    del ldm.decode
    assert relative(captured[0], theirs) > 1e-3


def test_an_upscaler_converts_to_a_diffusers_folder_and_back(tmp_path):
    """ldm -> diffusers folder (with low_res_scheduler/ and max_noise_level) -> ldm keeps the task, the augmentation
    and every weight; diffusers itself loads the folder's U-Net with its 7 inputs and noise-level embedding."""
    _, _, _, ldm = tiny_upscaler()
    ldm.text_encoder = None  # FixedText has no weights to export; the U-Net keeps its cross-attention
    src = ldm.save(tmp_path / "up.safetensors")
    folder = convert(src, tmp_path / "up-diffusers", to="diffusers")
    assert (folder / "low_res_scheduler" / "scheduler_config.json").is_file()
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    assert unet.config.in_channels == 7 and unet.config.num_class_embeds == 400
    low_res = diffusers.DDPMScheduler.from_pretrained(folder / "low_res_scheduler")
    assert low_res.config.beta_schedule == "scaled_linear" and low_res.config.beta_end == 0.02

    back = LatentDiffusion.load(convert(folder, tmp_path / "back.safetensors", to="ldm"))
    assert back.task == "upscale"
    assert back.run.upscale == ldm.run.upscale
    for k, v in ldm.unet.state_dict().items():
        assert torch.equal(back.unet.state_dict()[k], v), k


def test_an_upscaler_survives_a_single_file_round_trip(tmp_path):
    _, _, _, ldm = tiny_upscaler()
    ldm.text_encoder = None
    src = ldm.save(tmp_path / "up.safetensors")
    single = convert(src, tmp_path / "single.safetensors", to="single-file")
    back = LatentDiffusion.load(convert(single, tmp_path / "back.safetensors", to="ldm"))
    assert back.task == "upscale" and back.run.upscale == ldm.run.upscale
