"""Denoiser wrappers: conditioning bound in, classifier-free guidance, inpainting blend.

A sampler only sees `denoise(x (B,C,H,W), sigma (B,)) -> x0 (B,C,H,W)`. Guidance and blends are built by wrapping
that function (or a `Denoiser` with its conditioning), never by flags on a model or a sampler. Wrappers hold no
mutable state, so one model can serve concurrent requests.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..conditioning.types import Conditioning
from ..errors import InputError
from ..nn.invariant import image_rows
from ..noise import Generators, randn_like

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def bind(denoiser, cond: Conditioning | None) -> DenoiseFn:
    """The plain conditional denoiser (x, sigma) -> D(x, sigma, cond)."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return denoiser(x, sigma, cond)

    return denoise


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, eq. 15-16): x_rescaled = x_cfg * std(x_pos) / std(x_cfg) per sample, then
    phi * x_rescaled + (1 - phi) * x_cfg. Tensors (B, ...) in the model's prediction space."""
    dims = tuple(range(1, guided.ndim))
    ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return phi * guided * ratio + (1 - phi) * guided


Scale = float | torch.Tensor  # one guidance scale, or one per sample (B,)


def guides(scale: Scale) -> bool:
    """Whether `scale` asks for guidance: a scale other than 1 (for one per sample: any of them)."""
    return bool((torch.as_tensor(scale) != 1.0).any())


def guided(denoiser, cond: Conditioning, uncond: Conditioning | None, scale: Scale, rescale: float = 0.0) -> DenoiseFn:
    """The denoise function a sampler walks: classifier-free guidance against `uncond` at `scale` (one number, or
    one per sample), with guidance rescale, or the plain conditional denoiser when there is no guidance (scale 1 or
    no uncond)."""
    if guides(scale) and uncond is not None:
        return CFGDenoiser(denoiser, cond, uncond, scale, rescale=rescale)
    return bind(denoiser, cond)


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022): D = D_u + s (D_c - D_u), both branches in one batched pass.

    The combination is linear, so it is the same in x0 space as in the model's eps or v space. Guidance rescale is
    not linear: it is applied to the model's own prediction (eps or v, via `denoiser.prediction`), as trained.
    """

    def __init__(self, denoiser, cond: Conditioning, uncond: Conditioning, scale: Scale, rescale: float = 0.0):
        """denoiser: a `Denoiser` (called (x, sigma, cond), with `prediction` / `from_prediction` for rescale);
        cond / uncond: conditionings for the B samples (the same fields in both); scale: guidance scale s, one
        number or one per sample (B,) (1 everywhere means no guidance: one conditional pass); rescale: guidance
        rescale phi in [0, 1]. Sample i's result is the same whether its scale comes alone or in a tensor."""
        if not 0.0 <= rescale <= 1.0:
            raise InputError(f"guidance rescale {rescale} must be between 0 and 1 (0.7 is the paper's choice)")
        if rescale > 0 and not hasattr(denoiser, "prediction"):
            raise InputError(
                "guidance rescale needs a Denoiser with prediction(); wrap the backbone with "
                "make_denoiser or set rescale=0"
            )
        self.denoiser, self.cond, self.uncond = denoiser, cond, uncond
        self.guides, self.rescale = guides(scale), float(rescale)
        self.scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)  # (B or 1,)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if not self.guides:
            return self.denoiser(x, sigma, self.cond)
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma = sigma.expand(b) if sigma.ndim == 0 else sigma  # (B,)
        with image_rows(2, 2 * b):  # an image's two branches are one call of two rows, as when it is alone
            both = self.denoiser(
                torch.cat([x, x]), torch.cat([sigma, sigma]), Conditioning.cat([self.cond, self.uncond])
            )
        d_cond, d_uncond = both[:b], both[b:]  # (B, C, H, W) each
        # (B or 1, 1, ...): one scale per image (B, C, H, W) or per clip (B, F, C, H, W)
        scale = self.scale.to(device=x.device, dtype=d_cond.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        guided = d_uncond + scale * (d_cond - d_uncond)
        if self.rescale == 0.0:
            return guided
        f_guided = self.denoiser.prediction(x, sigma, guided)
        f_cond = self.denoiser.prediction(x, sigma, d_cond)
        return self.denoiser.from_prediction(x, sigma, rescale_guidance(f_guided, f_cond, self.rescale))


class InpaintBlend:
    """Inpainting by replacement (Song et al. 2021; RePaint without resampling): before every denoiser call the
    known region of x is replaced with the original noised to the current level, x0_known + sigma * n, and the
    known region of the x0 prediction with x0_known. The noise n is drawn once, so the wrapper has no state."""

    def __init__(self, denoise: DenoiseFn, x0_known: torch.Tensor, mask: torch.Tensor, generator: Generators = None):
        """denoise: (x, sigma) -> x0; x0_known: (B, C, H, W) latents of the original; mask: (B or 1, 1 or C, H, W),
        1 where the original is kept, 0 where it is generated; generator: seeds the fixed noise n (one per sample
        for batch-size independence)."""
        if mask.shape[-2:] != x0_known.shape[-2:]:
            raise InputError(
                f"mask size {tuple(mask.shape[-2:])} differs from the latent size "
                f"{tuple(x0_known.shape[-2:])}; resize the mask to the latent resolution"
            )
        self.denoise, self.x0_known = denoise, x0_known
        self.mask = mask.to(device=x0_known.device, dtype=x0_known.dtype)
        self.noise = randn_like(x0_known, generator)  # (B, C, H, W)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        known = self.x0_known + s * self.noise
        x = self.mask * known + (1 - self.mask) * x
        return self.mask * self.x0_known + (1 - self.mask) * self.denoise(x, sigma)
