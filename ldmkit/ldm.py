"""A complete latent diffusion model: autoencoder + denoiser + conditioner, saved as one self-contained file.

An "ldm" checkpoint holds `unet.*` (EMA weights), `autoencoder.*`, optionally `text_encoder.*` (a jointly trained
encoder, or CLIP weights imported from Stable Diffusion; MiniLM's frozen weights ship in its package), and in its
metadata the denoiser run's resolved configuration and the autoencoder's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .autoencoder import build_autoencoder
from .conditioning.types import Conditioning
from .config import AutoencoderConfig, DenoiserRun, from_dict, to_dict
from .denoisers.unet import UNet
from .diffusion.parameterisation import make_denoiser
from .errors import CheckpointError, InputError, NonFiniteError

KIND = "ldm"


@dataclass
class LatentDiffusion:
    autoencoder: nn.Module
    ae_config: AutoencoderConfig
    unet: UNet
    run: DenoiserRun
    text_encoder: nn.Module | None = None
    source: Path | None = None  # the file it was loaded from (named in error messages); None when built in memory

    def __post_init__(self):
        self.denoiser = make_denoiser(self.unet, self.run.diffusion)

    # --- latents ------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def factor(self) -> int:
        return self.ae_config.factor

    @property
    def latent_channels(self) -> int:
        return self.ae_config.latent_channels

    @property
    def class_names(self) -> list[str]:
        return list(self.run.class_names)

    @property
    def num_classes(self) -> int:
        return self.run.unet.num_classes

    def to_latent(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.ae_config.shift_factor) * self.ae_config.scaling_factor

    def from_latent(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.ae_config.scaling_factor + self.ae_config.shift_factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> scaled latents (B, c, H/f, W/f) (deterministic: posterior mean)."""
        return self.to_latent(self.autoencoder.latents(images.to(self.device)).float())

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1], decoded in float32 (no fp16 overflow, no black images)."""
        ae = self.autoencoder
        z = self.from_latent(latents.float())
        with torch.autocast(z.device.type, enabled=False):
            return ae.decode(z.to(next(ae.parameters()).dtype)).float().clamp(-1, 1)

    # --- conditioning -------------------------------------------------------------------------------------------
    def conditioning(self, labels=None, prompts: list[str] | None = None, n: int | None = None) -> Conditioning:
        """The conditioning for labels (None / -1 = no label) or prompts ("" = unconditional)."""
        if self.text_encoder is not None:
            prompts = prompts if prompts is not None else [""] * (n or 1)
            with torch.no_grad():
                return self.text_encoder.encode(list(prompts)).map(lambda t: t.to(self.device))
        if prompts is not None and any(prompts):
            raise InputError("this model is not text-conditional; use --label (class-conditional) or no condition")
        if not self.num_classes:
            if labels is not None and any(int(lab) >= 0 for lab in labels):
                raise InputError("this model is unconditional; it takes no --label")
            return Conditioning()
        labels = [-1] * (n or 1) if labels is None else list(labels)
        for lab in labels:
            if not -1 <= int(lab) < self.num_classes:
                names = ", ".join(f"{i}={c}" for i, c in enumerate(self.class_names)) or f"0..{self.num_classes - 1}"
                raise InputError(f"label {lab} is out of range; this model knows {self.num_classes} classes: {names}")
        t = torch.tensor([self.num_classes if int(lab) < 0 else int(lab) for lab in labels], dtype=torch.long)
        return Conditioning(labels=t.to(self.device))

    def null_conditioning(self, n: int, negative: list[str] | None = None) -> Conditioning:
        if self.text_encoder is not None:
            return self.conditioning(prompts=negative or [""] * n)
        return self.conditioning(labels=[-1] * n) if self.num_classes else Conditioning()

    # --- files --------------------------------------------------------------------------------------------------
    def save(self, path: str | Path, unet_state: dict | None = None, text_state: dict | None = None, **extra) -> Path:
        tensors = checkpoint.prefixed(unet_state or self.unet.state_dict(), "unet")
        tensors.update(checkpoint.prefixed(self.autoencoder.state_dict(), "autoencoder"))
        if self.text_encoder is not None and self.text_encoder.name != "minilm":
            tensors.update(checkpoint.prefixed(text_state or self.text_encoder.state_dict(), "text_encoder"))
        return checkpoint.save(path, tensors, KIND, to_dict(self.run), autoencoder=to_dict(self.ae_config),
                               text_encoder_options=getattr(self.text_encoder, "options", {}), **extra)

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> "LatentDiffusion":
        """The model in ldm file `path`, on `device`, in eval mode. CheckpointError when the file lacks the metadata
        that rebuilds it; NonFiniteError naming the first tensor with NaN or infinite values (it would sample
        black images)."""
        tensors, meta = checkpoint.load(path, KIND)
        for key in ("config", "autoencoder"):
            if not isinstance(meta.get(key), dict):
                raise CheckpointError(f"{path} has no {key!r} metadata (the {'denoiser' if key == 'config' else key}"
                                      f"'s configuration), so the model cannot be rebuilt; use an ldm file written "
                                      f"by `ldmkit train` or `ldmkit convert`")
        check_finite_weights(tensors, path)
        run = from_dict(DenoiserRun, meta["config"])
        ae_cfg = from_dict(AutoencoderConfig, meta["autoencoder"])
        ae = build_autoencoder(ae_cfg)
        checkpoint.load_state(ae, checkpoint.subset(tensors, "autoencoder"), path, "autoencoder")
        unet = UNet(run.unet)
        checkpoint.load_state(unet, checkpoint.subset(tensors, "unet"), path, "U-Net")
        text = None
        if run.text_encoder:
            from .conditioning.text import build_text_encoder

            text = build_text_encoder(run.text_encoder, **meta.get("text_encoder_options", {}))
            state = checkpoint.subset(tensors, "text_encoder")
            if state:
                checkpoint.load_state(text, state, path, "text encoder")
            text = text.to(device).eval().requires_grad_(False)
        for m in (ae, unet):
            m.to(device).eval().requires_grad_(False)
        return cls(ae, ae_cfg, unet, run, text, source=Path(path))


def check_finite_weights(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """NonFiniteError naming `path` and its first floating-point tensor holding NaN or infinite values."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(f"{path}: the weights are not finite ({bad} of {t.numel()} values of {name} are NaN "
                                 f"or infinite), so every sample would be black; use an earlier checkpoint of the run "
                                 f"(training diverged: retrain with a lower learning rate)")
