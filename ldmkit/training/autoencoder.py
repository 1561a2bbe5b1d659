"""First-stage training task: the autoencoder, its patch-GAN discriminator, and what is measured at the end."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import checkpoint
from ..autoencoder import build_autoencoder
from ..autoencoder.vae import AutoencoderKL
from ..autoencoder.losses import AutoencoderLoss
from ..config import AutoencoderRun, to_dict
from .ema import EMA


def stack_images(dataset, idx) -> torch.Tensor:
    return torch.stack([dataset[int(i)]["image"] for i in idx])  # (B, C, H, W)


class AutoencoderTask:
    """One micro-step: generator loss (recon + perceptual + KL/VQ + adaptive GAN), then the discriminator's hinge."""

    def __init__(self, run: AutoencoderRun, dataset, device: torch.device, model: nn.Module | None = None):
        """run: the whole configuration; dataset: training images; device: where to train."""
        if run.model.in_channels != run.data.channels:
            raise ValueError(f"model.in_channels={run.model.in_channels} but data.channels={run.data.channels}; "
                             f"set both to the same value")
        if run.data.resolution % run.model.factor:
            raise ValueError(f"data.resolution={run.data.resolution} is not divisible by the autoencoder's factor "
                             f"{run.model.factor}")
        self.run, self.data, self.device = run, dataset, device
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

    def modules(self) -> dict[str, nn.Module]:
        return {"autoencoder": self.model, "discriminator": self.loss.discriminator}

    def micro_step(self, step: int, idx: torch.Tensor, gen: torch.Generator, scale: float) -> dict[str, float]:
        x = stack_images(self.data, idx).to(self.device)
        self.model.train()
        recon, reg, stats = self.model(x, sample=True, generator=gen)
        disc = self.loss.discriminator
        disc.requires_grad_(False)  # the generator's GAN term must not write discriminator gradients
        g_loss, logs = self.loss.generator_loss(x, recon.float(), reg, step, self.model.last_layer)
        disc.requires_grad_(True)
        (g_loss * scale).backward()
        logs = {"loss": g_loss.item(), **logs, **stats}
        if self.loss.gan_active(step):
            d_loss, d_logs = self.loss.discriminator_loss(x, recon.float())
            (d_loss * scale).backward()
            logs.update(d_logs)
        return logs

    def export(self, out_dir: Path, ema: EMA | None, step: int) -> Path:
        model = ema.model if ema is not None else self.model
        return export_autoencoder(out_dir / "autoencoder.safetensors", model, self.run, self.data, step)

    def sample(self, out_dir: Path, ema: EMA | None, step: int) -> Path | None:
        from ..data.images import save_grid

        model = ema.model if ema is not None else self.model
        x = stack_images(self.data, range(min(8, self.size))).to(self.device)
        with torch.no_grad():
            recon = model(x, sample=False)[0].float()
        return save_grid(torch.cat([x, recon.clamp(-1, 1)]).cpu(), out_dir / f"recon-{step:07d}.png", nrow=len(x))


@torch.no_grad()
def latent_scale(model: nn.Module, dataset, device, n: int = 512, batch: int = 64) -> float:
    """1 / std of the unscaled latents the denoiser trains on, over up to n training images (Rombach et al. 2022,
    section 4.3.2). For a KL autoencoder those are posterior samples, so the posterior's own variance counts:
    std^2 = var(means) + mean(posterior variances), computed exactly without drawing noise."""
    model.eval()
    means, variances = [], []
    for i in range(0, min(n, len(dataset)), batch):
        x = stack_images(dataset, range(i, min(i + batch, n, len(dataset)))).to(device)
        if isinstance(model, AutoencoderKL):
            post = model.encode(x)
            means.append(post.mean.float().cpu())
            variances.append(post.std.float().cpu() ** 2)
        else:
            means.append(model.latents(x).float().cpu())
    var = torch.cat(means).var() + (torch.cat(variances).mean() if variances else 0.0)
    return float(1.0 / var.sqrt().clamp_min(1e-6))


def export_autoencoder(path: Path, model: nn.Module, run: AutoencoderRun, dataset, step: int) -> Path:
    """Write the autoencoder checkpoint with the latent scale factor measured on the training data."""
    from dataclasses import replace

    scale = latent_scale(model, dataset, next(model.parameters()).device)
    cfg = replace(run, model=replace(run.model, scaling_factor=scale))
    return checkpoint.save(path, model.state_dict(), "autoencoder", to_dict(cfg), step=step)


def load_autoencoder(path: str | Path, device="cpu") -> tuple[nn.Module, AutoencoderRun]:
    from ..config import from_dict

    tensors, meta = checkpoint.load(path, "autoencoder")
    run = from_dict(AutoencoderRun, meta["config"])
    model = build_autoencoder(run.model)
    checkpoint.load_state(model, tensors, path, "autoencoder")
    return model.to(device).eval().requires_grad_(False), run


@torch.no_grad()
def reconstruction_metrics(model: nn.Module, dataset, device, batch: int = 64, progress: bool = True) -> dict:
    """PSNR and SSIM (mean over images) of deterministic reconstructions of `dataset`."""
    from ..evaluation.metrics import psnr, ssim

    model.eval()
    ps, ss = [], []
    for i in tqdm(range(0, len(dataset), batch), desc="reconstruction metrics", disable=not progress, leave=False):
        x = stack_images(dataset, range(i, min(i + batch, len(dataset)))).to(device)
        r = model(x, sample=False)[0].float().clamp(-1, 1)
        ps.append(psnr(r, x).cpu())
        ss.append(ssim(r, x).cpu())
    return {"psnr": float(torch.cat(ps).mean()), "ssim": float(torch.cat(ss).mean()), "n": len(dataset)}
