"""Drawing latents from a denoiser: initial noise, guidance wrapper, sampler, in one call, with a finiteness watch."""

from __future__ import annotations

import torch

from ..conditioning.types import Conditioning
from ..errors import NonFiniteError
from ..noise import Generators, randn
from ..samplers import get_sampler
from .guidance import CFGDenoiser, bind


def non_finite_at(step: int, steps: int, sigma: float) -> NonFiniteError:
    """The error for sampling that first produced NaN or infinite values at `step` (1-based) of `steps`; the step
    numbers ride along as `.step` and `.steps` so a caller can name the options to change."""
    err = NonFiniteError(
        f"sampling produced NaN or infinite values at step {step} of {steps} (sigma {sigma:.4g}); "
        f"the usual causes are model weights that are not finite or a guidance scale too large "
        f"for float32"
    )
    err.step, err.steps = step, steps
    return err


def finite_watch(steps: int, callback=None):
    """A sampler callback that raises `non_finite_at` at the first step whose x0 prediction is not finite, then
    passes the step on to `callback`. It costs one isfinite().all() per step."""

    def watch(i: int, x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> None:
        if not bool(torch.isfinite(x0).all()):
            raise non_finite_at(i + 1, steps, float(sigma))
        if callback is not None:
            callback(i, x, x0, sigma)

    return watch


@torch.no_grad()
def sample_latents(
    denoiser,
    shape: tuple[int, ...],
    cond: Conditioning,
    uncond: Conditioning | None = None,
    *,
    sampler: str = "dpmpp_2m",
    steps: int = 25,
    cfg_scale: float = 1.0,
    cfg_rescale: float = 0.0,
    generator: Generators = None,
    sigmas: torch.Tensor | None = None,
    device=None,
    callback=None,
    **sampler_options,
) -> torch.Tensor:
    """Latents of `shape` (B, C, h, w) sampled from `denoiser` under `cond`, with classifier-free guidance against
    `uncond` when cfg_scale != 1. Noise comes from `generator` (one per sample for batch-size independence).
    NonFiniteError (with `.step`, `.steps`) at the first step whose prediction is NaN or infinite, or when the last
    update is: never latents that would decode to a black image."""
    fn = get_sampler(sampler)
    device = device or next(denoiser.parameters()).device
    if sigmas is None:
        sigmas = denoiser.sigmas(steps)
    sigmas = sigmas.to(device)
    n_steps = len(sigmas) - 1
    x = randn(shape, generator, device=device) * sigmas[0]
    if cfg_scale != 1.0 and uncond is not None:
        denoise = CFGDenoiser(denoiser, cond, uncond, cfg_scale, rescale=cfg_rescale)
    else:
        denoise = bind(denoiser, cond)
    x = fn(denoise, x, sigmas, generator=generator, callback=finite_watch(n_steps, callback), **sampler_options)
    if not bool(torch.isfinite(x).all()):  # the last update (noise, step size) went wrong after a finite prediction
        raise non_finite_at(n_steps, n_steps, float(sigmas[-2]))
    return x
