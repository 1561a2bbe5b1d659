"""Autoencoder checkpoints: writing one with its measured latent scale, and loading one for training,
evaluation or sampling. Used by training and evaluation alike, so it lives below both."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .. import checkpoint
from ..config import AutoencoderConfig, AutoencoderRun, from_dict, to_dict
from ..data.common import stack_images
from . import build_autoencoder
from .vae import AutoencoderKL

KIND = "autoencoder"
LDM_KIND = "ldm"  # a whole model's file (ldm.KIND; the ldm module sits above this one)


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


def save_autoencoder(path: Path, model: nn.Module, run: AutoencoderRun, dataset, step: int) -> Path:
    """Write the autoencoder checkpoint with the latent scale factor measured on the training data."""
    scale = latent_scale(model, dataset, next(model.parameters()).device)
    cfg = replace(run, model=replace(run.model, scaling_factor=scale))
    return checkpoint.save(path, model.state_dict(), KIND, to_dict(cfg), step=step)


def load_autoencoder(path: str | Path, device="cpu") -> tuple[nn.Module, AutoencoderRun]:
    """The autoencoder in `path` (eval mode, frozen, float32) and its run: an "autoencoder" checkpoint from
    `ldmkit train-autoencoder`, or the autoencoder inside a whole model ("ldm" file, e.g. a shipped model), so a
    new denoiser (an inpainting model, an upscaler) can share a trained model's latent space. A whole model records
    only the autoencoder's architecture and latent scale, so its run's other sections are the defaults."""
    tensors, meta = checkpoint.load(path, (KIND, LDM_KIND))
    if meta["kind"] == LDM_KIND:
        if not isinstance(meta.get("autoencoder"), dict):
            raise checkpoint.CheckpointError(
                f"{path} has no 'autoencoder' metadata, so its autoencoder cannot be rebuilt"
            )
        run = AutoencoderRun(model=from_dict(AutoencoderConfig, meta["autoencoder"]))
        tensors = checkpoint.subset(tensors, "autoencoder")
    else:
        run = from_dict(AutoencoderRun, meta["config"])
    model = build_autoencoder(run.model)
    checkpoint.load_state(model, {k: v.float() for k, v in tensors.items()}, path, "autoencoder")
    return model.to(device).eval().requires_grad_(False), run
