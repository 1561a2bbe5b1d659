"""The low-resolution image an upscaler is conditioned on (task "upscale"; Rombach et al. 2022, sec. 4.4).

The image is brought to the latent's size and noised ("noise augmentation") to a level drawn in training and chosen
at sampling (`--noise-level`): x_aug = sqrt(abar_l) x + sqrt(1 - abar_l) eps over a fixed 1000-level schedule, as
Stable Diffusion's x4 upscaler does with its low_res_scheduler. The U-Net sees x_aug concatenated to its latent and
the level l as a class-style embedding, so it learns to trust the input less the noisier it is. The degradation
that makes low-resolution training inputs is bicubic downscaling with antialiasing (`downscale`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..conditioning.types import Conditioning
from ..config import UpscaleConfig
from ..errors import InputError
from .schedules import alphas_cumprod, betas_for

LEVELS = 1000  # the augmentation schedule's length (levels 0..999), as SD x4's low_res_scheduler


def augmentation_abar(up: UpscaleConfig) -> torch.Tensor:
    """abar_l (LEVELS,) float64 of the augmentation schedule."""
    return alphas_cumprod(betas_for(up.schedule, LEVELS, up.beta_start, up.beta_end))


def noise_augment(low: torch.Tensor, levels: torch.Tensor, up: UpscaleConfig, noise: torch.Tensor) -> torch.Tensor:
    """low (B, C, h, w) in [-1, 1] noised to levels (B,) with `noise` (B, C, h, w): sqrt(abar) low + sqrt(1-abar) eps.
    Level 0 still adds the schedule's first, tiny amount of noise (beta_start), as diffusers' add_noise does."""
    abar = augmentation_abar(up).to(low.device)[levels.long()].to(low.dtype)  # (B,)
    a = abar.sqrt().view(-1, 1, 1, 1)
    s = (1 - abar).sqrt().view(-1, 1, 1, 1)
    return a * low + s * noise.to(low)


def to_size(low: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """low (B, C, h, w) resized to `size` (bicubic, clamped to [-1, 1]); unchanged when it already has that size
    (the usual case: an upscale factor equal to the autoencoder's)."""
    if tuple(low.shape[-2:]) == tuple(size):
        return low
    return F.interpolate(low, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)


def downscale(x: torch.Tensor, factor: int) -> torch.Tensor:
    """The degradation upscalers are trained to undo: (B, C, H, W) -> (B, C, H / factor, W / factor) by bicubic
    interpolation with antialiasing, clamped to [-1, 1]. H and W must be multiples of factor."""
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise InputError(f"images of {w}x{h} pixels do not divide by the upscale factor {factor}")
    size = (h // factor, w // factor)
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)


def low_res_conditioning(
    low: torch.Tensor, levels: torch.Tensor, up: UpscaleConfig, noise: torch.Tensor, latent_size: tuple[int, int]
) -> Conditioning:
    """Conditioning(labels = levels (B,), concat = the noise-augmented low-resolution image at latent size)."""
    concat = noise_augment(to_size(low, latent_size), levels, up, noise)
    return Conditioning(labels=levels.long(), concat=concat)
