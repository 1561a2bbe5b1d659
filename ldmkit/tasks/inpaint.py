"""Inpainting: the denoiser also takes, concatenated to the noisy latent, a latent-size mask and the latents of the
masked image (Stable Diffusion's inpainting layout: latent, mask, masked-image latents).

Each training step draws a random mask per item (tasks/masks.py) and encodes the step's images on the fly with the
frozen autoencoder, both the clean latents (sampled from the posterior) and the masked image's (pixels under the mask
set to 0, mid-grey); the latent cache then supplies only labels and captions. Encoding each step suits small data
sets; it also keeps the two latents of an item consistent under random flips and crops.
"""

from __future__ import annotations

import torch

from .masks import latent_mask, random_masks
from .registry import Task, register, with_concat


class Inpaint(Task):
    name = "inpaint"
    summary = "an inpainting model"
    needs = ": it needs an image and a mask"
    commands = ("inpaint", "outpaint")
    routes = ("/sdapi/v1/img2img",)
    trains_on_images = True
    from_noise = False

    def concat_channels(self, run, ae_cfg, current: int) -> int:
        return 1 + ae_cfg.latent_channels  # the mask and the masked image's latents

    def edit_latent_mask(self, mask, size, factor):
        """Max-pooling, the rule of training (latent_mask)."""
        return latent_mask(mask, factor)

    @torch.no_grad()
    def masked_inputs(self, trainer, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The concat input (B, 1 + c, h, w) of images x (B, C, H, W) under masks m (B, 1, H, W), 1 = regenerate."""
        ldm = trainer.ldm
        return torch.cat([latent_mask(m, ldm.factor), ldm.encode(x * (1 - m))], dim=1)

    def training_inputs(self, trainer, idx, gens, x):
        m = torch.cat([random_masks(1, tuple(x.shape[-2:]), g)[0] for g in gens]).to(x)  # (B, 1, H, W)
        z = trainer.encode_sample(x, gens)
        return z, with_concat(trainer.condition(idx, gens), self.masked_inputs(trainer, x, m))

    def preview_inputs(self, trainer, n, cond, uncond, size):
        """The first training images, each under a fixed random mask (seed 0); the kept pixels are the input's."""
        x = torch.stack([trainer.images[i % len(trainer.images)]["image"] for i in range(n)]).to(trainer.device)
        m, _ = random_masks(n, tuple(x.shape[-2:]), torch.Generator().manual_seed(0))
        m = m.to(x)
        concat = self.masked_inputs(trainer, x, m)
        return with_concat(cond, concat), with_concat(uncond, concat), lambda images: m * images + (1 - m) * x


INPAINT = register(Inpaint())
