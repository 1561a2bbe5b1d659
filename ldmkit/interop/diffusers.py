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
from . import keymaps
from .diffusers_config import (unet_config_from_diffusers, unet_config_to_diffusers, vae_config_from_diffusers,
                               vae_config_to_diffusers)
from .files import read_model_folder, write_model_folder
from ..errors import InputError, MissingDependencyError

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


def unet_state_from_diffusers(config: dict[str, Any], state: dict[str, torch.Tensor], source: str = ""
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


def unet_to_diffusers(unet: UNet, path: str | Path | None = None, *, sample_size: int | None = None):
    """ldmkit UNet -> diffusers UNet2DConditionModel: written as a save_pretrained folder when `path` is given
    (no diffusers needed), returned as a diffusers object when diffusers is importable (else None).

    sample_size: the latent size recorded in config.json (diffusers pipelines use it as the default image size / 8).
    The call mapping is the one of `unet_from_diffusers`.
    """
    config = unet_config_to_diffusers(unet.cfg, sample_size)
    state = keymaps.unet_to_layout(unet.state_dict(), unet.cfg, "diffusers")
    return _export(config, state, path, "UNet2DConditionModel")


# --- autoencoder ----------------------------------------------------------------------------------------------------


def vae_state_from_diffusers(config: dict[str, Any], state: dict[str, torch.Tensor], source: str = ""
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


def vae_to_diffusers(vae: AutoencoderKL, path: str | Path | None = None, *, sample_size: int | None = None):
    """ldmkit AutoencoderKL -> diffusers AutoencoderKL, written to `path` and/or returned (see unet_to_diffusers).

    sample_size: the image size recorded in config.json (informational in diffusers).
    """
    config = vae_config_to_diffusers(vae.cfg, sample_size)
    state = keymaps.vae_to_layout(vae.state_dict(), vae.cfg, "diffusers")
    return _export(config, state, path, "AutoencoderKL")


# --- shared ---------------------------------------------------------------------------------------------------------


def diffusers_version() -> str | None:
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers.__version__


def _export(config: dict[str, Any], state: dict[str, torch.Tensor], path, class_name: str):
    version = diffusers_version()
    if version:
        config = {**config, "_diffusers_version": version}
    if path is not None:
        write_model_folder(path, WEIGHTS_STEM, config, state)
    if version is None:
        if path is None:
            raise MissingDependencyError(f"building a diffusers {class_name} needs diffusers (`pip install diffusers`); or pass "
                              f"a folder path to write it without diffusers")
        return None
    import diffusers

    cls = getattr(diffusers, class_name)
    model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"diffusers {diffusers.__version__} {class_name} does not match the exported weights "
                              f"(missing: {missing[:8]}; unexpected: {unexpected[:8]})")
    return model.eval()
