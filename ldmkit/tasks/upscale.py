"""Super-resolution: the denoiser takes the low-resolution image (the step's images downscaled by upscale.factor,
diffusion/lowres.py) noised to a random augmentation level in 0..upscale.max_noise_level, and the level as its class
embedding (Rombach et al. 2022, sec. 4.4). Such a model has no user-facing class labels."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..config import check_multiple
from ..diffusion.lowres import downscale, low_res_conditioning
from ..noise import randn
from .registry import Task, register, with_concat


class Upscale(Task):
    name = "upscale"
    summary = "an upscaler"
    needs = ": it needs a low-resolution image"
    commands = ("upscale",)
    routes = ()
    user_labels = False
    trains_on_images = True
    from_noise = False

    def concat_channels(self, run, ae_cfg, current: int) -> int:
        return ae_cfg.in_channels  # the low-resolution image

    def resolve(self, run, net, text_dim, names):
        """One class embedding per augmentation level; no labels, no class names."""
        return replace(
            net, num_classes=run.upscale.max_noise_level + 1, context_dim=text_dim if run.text_encoder else 0
        ), ()

    def check_run(self, run, ae_factor, backbone_factor, backbone):
        super().check_run(run, ae_factor, backbone_factor, backbone)
        f = ae_factor * backbone_factor
        check_multiple(
            "data.resolution",
            run.data.resolution,
            run.upscale.factor * f // math.gcd(run.upscale.factor, f),
            f"the low-resolution input is 1/{run.upscale.factor} of it, and its latent must divide by the "
            f"{backbone}'s {backbone_factor}",
        )

    @torch.no_grad()
    def training_inputs(self, trainer, idx, gens, x):
        """The clean latents and the low-resolution conditioning: x downscaled, noised to a random augmentation level
        per item drawn from its generator, with the levels as labels."""
        z = trainer.encode_sample(x, gens)
        up = trainer.run.upscale
        levels = torch.cat([torch.randint(0, up.max_noise_level + 1, (1,), generator=g) for g in gens])
        noise = randn((len(x), x.shape[1], *z.shape[-2:]), list(gens))
        low = low_res_conditioning(
            downscale(x, up.factor), levels.to(trainer.device), up, noise.to(x), tuple(z.shape[-2:])
        )
        return z, with_concat(trainer.condition(idx, gens), low.concat, low.labels)

    def preview_inputs(self, trainer, n, cond, uncond, size):
        """The first training images, downscaled, at the default noise level."""
        up = trainer.run.upscale
        idx = torch.arange(n) % len(trainer.images)
        x = torch.stack([trainer.images[int(i)]["image"] for i in idx]).to(trainer.device)
        levels = torch.full((n,), up.noise_level, dtype=torch.long)
        noise = torch.randn((n, x.shape[1], *size), generator=torch.Generator().manual_seed(0))
        low = low_res_conditioning(downscale(x, up.factor), levels.to(x.device), up, noise.to(x), size)
        return with_concat(cond, low.concat, low.labels), with_concat(uncond, low.concat, low.labels), None


UPSCALE = register(Upscale())
