"""Drawing latents from a denoiser: initial noise, guidance wrapper, sampler, in one call."""
from __future__ import annotations

import torch

from ..conditioning.types import Conditioning
from ..samplers import get_sampler
from .guidance import CFGDenoiser, bind
from ..noise import Generators, randn


@torch.no_grad()
def sample_latents(denoiser, shape: tuple[int, ...], cond: Conditioning, uncond: Conditioning | None = None, *,
                   sampler: str = "dpmpp_2m", steps: int = 25, cfg_scale: float = 1.0, cfg_rescale: float = 0.0,
                   generator: Generators = None, sigmas: torch.Tensor | None = None, device=None,
                   callback=None, **sampler_options) -> torch.Tensor:
    """Latents of `shape` (B, C, h, w) sampled from `denoiser` under `cond`, with classifier-free guidance against
    `uncond` when cfg_scale != 1. Noise comes from `generator` (one per sample for batch-size independence)."""
    fn = get_sampler(sampler)
    device = device or next(denoiser.parameters()).device
    if sigmas is None:
        sigmas = denoiser.sigmas(steps)
    sigmas = sigmas.to(device)
    x = randn(shape, generator, device=device) * sigmas[0]
    if cfg_scale != 1.0 and uncond is not None:
        denoise = CFGDenoiser(denoiser, cond, uncond, cfg_scale, rescale=cfg_rescale)
    else:
        denoise = bind(denoiser, cond)
    return fn(denoise, x, sigmas, generator=generator, callback=callback, **sampler_options)
