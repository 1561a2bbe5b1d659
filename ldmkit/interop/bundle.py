"""`ModelWeights`: a whole latent diffusion model as configs plus state dicts, the hub every format converts through.

The U-Net and autoencoder weights are in ldmkit's layouts; the CLIP text encoder's in transformers'
`CLIPTextModel` layout (`text_model.*` keys), described by a `CLIPTextConfig`-style dict
(see `ldmkit.conditioning.clip.clip_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..autoencoder import build_autoencoder
from ..checkpoint import CheckpointError
from ..conditioning.clip import clip_shapes
from ..config import AutoencoderConfig, DiffusionConfig, UNetConfig, UpscaleConfig
from ..denoisers.unet import UNet


@dataclass
class ModelWeights:
    """A latent diffusion model in plain values: what every interop format is read into and written from."""

    unet_config: UNetConfig
    unet: dict[str, torch.Tensor]  # ldmkit UNet state dict
    ae_config: AutoencoderConfig
    autoencoder: dict[str, torch.Tensor]  # ldmkit AutoencoderKL state dict
    diffusion: DiffusionConfig  # parameterisation (eps / v) and the training noise schedule
    resolution: int = 512  # image size the model was trained at (pipelines use it as the default)
    text_config: dict[str, Any] | None = None  # CLIP text config (clip_config); None: no text encoder
    text: dict[str, torch.Tensor] | None = None  # CLIP text weights, transformers layout (text_model.*)
    class_names: tuple[str, ...] = ()  # class-conditional models: the label names
    source: str = ""  # where the weights were read from, for messages
    unused: list[str] = field(default_factory=list)  # keys of the source that no network here uses
    task: str = "generate"  # "generate", "inpaint" or "upscale" (DenoiserRun.task)
    upscale: UpscaleConfig = field(default_factory=UpscaleConfig)  # an upscaler's factor and noise augmentation

    def validate(self) -> "ModelWeights":
        """Every network's keys and shapes match its configuration, else CheckpointError naming the source."""
        try:
            with torch.device("meta"):
                unet, ae = UNet(self.unet_config), build_autoencoder(self.ae_config)
        except ValueError as e:
            raise CheckpointError(f"{self.source or 'weights'}: its configuration does not build ({e})") from None
        check_state(unet, self.unet, self.source, "U-Net")
        check_state(ae, self.autoencoder, self.source, "autoencoder")
        if self.text is not None:
            check_keys(clip_shapes(self.text_config), self.text, self.source, "text encoder")
        return self


def check_state(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, what: str):
    """CheckpointError naming `source` and the missing / unexpected / mis-shaped keys of `state` for `module`."""
    check_keys({k: tuple(v.shape) for k, v in module.state_dict().items()}, state, source, what)


def check_keys(shapes: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor], source: str, what: str):
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes]
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {shapes[k]})"
        for k in shapes
        if k in state and tuple(state[k].shape) != shapes[k]
    ]

    def show(keys):
        return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

    parts = [
        f"{name}: {show(keys)}"
        for name, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
        if keys
    ]
    if parts:
        raise CheckpointError(
            f"{source or 'weights'}: the {what} weights do not match its configuration "
            f"({'; '.join(parts)}); the file may be truncated or from another model"
        )
