"""Several generation requests in one forward pass, each image exactly as its request alone would give it.

Requests share a pass when they agree on what shapes the computation: the model, the size, the sampler, its steps
and eta, guidance on or off and its rescale (`share_key`). Prompts, labels, negative prompts, seeds, guidance
scales, LoRAs and ControlNet controls may differ: every image keeps its own generator (seeded seed + i of its
request), its own conditioning, guidance scale, LoRAs (pipelines/lora.py: per_sample_loras) and controls
(pipelines/control.py: per_sample_controls), and the CPU kernels are batch-invariant (nn/invariant.py), so
batching changes no bit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from ..denoisers.controlnet import Control
from ..diffusion.guidance import guides
from ..errors import InputError
from ..ldm import LatentDiffusion
from ..noise import generators_from_seed
from .control import per_sample_controls
from .lora import per_sample_loras
from .plan import check_samples_from_noise, draw, plan
from .request import LoRASpec, SampleRequest


def share_key(req: SampleRequest) -> tuple:
    """What requests to one model must have in common to share a forward pass (height and width as asked: 0 means
    the training resolution and is resolved by `plan`), the backend included: an image's numbers are its backend's."""
    return (req.height, req.width, req.sampler, req.steps, req.eta, req.cfg_rescale, guides(req.cfg), req.backend)


@dataclass(frozen=True)
class _Sample:
    """One image of one request: what it is conditioned on and where its noise comes from."""

    label: int | None
    prompt: str | None
    negative: str
    cfg: float
    seed: int
    loras: tuple[LoRASpec, ...] = ()
    controls: tuple[Control, ...] = ()


def _samples(
    ldm: LatentDiffusion, reqs: Sequence[SampleRequest], controls: Sequence[Sequence[Control]]
) -> tuple[list[_Sample], tuple[int, int]]:
    """Every image of every request, in order, and the one size they share (InputError when they do not)."""
    out, sizes = [], set()
    for req, steer in zip(reqs, controls, strict=True):
        p = plan(ldm, req)
        sizes.add((p.height, p.width))
        for i in range(req.n):
            label = p.labels[i] if p.labels is not None else None
            prompt = p.prompts[i] if p.prompts is not None else None
            out.append(_Sample(label, prompt, req.negative_prompt, req.cfg, req.seed + i, req.loras, tuple(steer)))
    if len(sizes) != 1 or len({share_key(r)[2:] for r in reqs}) != 1:
        raise InputError("requests batched together must share size, sampler, steps, eta and guidance rescale")
    return out, sizes.pop()


@torch.no_grad()
def _sample_chunk(
    ldm: LatentDiffusion, chunk: list[_Sample], shape: tuple, req: SampleRequest, callback
) -> torch.Tensor:
    """Latents (len(chunk), c, h, w) for a run of images, each with its own condition, guidance scale, seed, LoRAs
    and controls."""
    n = len(chunk)
    with (
        per_sample_loras(ldm, [s.loras for s in chunk]),  # on the text encoder too: the conditions are inside
        per_sample_controls(ldm, [s.controls for s in chunk], req.steps),
    ):
        if ldm.text_encoder is not None:
            cond = ldm.conditioning(prompts=[s.prompt or "" for s in chunk])
            uncond = ldm.null_conditioning(n, [s.negative for s in chunk])
        else:
            labels = [s.label for s in chunk] if ldm.num_classes else None
            cond = ldm.conditioning(labels=labels, n=n)
            uncond = ldm.null_conditioning(n)
        generators = [g for s in chunk for g in generators_from_seed(s.seed, 1)]
        sampling = replace(req, loras=())  # the images' LoRAs are hooked above, per image; draw adds no others
        cfg = torch.tensor([s.cfg for s in chunk])
        return draw(ldm, sampling, (n, *shape), cond, uncond, generators, callback, cfg_scale=cfg)


def generate_together(
    ldm: LatentDiffusion,
    reqs: Sequence[SampleRequest],
    batch_size: int = 16,
    callback: Callable | None = None,
    controls: Sequence[Sequence[Control]] | None = None,
) -> list[torch.Tensor]:
    """Images (n, C, H, W) in [-1, 1] on the CPU for each request, sampled together in forward passes of up to
    `batch_size` images (a pass may hold images of several requests). Each request's images are bit for bit those
    of `generate(ldm, req)` on the CPU. Requests must agree on `share_key`; callback: the sampler's step callback
    (it may raise to stop the work); controls: each request's ControlNet controls (Control, its condition image at
    the output's padded size), which steer its images only. NonFiniteError names the first request's options when
    any image fails: callers that batch strangers rerun each request alone to find whose options caused it."""
    if not reqs:
        return []
    check_samples_from_noise(ldm)
    samples, (h, w) = _samples(ldm, reqs, controls or [()] * len(reqs))
    shape = (ldm.latent_channels, h // ldm.factor, w // ldm.factor)
    images = []
    for s in range(0, len(samples), batch_size):
        chunk = samples[s : s + batch_size]
        z = _sample_chunk(ldm, chunk, shape, reqs[0], callback)
        images.append(ldm.decode(z).cpu())
    flat = torch.cat(images)
    bounds = torch.tensor([0] + [r.n for r in reqs]).cumsum(0).tolist()
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
