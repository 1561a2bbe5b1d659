"""Drawing latents from a denoiser, the one sampling driver of every pipeline (generate, img2img, inpaint and
RePaint, upscale, synth, the server's batches, the training previews): initial noise (or a noised start image),
the guidance wrapper, the inpainting blend, the sampler, in one call, with a finiteness watch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..conditioning.types import Conditioning
from ..errors import InputError, NonFiniteError
from ..noise import Generators, randn
from ..samplers import get_sampler
from ..samplers.repaint import repaint_steps, sample_repaint
from .guidance import InpaintBlend, guided


@dataclass(frozen=True)
class Known:
    """Latents kept while sampling (inpainting, outpainting): x0 (B, c, h, w) stays where `regenerate` (1 or B, 1,
    h, w) is 0 and is sampled where it is 1; RePaint (Lugmayr et al. 2022) walks back up `jump` steps and down again
    `resample` times at each jump point (resample 1: no resampling)."""

    x0: torch.Tensor
    regenerate: torch.Tensor
    resample: int = 1
    jump: int = 5


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


def start_index(steps: int, strength: float) -> int:
    """SDEdit's start (Meng et al. 2022) on a grid of `steps` steps: img2img runs the last min(int(steps * strength),
    steps) of them, from index t_start = steps - that (diffusers' rule); strength 1 starts at index 0 (pure noise),
    strength 0 at index `steps` (no step: the start image itself)."""
    if not 0.0 <= strength <= 1.0:  # also refuses NaN
        raise InputError(f"strength {strength} is outside [0, 1]; 0 keeps the image, 1 ignores it, 0.3 to 0.8 is usual")
    return steps - min(int(steps * strength), steps)


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
    init: torch.Tensor | None = None,
    strength: float = 1.0,
    known: Known | None = None,
    **sampler_options,
) -> torch.Tensor:
    """Latents of `shape` (B, C, h, w) sampled from `denoiser` under `cond`, with classifier-free guidance against
    `uncond` when cfg_scale != 1. Noise comes from `generator` (one per sample for batch-size independence).

    init: clean scaled latents x0 of `shape` to start from (img2img, SDEdit): the sampler runs over
    sigmas[t_start:] (`start_index`) from x = init + sigmas[t_start] * noise, the noise drawn as without init.
    strength 1 is exactly sampling without init; strength 0 runs no step and returns init.
    known: latents to keep (inpainting; see Known): the sampler walks RePaint's schedule with the guided denoiser
    wrapped in InpaintBlend; a mask that regenerates everything gives exactly the latents drawn without it.
    NonFiniteError (with `.step`, `.steps`) at the first step whose prediction is NaN or infinite, or when the last
    update is: never latents that would decode to a black image."""
    fn = get_sampler(sampler)
    device = device or next(denoiser.parameters()).device
    if sigmas is None:
        sigmas = denoiser.sigmas(steps)
    sigmas = sigmas.to(device)
    if init is not None and known is not None:
        raise InputError("a start image (img2img strength) and kept latents (inpainting) cannot be combined")
    if init is not None:
        if tuple(init.shape) != tuple(shape):
            raise InputError(f"init latents have shape {tuple(init.shape)}, not {tuple(shape)}; pass one per sample")
        t_start = start_index(len(sigmas) - 1, strength)
        sigmas = sigmas[t_start:]
        if t_start == 0:  # strength 1: pure noise, exactly as without init (the start image drops out)
            init = None
    n_steps = len(sigmas) - 1
    x = randn(shape, generator, device=device) * sigmas[0]  # (B, C, h, w)
    if init is not None:
        x = init.to(device=device, dtype=x.dtype) + x  # x = x0 + sigma_start * noise
        if n_steps == 0:  # strength 0: no step to run, the start is the result
            if not bool(torch.isfinite(x).all()):
                raise NonFiniteError("the start latents hold NaN or infinite values; check the encoded image")
            return x
    denoise = guided(denoiser, cond, uncond, cfg_scale, cfg_rescale)
    if known is not None:
        return _sample_known(denoise, x, sigmas, known, fn, generator, callback, sampler_options)
    x = fn(denoise, x, sigmas, generator=generator, callback=finite_watch(n_steps, callback), **sampler_options)
    if not bool(torch.isfinite(x).all()):  # the last update (noise, step size) went wrong after a finite prediction
        raise non_finite_at(n_steps, n_steps, float(sigmas[-2]))
    return x


def _sample_known(denoise, x, sigmas, known: Known, step, generator, callback, sampler_options) -> torch.Tensor:
    """sample_latents' walk when latents are kept: the blend first draws its fixed noise from `generator` (after
    the initial noise, so image i's draws do not depend on the mask), then RePaint's segments run `step`."""
    if tuple(known.x0.shape) != tuple(x.shape):
        raise InputError(f"kept latents have shape {tuple(known.x0.shape)}, not {tuple(x.shape)}; pass one per sample")
    keep = 1 - known.regenerate.to(known.x0)  # InpaintBlend's mask: 1 where the original stays
    if bool(keep.any()):
        denoise = InpaintBlend(denoise, known.x0, keep, generator)
    n = repaint_steps(len(sigmas) - 1, known.resample, known.jump)
    x = sample_repaint(
        denoise,
        x,
        sigmas,
        generator=generator,
        callback=finite_watch(n, callback),
        step=step,
        resample=known.resample,
        jump=known.jump,
        **sampler_options,
    )
    if not bool(torch.isfinite(x).all()):
        raise non_finite_at(n, n, float(sigmas[-2]))
    return x
