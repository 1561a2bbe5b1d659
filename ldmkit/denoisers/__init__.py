"""Denoiser backbones, behind one small registry (denoiser.kind), and the U-Net size presets from test-sized to
Stable Diffusion 1.5. The DiT's presets (S, B, L, XL with patch 2, 4 or 8) are `dit.preset` values."""

from torch import nn

from ..config import BACKBONE_KINDS, DenoiserRun, UNetConfig
from ..errors import InputError
from .dit import DiT
from .unet import UNet

BACKBONES: dict[str, type[nn.Module]] = {"unet": UNet, "dit": DiT}  # denoiser.kind -> class(its config)
assert tuple(BACKBONES) == BACKBONE_KINDS


def build_backbone(run: DenoiserRun) -> nn.Module:
    """The backbone `run.denoiser.kind` names, built from its configuration (run.unet or run.dit)."""
    kind = run.denoiser.kind
    if kind not in BACKBONES:
        raise InputError(f"unknown backbone {kind!r}; set denoiser.kind to one of {', '.join(BACKBONES)}")
    return BACKBONES[kind](run.backbone)


def backbone_name(run: DenoiserRun) -> str:
    """How messages name the run's backbone: "U-Net" or "DiT"."""
    return {"unet": "U-Net", "dit": "DiT"}.get(run.denoiser.kind, run.denoiser.kind)


UNET_PRESETS: dict[str, UNetConfig] = {
    # Under 1M parameters: unit tests and smoke runs.
    "tiny": UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=(2,), norm_groups=8
    ),
    # The demo and Fashion-MNIST-sized models (about 5M parameters).
    "small": UNetConfig(
        model_channels=64,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_levels=(1, 2),
        num_heads=(4,),
        norm_groups=32,
    ),
    # 64-px data sets such as emoji (about 35M parameters).
    "base": UNetConfig(
        model_channels=128,
        channel_mult=(1, 2, 2, 4),
        num_res_blocks=2,
        attention_levels=(1, 2, 3),
        head_dim=32,
        norm_groups=32,
    ),
    # Stable Diffusion 1.x layout (860M parameters).
    "sd15": UNetConfig(
        model_channels=320,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        attention_levels=(0, 1, 2),
        num_heads=(8,),
        context_dim=768,
        norm_groups=32,
        mid_attention=True,
    ),
}
