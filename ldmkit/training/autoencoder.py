"""First-stage training task: the autoencoder, its patch-GAN discriminator, and what is measured at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..autoencoder import build_autoencoder
from ..autoencoder.files import save_autoencoder
from ..autoencoder.losses import AutoencoderLoss
from ..config import AutoencoderRun, check_multiple
from ..data.common import stack_images
from ..data.images import save_grid
from ..errors import ConfigError, InputError
from .parallel import Parallel


class AutoencoderTask:
    """One micro-step: generator loss (recon + perceptual + KL/VQ + adaptive GAN), then the discriminator's hinge."""

    def __init__(self, run: AutoencoderRun, dataset, device: torch.device, model: nn.Module | None = None):
        """run: the whole configuration; dataset: training images; device: where to train."""
        if run.model.in_channels != run.data.channels:
            raise InputError(
                f"model.in_channels={run.model.in_channels} but data.channels={run.data.channels}; "
                f"set both to the same value"
            )
        check_multiple(
            "data.resolution",
            run.data.resolution,
            run.model.factor,
            f"the autoencoder downsamples by {run.model.factor}",
        )
        self.run, self.device = run, device
        self.images = dataset  # the loop loads each step's images; export and samples read it too
        self.size = len(dataset)
        self.model = (model or build_autoencoder(run.model)).to(device)
        self.loss = AutoencoderLoss(run.loss, run.model.in_channels, run.model.kind).to(device)
        t = run.train
        ae_params = list(self.model.parameters())
        d_params = list(self.loss.discriminator.parameters())
        opt = torch.optim.AdamW(ae_params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
        d_opt = torch.optim.AdamW(d_params, lr=t.lr, betas=(0.5, 0.9), weight_decay=0.0)
        for g in d_opt.param_groups:
            g["lr_scale"] = (run.loss.disc_lr / t.lr) if run.loss.disc_lr > 0 else 1.0
        self.optimizers = {"autoencoder": (opt, ae_params), "discriminator": (d_opt, d_params)}
        self.forward, self.pair = self.model, None  # distribute() may wrap them (DDP)

    def modules(self) -> dict[str, nn.Module]:
        return {"autoencoder": self.model, "discriminator": self.loss.discriminator}

    def distribute(self, parallel: Parallel) -> None:
        if parallel.kind == "fsdp":
            raise ConfigError(
                "train.distributed = 'fsdp' is not supported by train-autoencoder: the GAN's adaptive weight takes "
                "gradients with respect to the whole last layer of the decoder, which FSDP splits over the ranks; "
                "set train.distributed = ddp (or auto), which trains the same weights with a full copy per rank"
            )
        parallel.backbone(self.model)
        self.forward = parallel.data_parallel(self.model)
        self.pair = parallel.data_parallel(_Pair(self.loss.discriminator)) if parallel.kind != "none" else None
        self.loss.grad_mean = parallel.mean_tensor

    def micro_step(
        self, step: int, idx: torch.Tensor, gens: Sequence[torch.Generator], scale: float, x: torch.Tensor | None
    ) -> dict[str, float]:
        self.model.train()
        recon, reg, stats = self.forward(x, sample=True, generator=list(gens))
        disc = self.loss.discriminator
        disc.requires_grad_(False)  # the generator's GAN term must not write discriminator gradients
        g_loss, logs = self.loss.generator_loss(x, recon.float(), reg, step, self.model.last_layer)
        disc.requires_grad_(True)
        (g_loss * scale).backward()
        logs = {"loss": g_loss.item(), **logs, **stats}
        if self.loss.gan_active(step):
            d_loss, d_logs = self.loss.discriminator_loss(x, recon.float(), self.pair)
            (d_loss * scale).backward()
            logs.update(d_logs)
        return logs

    def export(self, out_dir: Path, weights: nn.Module, step: int) -> Path:
        return save_autoencoder(out_dir / "autoencoder.safetensors", weights, self.run, self.images, step)

    def sample(self, out_dir: Path, weights: nn.Module, step: int) -> Path | None:
        x = stack_images(self.images, range(min(8, self.size))).to(self.device)
        with torch.no_grad():
            recon = weights(x, sample=False)[0].float()
        return save_grid(torch.cat([x, recon.clamp(-1, 1)]).cpu(), out_dir / f"recon-{step:07d}.png", nrow=len(x))


class _Pair(nn.Module):
    """The discriminator on real and reconstructed images in one forward call, as DDP wants it."""

    def __init__(self, discriminator: nn.Module):
        super().__init__()
        self.discriminator = discriminator

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.discriminator(real), self.discriminator(fake)
