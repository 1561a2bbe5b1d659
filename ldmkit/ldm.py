"""A complete latent diffusion model: autoencoder + denoiser + conditioner, saved as one self-contained file.

An "ldm" checkpoint holds the backbone's EMA weights (`unet.*` or `dit.*`, as denoiser.kind), `autoencoder.*`,
optionally `text_encoder.*` (a jointly trained encoder, or CLIP weights imported from Stable Diffusion; MiniLM's
frozen weights ship in its package), and in its metadata the denoiser run's resolved configuration and the
autoencoder's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .autoencoder import build_autoencoder
from .conditioning.labels import LabelConditioner
from .conditioning.text import build_text_encoder
from .conditioning.types import Conditioning
from .config import AutoencoderConfig, DenoiserRun, from_dict, to_dict
from .denoisers import backbone_name, build_backbone
from .diffusion.parameterisation import make_denoiser, use_distilled_grid
from .errors import CheckpointError, InputError, NonFiniteError
from .nn.construct import without_init
from .nn.invariant import batch_invariant
from .tasks import Task, get_task

KIND = "ldm"


@dataclass
class LdmFile:
    """The contents of an "ldm" file, the one place its layout is written down: tensors `unet.*` (or `dit.*`, the
    backbone run.denoiser.kind names), `autoencoder.*` and `text_encoder.*`; metadata `config` (the resolved
    DenoiserRun), `autoencoder` (its AutoencoderConfig), `text_encoder_options` (rebuilds the text encoder) and
    any extras (step, converted_from, stored_dtype)."""

    run: DenoiserRun
    ae_config: AutoencoderConfig
    unet: dict[str, torch.Tensor]  # the backbone's state dict, U-Net or DiT (EMA weights after training)
    autoencoder: dict[str, torch.Tensor]
    text: dict[str, torch.Tensor] = field(default_factory=dict)  # empty: none, or shipped in its package (minilm)
    text_options: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | Path) -> "LdmFile":
        """Read and check an ldm file: CheckpointError when the metadata that rebuilds the model is missing."""
        tensors, meta = checkpoint.load(path, KIND)
        for key in ("config", "autoencoder"):
            if not isinstance(meta.get(key), dict):
                raise CheckpointError(
                    f"{path} has no {key!r} metadata (the {'denoiser' if key == 'config' else key}"
                    f"'s configuration), so the model cannot be rebuilt; use an ldm file written "
                    f"by `ldmkit train` or `ldmkit convert`"
                )
        extra = {
            k: v
            for k, v in meta.items()
            if k not in ("format", "kind", "config", "autoencoder", "text_encoder_options")
        }
        run = from_dict(DenoiserRun, meta["config"])
        return cls(
            run,
            from_dict(AutoencoderConfig, meta["autoencoder"]),
            checkpoint.subset(tensors, run.denoiser.kind),
            checkpoint.subset(tensors, "autoencoder"),
            checkpoint.subset(tensors, "text_encoder"),
            meta.get("text_encoder_options") or {},
            extra,
        )

    def write(self, path: str | Path) -> Path:
        return checkpoint.save(
            path,
            self.tensors(),
            KIND,
            to_dict(self.run),
            autoencoder=to_dict(self.ae_config),
            text_encoder_options=self.text_options,
            **self.extra,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor under its name in the file (unet.* or dit.*, autoencoder.*, text_encoder.*)."""
        return (
            checkpoint.prefixed(self.unet, self.run.denoiser.kind)
            | checkpoint.prefixed(self.autoencoder, "autoencoder")
            | checkpoint.prefixed(self.text, "text_encoder")
        )


