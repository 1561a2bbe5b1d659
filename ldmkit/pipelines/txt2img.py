"""Generation from labels or prompts: conditioning, guided sampling in batches, decoding, PNGs with parameters."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..noise import generators_from_seed
from ..diffusion.sample import sample_latents
from ..ldm import LatentDiffusion
from ..runtime import resolve_device
from ..samplers import get_sampler
from ..errors import InputError


@dataclass(frozen=True)
class SampleRequest:
    n: int = 16  # number of images
    labels: list[int] | None = None  # class labels, cycled over the n images; None: every class in turn
    prompts: list[str] | None = None  # one prompt per image (text models)
    negative_prompt: str = ""  # the guidance's unconditional branch (text models)
    sampler: str = "dpmpp_2m"
    steps: int = 25
    cfg: float = 3.0  # classifier-free guidance scale; 1 disables guidance
    cfg_rescale: float = 0.0  # guidance rescale phi
    seed: int = 0  # image i is drawn with seed + i, whatever the batch size
    height: int = 0  # pixels; 0: the training resolution
    width: int = 0
    batch_size: int = 16  # images per forward pass
    device: str = "auto"
    eta: float | None = None  # stochasticity of ddim / ancestral / sde samplers (None: the sampler's default)


def _labels_for(ldm: LatentDiffusion, req: SampleRequest) -> list[int] | None:
    if not ldm.num_classes:
        if req.labels:
            raise InputError("this model is not class-conditional; drop --label")
        return None
    base = req.labels or list(range(ldm.num_classes))
    return [base[i % len(base)] for i in range(req.n)]


def resolution(ldm: LatentDiffusion, req: SampleRequest) -> tuple[int, int]:
    res = ldm.run.data.resolution
    h, w = req.height or res, req.width or res
    f = ldm.factor * 2 ** (len(ldm.run.unet.channel_mult) - 1)
    for name, v in (("height", h), ("width", w)):
        if v % f:
            raise InputError(f"{name} {v} is not a multiple of {f} (autoencoder factor {ldm.factor} times the "
                             f"U-Net's downsampling); use {v // f * f or f} or {(v // f + 1) * f}")
    return h, w


@torch.no_grad()
def generate(ldm: LatentDiffusion, req: SampleRequest) -> tuple[torch.Tensor, list[str]]:
    """Images (n, C, H, W) in [-1, 1] and a caption per image."""
    get_sampler(req.sampler)  # fail before any work on an unknown sampler
    if req.n < 1:
        raise InputError(f"--n {req.n}: ask for at least one image")
    labels = _labels_for(ldm, req)
    prompts = req.prompts
    if prompts is not None and len(prompts) != req.n:
        prompts = [prompts[i % len(prompts)] for i in range(req.n)]
    h, w = resolution(ldm, req)
    opts = {} if req.eta is None else {"eta": req.eta}
    images, captions = [], []
    for s in range(0, req.n, req.batch_size):
        e = min(req.n, s + req.batch_size)
        lab = labels[s:e] if labels is not None else None
        pr = prompts[s:e] if prompts is not None else None
        cond = ldm.conditioning(labels=lab, prompts=pr, n=e - s)
        uncond = ldm.null_conditioning(e - s, [req.negative_prompt] * (e - s) if req.negative_prompt else None)
        gens = [g for g in generators_from_seed(req.seed, req.n)[s:e]]
        z = sample_latents(ldm.denoiser, (e - s, ldm.latent_channels, h // ldm.factor, w // ldm.factor), cond,
                           uncond, sampler=req.sampler, steps=req.steps, cfg_scale=req.cfg,
                           cfg_rescale=req.cfg_rescale, generator=gens, device=ldm.device, **opts)
        images.append(ldm.decode(z).cpu())
        captions += [ldm.class_names[l] for l in lab] if lab is not None else (pr or [""] * (e - s))
    return torch.cat(images), captions


def generate_to_file(checkpoint: str | Path, req: SampleRequest, out: str | Path, grid: bool = True) -> list[Path]:
    """Generate and write a labelled grid PNG (or one PNG per image) with the parameters in PNG text chunks."""
    from ..data.images import save_grid

    ldm = LatentDiffusion.load(checkpoint, resolve_device(req.device))
    images, captions = generate(ldm, req)
    params = {k: v for k, v in asdict(req).items() if k not in ("device", "batch_size")}
    meta = {"ldmkit": json.dumps({"checkpoint": str(checkpoint), **params})}
    out = Path(out)
    if grid:
        return [save_grid(images, out, nrow=min(8, len(images)), labels=captions, metadata=meta)]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, cap) in enumerate(zip(images, captions)):
        m = {"ldmkit": json.dumps({"checkpoint": str(checkpoint), **params, "seed": req.seed + i, "n": 1,
                                   "index": i, "caption": cap})}
        paths.append(save_grid(img[None], out / f"{i:05d}.png", nrow=1, metadata=m))
    return paths
