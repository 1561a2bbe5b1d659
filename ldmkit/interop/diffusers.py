"""diffusers parity: `UNet2DConditionModel` and `AutoencoderKL` <-> ldmkit's `UNet` and `AutoencoderKL`.

The networks are laid out block for block alike, so weights map one to one by renaming (see keymaps.py). Every
function takes either a diffusers model object or a folder written by its `save_pretrained` (config.json +
diffusion_pytorch_model.safetensors); folders are read and written without importing diffusers, which ldmkit
never needs at run time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..autoencoder.vae import AutoencoderKL
from ..checkpoint import CheckpointError, load_state
from ..config import AutoencoderConfig, UNetConfig
from ..denoisers.unet import UNet
from ..errors import InputError, MissingDependencyError
from . import keymaps
from .diffusers_config import (
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
)
from .files import read_model_folder, write_model_folder

WEIGHTS_STEM = "diffusion_pytorch_model"


def _config_and_state(x, what: str, unsafe_pickle: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(config dict, state dict, a name for messages) of a diffusers model object or save_pretrained folder."""
    if isinstance(x, (str, Path)):
        config, state, path = read_model_folder(x, WEIGHTS_STEM, unsafe_pickle=unsafe_pickle)
        return config, state, str(path)
    if hasattr(x, "config") and hasattr(x, "state_dict"):
        return dict(x.config), x.state_dict(), f"diffusers {type(x).__name__}"
    raise TypeError(f"expected a diffusers {what} or the folder its save_pretrained wrote, got {type(x).__name__}")


def _check_class(config: dict[str, Any], expected: str, source: str):
    name = config.get("_class_name", expected)
    if name != expected:
        raise InputError(f"{source} holds a {name}, not a {expected}")


# --- U-Net ----------------------------------------------------------------------------------------------------------


def unet_state_from_diffusers(
    config: dict[str, Any], state: dict[str, torch.Tensor], source: str = ""
) -> tuple[UNetConfig, dict[str, torch.Tensor]]:
    """A UNet2DConditionModel's (config, state dict) -> (UNetConfig, our state dict)."""
    _check_class(config, "UNet2DConditionModel", source or "config")
    cfg = unet_config_from_diffusers(config)
    return cfg, keymaps.unet_from_layout(state, cfg, "diffusers", source)


def unet_from_diffusers(x, *, unsafe_pickle: bool = False) -> UNet:
    """diffusers UNet2DConditionModel (object or folder) -> ldmkit UNet with the same weights, in eval mode.

    Calls correspond as
    `unet(sample, t, encoder_hidden_states=ctx, encoder_attention_mask=mask).sample
        == ours(sample, t, Conditioning(context=ctx, context_mask=mask.bool()))`,
    with `class_labels=y` -> `Conditioning(labels=y)` (a model with num_class_embeds=N has num_classes=N-1 here;
    label N-1 is ldmkit's null label). Inpainting models (9 input channels) accept either the full concatenation
    as `sample` or the 4 latent channels plus `Conditioning(concat=cat([mask, masked_latents], 1))`.
    """
    config, state, source = _config_and_state(x, "UNet2DConditionModel", unsafe_pickle)
    cfg, ours = unet_state_from_diffusers(config, state, source)
    unet = UNet(cfg)
    load_state(unet, ours, source, "U-Net")
    return unet.eval()