@dataclass
class LatentDiffusion:
    autoencoder: nn.Module
    ae_config: AutoencoderConfig
    unet: nn.Module  # the backbone run.denoiser.kind names: a UNet or a DiT
    run: DenoiserRun
    text_encoder: nn.Module | None = None
    source: Path | None = None  # the file it was loaded from (named in error messages); None when built in memory

    def __post_init__(self):
        self.denoiser = make_denoiser(self.unet, self.run.diffusion)
        if self.run.distill.steps:  # a consistency model samples on the grid it was distilled along
            use_distilled_grid(self.denoiser, self.run.distill.grid)

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
    def task(self) -> str:
        """The name of what the model was trained for: "generate", "inpaint", "upscale", ... (DenoiserRun.task)."""
        return self.run.task

    @property
    def task_spec(self) -> Task:
        """The registered task of that name (ldmkit/tasks/): its inputs, commands and routes."""
        return get_task(self.run.task, key=f"{self.source or 'this model'}'s task")

    @property
    def num_classes(self) -> int:
        """The class labels a user picks from; 0 for an unconditional or text model, and for an upscaler, whose
        class-style embedding holds its noise-augmentation levels instead."""
        return self.run.backbone.num_classes if self.task_spec.user_labels else 0

    @property
    def labels(self) -> LabelConditioner:
        """Class labels (indices, names, -1 / None for none) -> Conditioning; a class model only."""
        return LabelConditioner(self.num_classes, self.class_names)

    def to_latent(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.ae_config.shift_factor) * self.ae_config.scaling_factor

    def from_latent(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.ae_config.scaling_factor + self.ae_config.shift_factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> scaled latents (B, c, H/f, W/f) (deterministic: posterior mean); each
        image's latents do not depend on the batch it is encoded in (bit for bit on the CPU)."""
        with batch_invariant(self.device):
            return self.to_latent(self.autoencoder.latents(images.to(self.device)).float())

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1], decoded in float32 (no fp16 overflow, no black images); each image
        does not depend on the batch it is decoded in (bit for bit on the CPU)."""
        ae = self.autoencoder
        z = self.from_latent(latents.float())
        with torch.autocast(z.device.type, enabled=False), batch_invariant(z.device):
            return ae.decode(z.to(next(ae.parameters()).dtype)).float().clamp(-1, 1)

    # --- conditioning -------------------------------------------------------------------------------------------
    def conditioning(self, labels=None, prompts: list[str] | None = None, n: int | None = None) -> Conditioning:
        """The conditioning for labels (None / -1 = no label) or prompts ("" = unconditional)."""
        if self.text_encoder is not None:
            prompts = prompts if prompts is not None else [""] * (n or 1)
            with torch.no_grad(), batch_invariant(getattr(self.text_encoder, "device", "cpu")):
                return self.text_encoder.encode(list(prompts)).map(lambda t: t.to(self.device))
        if prompts is not None and any(prompts):
            if not self.task_spec.user_labels:  # e.g. an upscaler's class embedding holds noise levels: no label
                raise InputError(f"{self.source or 'this upscaler'} is not text-conditional; drop --prompt")
            raise InputError("this model is not text-conditional; use --label (class-conditional) or no condition")
        if not self.num_classes:
            if labels is not None and any(int(lab) >= 0 for lab in labels):
                raise InputError("this model is unconditional; it takes no --label")
            return Conditioning()
        return self.labels([None] * (n or 1) if labels is None else list(labels), self.device)

    def null_conditioning(self, n: int, negative: list[str] | None = None) -> Conditioning:
        if self.text_encoder is not None:
            return self.conditioning(prompts=negative or [""] * n)
        return self.conditioning(labels=[-1] * n) if self.num_classes else Conditioning()

    # --- files --------------------------------------------------------------------------------------------------
    def save(self, path: str | Path, unet_state: dict | None = None, text_state: dict | None = None, **extra) -> Path:
        """Write the model as one ldm file; unet_state / text_state: weights to store instead of the modules' own
        (training exports its EMA weights so). MiniLM's frozen weights ship in its package and are not stored."""
        text = {}
        if self.text_encoder is not None and self.text_encoder.name != "minilm":
            text = text_state or self.text_encoder.state_dict()
        return LdmFile(
            self.run,
            self.ae_config,
            unet_state or self.unet.state_dict(),
            self.autoencoder.state_dict(),
            text,
            getattr(self.text_encoder, "options", {}),
            extra,
        ).write(path)

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> "LatentDiffusion":
        """The model in ldm file `path`, on `device`, in eval mode. CheckpointError when the file lacks the metadata
        that rebuilds it; NonFiniteError naming the first tensor with NaN or infinite values (it would sample
        black images)."""
        f = LdmFile.read(path)
        check_finite_weights(f.tensors(), path)
        run = f.run
        with without_init():  # every weight is read next, and load_state refuses a missing one
            ae, unet = build_autoencoder(f.ae_config), build_backbone(run)
        checkpoint.load_state(ae, f.autoencoder, path, "autoencoder")
        checkpoint.load_state(unet, f.unet, path, backbone_name(run))
        text = None
        if run.text_encoder:
            text = build_text_encoder(run.text_encoder, **f.text_options)
            if f.text:
                checkpoint.load_state(text, f.text, path, "text encoder")
            text = text.to(device).eval().requires_grad_(False)
        for m in (ae, unet):
            m.to(device).eval().requires_grad_(False)
        return cls(ae, f.ae_config, unet, run, text, source=Path(path))


def check_finite_weights(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """NonFiniteError naming `path` and its first floating-point tensor holding NaN or infinite values."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(
                f"{path}: the weights are not finite ({bad} of {t.numel()} values of {name} are NaN "
                f"or infinite), so every sample would be black; use an earlier checkpoint of the run "
                f"(training diverged: retrain with a lower learning rate)"
            )
