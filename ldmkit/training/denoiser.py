"""Second-stage training task: the denoiser on cached latents, with label or text conditioning and caption dropout."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..conditioning.types import Conditioning
from ..config import AutoencoderConfig, DenoiserRun
from ..data.images import save_grid
from ..data.latents import LatentCache
from ..diffusion.sample import sample_latents
from ..ldm import LatentDiffusion
from ..noise import generators_from_seed
from .ema import EMA


def resolve_run(run: DenoiserRun, ae_cfg: AutoencoderConfig, latents: LatentCache, text_dim: int = 0) -> DenoiserRun:
    """Fill in what the data and the autoencoder decide: channels, classes, context width, class names."""
    unet = run.unet
    concat = unet.in_channels - unet.out_channels if unet.in_channels > unet.out_channels else 0
    unet = replace(unet, in_channels=ae_cfg.latent_channels + concat, out_channels=ae_cfg.latent_channels)
    names = tuple(run.class_names or latents.class_names)
    if run.text_encoder:
        unet = replace(unet, context_dim=text_dim, num_classes=0)
    elif names and not unet.num_classes:
        unet = replace(unet, num_classes=len(names))
    if unet.num_classes and not names:
        names = tuple(str(i) for i in range(unet.num_classes))
    return replace(run, unet=unet, class_names=names)


class DenoiserTask:
    """One micro-step: draw latents from the cache, drop conditions for guidance, loss from the parameterisation."""

    def __init__(
        self, run: DenoiserRun, model: LatentDiffusion, latents: LatentCache, device: torch.device, text_cache=None
    ):
        """run: the resolved configuration; model: the bundle whose U-Net (and trainable text encoder) is trained;
        latents: the encoded training set; text_cache: embeddings of every caption for a frozen text encoder."""
        self.run, self.ldm, self.latents, self.device = run, model, latents, device
        self.text_cache = text_cache
        self.size = len(latents)
        trainable_text = model.text_encoder is not None and getattr(model.text_encoder, "trainable", False)
        self.model = nn.ModuleDict(
            {"unet": model.unet} | ({"text_encoder": model.text_encoder} if trainable_text else {})
        )
        t = run.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
        self.optimizers = {"denoiser": (opt, params)}

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def condition(self, idx: torch.Tensor, gen: torch.Generator) -> Conditioning:
        """Conditioning of a batch; each item's condition is dropped with probability data.caption_dropout."""
        drop = torch.rand(len(idx), generator=gen) < self.run.data.caption_dropout  # (B,)
        if self.ldm.text_encoder is not None:
            caps = ["" if d else self.latents.captions[int(i)] for i, d in zip(idx, drop)]
            if self.text_cache is not None:
                return self.text_cache.get(caps).map(lambda t: t.to(self.device))
            return self.ldm.text_encoder.encode(caps).map(lambda t: t.to(self.device))
        if self.run.unet.num_classes:
            labels = self.latents.labels[idx].clone()
            labels[drop | (labels < 0)] = self.run.unet.num_classes  # the null class
            return Conditioning(labels=labels.to(self.device))
        return Conditioning()

    def micro_step(self, step: int, idx: torch.Tensor, gen: torch.Generator, scale: float) -> dict[str, float]:
        self.model.train()
        z = self.ldm.to_latent(self.latents.draw(idx, gen)).to(self.device)
        cond = self.condition(idx, gen)
        loss = self.ldm.denoiser.loss(z, cond, generator=gen).mean()
        (loss * scale).backward()
        return {"loss": loss.item()}

    def export(self, out_dir: Path, ema: EMA | None, step: int) -> Path:
        state = (ema.model if ema is not None else self.model).state_dict()
        unet = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
        text = {k[len("text_encoder.") :]: v for k, v in state.items() if k.startswith("text_encoder.")}
        return self.ldm.save(out_dir / "model.safetensors", unet, text or None, step=step)

    def sample(self, out_dir: Path, ema: EMA | None, step: int) -> Path | None:
        unet = ema.model["unet"] if ema is not None else self.ldm.unet
        unet.eval()
        ldm = LatentDiffusion(self.ldm.autoencoder, self.ldm.ae_config, unet, self.run, self.ldm.text_encoder)
        cond, uncond, names = grid_conditions(ldm, self.latents)
        n = len(names)
        h, w = self.latents.mean.shape[-2:]
        z = sample_latents(
            ldm.denoiser,
            (n, ldm.latent_channels, h, w),
            cond,
            uncond,
            steps=20,
            cfg_scale=3.0 if (ldm.num_classes or ldm.text_encoder is not None) else 1.0,
            generator=generators_from_seed(0, n),
        )
        return save_grid(ldm.decode(z).cpu(), out_dir / f"samples-{step:07d}.png", nrow=min(n, 8), labels=names)


def grid_conditions(ldm: LatentDiffusion, latents: LatentCache, per_class: int = 1):
    """Conditions for a progress grid: every class (up to 10) or the first distinct captions (up to 8)."""
    if ldm.num_classes:
        labels = [c for c in range(min(ldm.num_classes, 10)) for _ in range(per_class)]
        return ldm.conditioning(labels=labels), ldm.null_conditioning(len(labels)), [ldm.class_names[c] for c in labels]
    if ldm.text_encoder is not None:
        caps = list(dict.fromkeys(c for c in latents.captions if c))[:8] or [""]
        return ldm.conditioning(prompts=caps), ldm.null_conditioning(len(caps)), caps
    return Conditioning(), None, [""] * 8
