"""Second-stage training task: the denoiser on cached latents, with label or text conditioning and caption dropout.

With run.task == "inpaint" the U-Net also takes, concatenated to the noisy latent, a mask and the latents of the
masked image (Stable Diffusion's inpainting layout: latent, mask, masked-image latents). Each step draws a random
mask per item (training/masks.py) and encodes the step's images on the fly with the frozen autoencoder, both the
clean latents (sampled from the posterior) and the masked image's (pixels under the mask set to 0, mid-grey);
the latent cache then supplies only labels and captions. Encoding each step suits small data sets; it also keeps
the two latents of an item consistent under random flips and crops.

With run.task == "upscale" the U-Net takes the low-resolution image (the step's images downscaled by
upscale.factor, diffusion/lowres.py) noised to a random augmentation level in 0..upscale.max_noise_level, and the
level as its class embedding (Rombach et al. 2022, sec. 4.4). Such a model has no user-facing class labels.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..conditioning.types import Conditioning
from ..config import AutoencoderConfig, DenoiserRun
from ..data.images import save_grid
from ..data.latents import LatentCache
from ..diffusion.lowres import downscale, low_res_conditioning
from ..diffusion.sample import sample_latents
from ..errors import InputError
from ..ldm import LatentDiffusion
from ..noise import generators_from_seed, randn
from .masks import random_masks, training_latent_mask
from .parallel import Parallel


def resolve_run(run: DenoiserRun, ae_cfg: AutoencoderConfig, latents: LatentCache, text_dim: int = 0) -> DenoiserRun:
    """Fill in what the data and the autoencoder decide: the backbone's (U-Net's or DiT's) channels, classes and
    context width, and the class names."""
    net = run.backbone
    concat = net.in_channels - net.out_channels if net.in_channels > net.out_channels else 0
    if run.task == "inpaint":
        concat = 1 + ae_cfg.latent_channels  # the mask and the masked image's latents
    if run.task == "upscale":
        concat = ae_cfg.in_channels  # the low-resolution image
    net = replace(net, in_channels=ae_cfg.latent_channels + concat, out_channels=ae_cfg.latent_channels)
    if run.task == "upscale":  # one class embedding per augmentation level; no labels, no class names
        net = replace(net, num_classes=run.upscale.max_noise_level + 1, context_dim=text_dim if run.text_encoder else 0)
        return replace(run.with_backbone(net), class_names=())
    names = tuple(run.class_names or latents.class_names)
    if run.text_encoder:
        net = replace(net, context_dim=text_dim, num_classes=0)
    elif names and not net.num_classes:
        net = replace(net, num_classes=len(names))
    if net.num_classes and not names:
        names = tuple(str(i) for i in range(net.num_classes))
    return replace(run.with_backbone(net), class_names=names)


class DenoiserTask:
    """One micro-step: draw latents from the cache (inpaint: encode the images, each under a random mask), drop
    conditions for guidance, loss from the parameterisation."""

    def __init__(
        self,
        run: DenoiserRun,
        model: LatentDiffusion,
        latents: LatentCache,
        device: torch.device,
        text_cache=None,
        images=None,
    ):
        """run: the resolved configuration; model: the bundle whose U-Net (and trainable text encoder) is trained;
        latents: the encoded training set; text_cache: embeddings of every caption for a frozen text encoder;
        images: the training set itself (items with an "image" (C, H, W) in [-1, 1]), needed by the inpaint task."""
        if run.task in ("inpaint", "upscale") and images is None:
            raise InputError(
                f"the {run.task} task needs the training images: pass images= (the data set) to DenoiserTask"
            )
        self.run, self.ldm, self.latents, self.device = run, model, latents, device
        self.text_cache, self.images = text_cache, images
        self.size = len(latents)
        trainable_text = model.text_encoder is not None and getattr(model.text_encoder, "trainable", False)
        self.model = nn.ModuleDict(
            {"unet": model.unet} | ({"text_encoder": model.text_encoder} if trainable_text else {})
        )
        t = run.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
        self.optimizers = {"denoiser": (opt, params)}
        self._loss_module = _LossModule(self)
        self.loss_fn = self._loss_module  # what micro_step calls; distribute() may wrap it (DDP) or shard it (FSDP)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def distribute(self, parallel: Parallel) -> None:
        parallel.backbone(self.ldm.unet)
        self.loss_fn = parallel.data_parallel(self._loss_module)

    def condition(self, idx: torch.Tensor, gens: Sequence[torch.Generator]) -> Conditioning:
        """Conditioning of a batch; each item's condition is dropped with probability data.caption_dropout."""
        drop = torch.cat([torch.rand(1, generator=g) for g in gens]) < self.run.data.caption_dropout  # (B,)
        if self.ldm.text_encoder is not None:
            caps = ["" if d else self.latents.captions[int(i)] for i, d in zip(idx, drop)]
            if self.text_cache is not None:
                return self.text_cache.get(caps).map(lambda t: t.to(self.device))
            return self.ldm.text_encoder.encode(caps).map(lambda t: t.to(self.device))
        if self.ldm.num_classes:
            labels = self.latents.labels[idx].clone()
            labels[drop | (labels < 0)] = self.run.backbone.num_classes  # the null class
            return Conditioning(labels=labels.to(self.device))
        return Conditioning()

    def batch_images(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.images[int(i)]["image"] for i in idx]).to(self.device)  # (B, C, H, W)

    def draw_latents(self, idx: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
        """Cached latents of items idx (B, c, h, w), each sampled from its stored posterior with its generator."""
        z = self.latents.mean[idx]
        if self.latents.std is not None:
            z = z + self.latents.std[idx] * randn(z.shape, list(gens))
        return z

    @torch.no_grad()
    def encode_sample(self, x: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
        """Scaled training latents of images x (B, C, H, W): z ~ q(z | x) for a KL autoencoder (as the latent cache
        draws them, each item's noise from its generator), the pre-quantisation latents for a VQ one."""
        ae = self.ldm.autoencoder
        if hasattr(ae, "encode"):
            post = ae.encode(x)
            eps = randn(post.mean.shape, list(gens)).to(post.mean)
            return self.ldm.to_latent((post.mean + post.std * eps).float())
        return self.ldm.to_latent(ae.latents(x).float())

    @torch.no_grad()
    def upscale_inputs(self, x: torch.Tensor, gens: Sequence[torch.Generator]) -> tuple[torch.Tensor, Conditioning]:
        """(clean latents (B, c, h, w), the low-resolution conditioning: the images x (B, C, H, W) downscaled, noised
        to a random augmentation level per item drawn from its generator, with the levels as labels)."""
        z = self.encode_sample(x, gens)
        up = self.run.upscale
        low = downscale(x, up.factor)
        levels = torch.cat([torch.randint(0, up.max_noise_level + 1, (1,), generator=g) for g in gens])
        noise = randn((len(x), x.shape[1], *z.shape[-2:]), list(gens))
        return z, low_res_conditioning(low, levels.to(self.device), up, noise.to(x), tuple(z.shape[-2:]))

    @torch.no_grad()
    def inpaint_inputs(self, x: torch.Tensor, gens: Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean latents (B, c, h, w), concat (B, 1 + c, h, w): latent mask and masked-image latents) of images x
        (B, C, H, W), with a random mask per item drawn from its generator."""
        m = torch.cat([random_masks(1, tuple(x.shape[-2:]), g)[0] for g in gens]).to(x)  # (B, 1, H, W), 1 = regenerate
        z = self.encode_sample(x, gens)
        masked = self.ldm.encode(x * (1 - m))  # (B, c, h, w): masked pixels at 0, mid-grey
        return z, torch.cat([training_latent_mask(m, self.ldm.factor), masked], dim=1)

    def loss(self, idx: torch.Tensor, gens: Sequence[torch.Generator], x: torch.Tensor | None) -> torch.Tensor:
        """The mean loss of items idx (their images x for inpaint and upscale), every draw from the items' own
        generators."""
        if self.run.task == "inpaint":
            z, concat = self.inpaint_inputs(x, gens)
            cond = replace(self.condition(idx, gens), concat=concat)
        elif self.run.task == "upscale":
            z, low = self.upscale_inputs(x, gens)
            cond = replace(self.condition(idx, gens), labels=low.labels, concat=low.concat)
        else:
            z = self.ldm.to_latent(self.draw_latents(idx, gens)).to(self.device)
            cond = self.condition(idx, gens)
        return self.ldm.denoiser.loss(z, cond, generator=list(gens)).mean()

    def micro_step(
        self, step: int, idx: torch.Tensor, gens: Sequence[torch.Generator], scale: float, x: torch.Tensor | None
    ) -> dict[str, float]:
        self.model.train()
        loss = self.loss_fn(idx, gens, x)
        (loss * scale).backward()
        return {"loss": loss.item()}

    def export(self, out_dir: Path, weights: nn.Module, step: int) -> Path:
        state = weights.state_dict()
        unet = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
        text = {k[len("text_encoder.") :]: v for k, v in state.items() if k.startswith("text_encoder.")}
        return self.ldm.save(out_dir / "model.safetensors", unet, text or None, step=step)

    def sample(self, out_dir: Path, weights: nn.Module, step: int) -> Path | None:
        unet = weights["unet"].eval()
        text = weights["text_encoder"] if "text_encoder" in weights else self.ldm.text_encoder
        ldm = LatentDiffusion(self.ldm.autoencoder, self.ldm.ae_config, unet, self.run, text)
        cond, uncond, names = grid_conditions(ldm, self.latents)
        n = len(names)
        h, w = self.latents.mean.shape[-2:]
        keep = None
        if self.run.task == "inpaint":  # the first training images, each under a fixed random mask
            x, m, concat = self.grid_edits(n)
            keep = (x, m)
            cond = replace(cond, concat=concat)
            uncond = replace(uncond, concat=concat) if uncond is not None else None
        elif self.run.task == "upscale":  # the first training images, downscaled, at the default noise level
            up = self.run.upscale
            x = self.batch_images(torch.arange(n) % len(self.images))
            levels = torch.full((n,), up.noise_level, dtype=torch.long)
            noise = torch.randn((n, x.shape[1], h, w), generator=torch.Generator().manual_seed(0))
            low = low_res_conditioning(downscale(x, up.factor), levels.to(x.device), up, noise.to(x), (h, w))
            cond = replace(cond, labels=low.labels, concat=low.concat)
            uncond = replace(uncond, labels=low.labels, concat=low.concat) if uncond is not None else None
        z = sample_latents(
            ldm.denoiser,
            (n, ldm.latent_channels, h, w),
            cond,
            uncond,
            steps=20,
            cfg_scale=3.0 if (ldm.num_classes or ldm.text_encoder is not None) else 1.0,
            generator=generators_from_seed(0, n),
        )
        images = ldm.decode(z)  # (n, C, H, W)
        if keep is not None:
            x, m = keep
            images = m * images + (1 - m) * x  # the kept pixels are the input's
        return save_grid(images.cpu(), out_dir / f"samples-{step:07d}.png", nrow=min(n, 8), labels=names)

    @torch.no_grad()
    def grid_edits(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a progress grid of an inpainting model: images (n, C, H, W), their masks (n, 1, H, W) drawn with seed 0,
        and the concat conditioning (n, 1 + c, h, w)."""
        x = torch.stack([self.images[i % len(self.images)]["image"] for i in range(n)]).to(self.device)
        m, _ = random_masks(n, tuple(x.shape[-2:]), torch.Generator().manual_seed(0))
        m = m.to(x)
        return x, m, torch.cat([training_latent_mask(m, self.ldm.factor), self.ldm.encode(x * (1 - m))], dim=1)


class _LossModule(nn.Module):
    """The trained modules (backbone, a trainable text encoder) with the task's loss as forward: what DDP wraps, so
    that every trainable parameter has its gradients averaged over the ranks, and FSDP's root unit."""

    def __init__(self, task: DenoiserTask):
        super().__init__()
        self.model = task.model
        self._loss = task.loss  # a bound method, not a submodule

    def forward(self, idx: torch.Tensor, gens: Sequence[torch.Generator], x: torch.Tensor | None) -> torch.Tensor:
        return self._loss(idx.cpu(), gens, x)  # DDP and FSDP move inputs to a CUDA device; idx indexes CPU data


def grid_conditions(ldm: LatentDiffusion, latents: LatentCache, per_class: int = 1):
    """Conditions for a progress grid: every class (up to 10) or the first distinct captions (up to 8)."""
    if ldm.num_classes:
        labels = [c for c in range(min(ldm.num_classes, 10)) for _ in range(per_class)]
        return ldm.conditioning(labels=labels), ldm.null_conditioning(len(labels)), [ldm.class_names[c] for c in labels]
    if ldm.text_encoder is not None:
        caps = list(dict.fromkeys(c for c in latents.captions if c))[:8] or [""]
        return ldm.conditioning(prompts=caps), ldm.null_conditioning(len(caps)), caps
    return Conditioning(), None, [""] * 8