def _unet_export(unet: UNet, sample_size: int | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config = unet_config_to_diffusers(unet.cfg, sample_size)
    return config, keymaps.unet_to_layout(unet.state_dict(), unet.cfg, "diffusers")


def write_diffusers_unet(unet: UNet, path: str | Path, *, sample_size: int | None = None) -> Path:
    """ldmkit UNet -> a UNet2DConditionModel save_pretrained folder at `path`; diffusers is not needed.

    sample_size: the latent size recorded in config.json (diffusers pipelines use it as the default image size / 8).
    """
    config, state = _unet_export(unet, sample_size)
    return write_model_folder(path, WEIGHTS_STEM, versioned_config(config), state)


def unet_to_diffusers(unet: UNet, *, sample_size: int | None = None):
    """ldmkit UNet -> a diffusers `UNet2DConditionModel` with the same weights (needs diffusers installed; to
    write the folder without it, use `write_diffusers_unet`). The call mapping is the one of `unet_from_diffusers`.
    """
    config, state = _unet_export(unet, sample_size)
    return _diffusers_model("UNet2DConditionModel", config, state)


# --- autoencoder ----------------------------------------------------------------------------------------------------


def vae_state_from_diffusers(
    config: dict[str, Any], state: dict[str, torch.Tensor], source: str = ""
) -> tuple[AutoencoderConfig, dict[str, torch.Tensor]]:
    """An AutoencoderKL's (config, state dict) -> (AutoencoderConfig, our state dict)."""
    _check_class(config, "AutoencoderKL", source or "config")
    cfg = vae_config_from_diffusers(config)
    return cfg, keymaps.vae_from_layout(state, cfg, "diffusers", source)


def vae_from_diffusers(x, *, unsafe_pickle: bool = False) -> AutoencoderKL:
    """diffusers AutoencoderKL (object or folder) -> ldmkit AutoencoderKL with the same weights, in eval mode.

    `vae.encode(x).latent_dist.mean == ours.encode(x).mean` and `vae.decode(z).sample == ours.decode(z)`;
    scaling_factor and shift_factor land in `ours.cfg` (the pipeline applies them, as in diffusers).
    """
    config, state, source = _config_and_state(x, "AutoencoderKL", unsafe_pickle)
    cfg, ours = vae_state_from_diffusers(config, state, source)
    vae = AutoencoderKL(cfg)
    load_state(vae, ours, source, "autoencoder")
    return vae.eval()


def _vae_export(vae: AutoencoderKL, sample_size: int | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config = vae_config_to_diffusers(vae.cfg, sample_size)
    return config, keymaps.vae_to_layout(vae.state_dict(), vae.cfg, "diffusers")


def write_diffusers_vae(vae: AutoencoderKL, path: str | Path, *, sample_size: int | None = None) -> Path:
    """ldmkit AutoencoderKL -> a diffusers AutoencoderKL save_pretrained folder at `path`; diffusers is not needed.

    sample_size: the image size recorded in config.json (informational in diffusers).
    """
    config, state = _vae_export(vae, sample_size)
    return write_model_folder(path, WEIGHTS_STEM, versioned_config(config), state)


def vae_to_diffusers(vae: AutoencoderKL, *, sample_size: int | None = None):
    """ldmkit AutoencoderKL -> a diffusers `AutoencoderKL` with the same weights (needs diffusers installed; to
    write the folder without it, use `write_diffusers_vae`)."""
    config, state = _vae_export(vae, sample_size)
    return _diffusers_model("AutoencoderKL", config, state)


# --- shared ---------------------------------------------------------------------------------------------------------


def diffusers_version() -> str | None:
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers.__version__


def versioned_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json as save_pretrained writes it: with the installed diffusers version when there is one."""
    version = diffusers_version()
    return {**config, "_diffusers_version": version} if version else dict(config)


def _diffusers_model(class_name: str, config: dict[str, Any], state: dict[str, torch.Tensor]):
    """A diffusers model object of `class_name` built from `config` holding `state` exactly."""
    try:
        import diffusers
    except ImportError:
        raise MissingDependencyError(
            f"building a diffusers {class_name} needs diffusers (`pip install diffusers`); "
            f"to write its folder without diffusers, use write_diffusers_unet / "
            f"write_diffusers_vae"
        ) from None
    cls = getattr(diffusers, class_name)
    model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"diffusers {diffusers.__version__} {class_name} does not match the exported weights "
            f"(missing: {missing[:8]}; unexpected: {unexpected[:8]})"
        )
    return model.eval()
