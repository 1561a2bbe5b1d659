"""Tiny random Stable Diffusion components for parity tests: diffusers' U-Net and VAE (f=2) and the same model in
ldmkit, with fixed prompt embeddings, so no tokenizer or text model is needed on either side."""

import torch

from ldmkit.conditioning.types import Conditioning
from ldmkit.config import DataConfig, DenoiserRun
from ldmkit.interop.diffusers import unet_from_diffusers, vae_from_diffusers
from ldmkit.ldm import LatentDiffusion

SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
)


class FixedText:
    """A text encoder that maps each prompt to a fixed embedding (1, T, D); diffusers gets the same as
    prompt_embeds / negative_prompt_embeds."""

    def __init__(self, table: dict[str, torch.Tensor]):
        self.table = table

    def encode(self, prompts):
        return Conditioning(context=torch.cat([self.table[p] for p in prompts]))


# the tiny Stable Diffusion U-Net layout of the parity tests (diffusers' UNet2DConditionModel arguments)
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16,
    norm_num_groups=8,
    attention_head_dim=2,
)
# the tiny f=2 VAE beside it (diffusers' AutoencoderKL arguments, but the latent scaling factor)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(16, 32),
    latent_channels=4,
    norm_num_groups=8,
    layers_per_block=1,
)


def randomize(model, seed: int = 1, std: float = 0.2):
    """Every parameter drawn from N(0, std^2) with `seed`, the layers initialised to zero included (else the outputs
    are trivially zero), so the networks do something visible; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def rel_err(a, b):
    """|a - b| / |a| over whole tensors."""
    return ((a - b).norm() / a.norm()).item()


def tiny_sd(diffusers, in_channels: int = 4, num_class_embeds: int | None = None, scaling_factor: float = 0.5):
    """(diffusers U-Net, diffusers VAE, prompt embeddings for "a cat" and "", the same model in ldmkit) with
    `in_channels` U-Net inputs (4, 9 for an inpainting model, 7 for an upscaler), `num_class_embeds` class
    embeddings (an upscaler's noise levels) and the VAE's latent `scaling_factor`."""
    unet = randomize(
        diffusers.UNet2DConditionModel(**TINY_UNET | dict(in_channels=in_channels, num_class_embeds=num_class_embeds)),
        1,
        std=0.1,
    )
    vae = randomize(diffusers.AutoencoderKL(**TINY_VAE, scaling_factor=scaling_factor), 2, std=0.1)
    g = torch.Generator().manual_seed(3)
    embeds = {"a cat": torch.randn(1, 5, 16, generator=g), "": torch.randn(1, 5, 16, generator=g)}
    ours_unet, ours_vae = unet_from_diffusers(unet), vae_from_diffusers(vae)
    run = DenoiserRun(unet=ours_unet.cfg, data=DataConfig(resolution=16, channels=3))  # SD's schedule, eps
    return unet, vae, embeds, LatentDiffusion(ours_vae, ours_vae.cfg, ours_unet, run, FixedText(embeds))


def sd_pipeline(pipeline_class, unet, vae, scheduler, **parts):
    """A diffusers Stable Diffusion pipeline of `pipeline_class` around the tiny parts (and `parts`, e.g. its
    controlnet), without text encoder, tokenizer or safety checker (prompt embeddings are passed directly), progress
    bar off."""
    pipe = pipeline_class(
        **parts,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
