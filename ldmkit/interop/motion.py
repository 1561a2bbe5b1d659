"""AnimateDiff motion modules (diffusers `MotionAdapter`, `UNetMotionModel`) to and from ldmkit's video U-Net.

ldmkit's temporal attention (denoisers/temporal.py) is laid out as AnimateDiff's transformer, and sits where
diffusers' motion U-Net puts its motion modules (after each block's residual block and transformer, and after the
middle block's transformer), so the conversion renames keys and nothing else:

    down.{i}.temporal.{j}.attn   <-> down_blocks.{i}.motion_modules.{j}
    mid_temporal.attn            <-> mid_block.motion_modules.0
    up.{u}.temporal.{j}.attn     <-> up_blocks.{u}.motion_modules.{j}

with the transformer's leaf renames (blocks -> transformer_blocks, to_out -> to_out.0, ff_in/ff_out -> ff.net.0/2).
diffusers stores each block's sinusoidal positions (`pos_embed.pe`); ldmkit computes them, so they are dropped on
the way in (after a check that they are the sinusoids) and written on the way out. The spatial layers convert as a
`UNet2DConditionModel`'s (interop/diffusers.py). A U-Net with temporal convolutions (Video LDM's, unet.temporal_conv)
has no AnimateDiff equivalent and is refused.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, load_state
from ..config import UNetConfig
from ..denoisers.temporal import frame_positions, temporal_state
from ..denoisers.unet import UNet
from ..errors import InputError
from . import keymaps
from .diffusers import WEIGHTS_STEM, _check_class, _config_and_state, _diffusers_model, versioned_config
from .diffusers_config import unet_config_from_diffusers, unet_config_to_diffusers
from .files import write_model_folder

ADAPTER = "MotionAdapter"
MOTION_UNET = "UNetMotionModel"
POSITIONS = "pos_embed.pe"  # diffusers' stored sinusoids in each temporal transformer block


def motion_rules(cfg: UNetConfig) -> list[keymaps.Rule]:
    """The block map of a video U-Net's temporal attention to diffusers' motion modules."""
    n = len(cfg.channel_mult)
    rules = [("mid_temporal.attn", "mid_block.motion_modules.0", keymaps.TRANSFORMER)]
    for path, theirs, count in (
        ("down", "down_blocks", cfg.num_res_blocks),
        ("up", "up_blocks", cfg.num_res_blocks + 1),
    ):
        for i in range(n):
            for j in range(count):
                rules.append((f"{path}.{i}.temporal.{j}.attn", f"{theirs}.{i}.motion_modules.{j}", keymaps.TRANSFORMER))
    return rules


def _check_animatediff(cfg: UNetConfig) -> None:
    if not cfg.temporal_heads:
        raise InputError("this U-Net has no temporal layers (unet.temporal_heads=0), so it has no motion modules")
    if cfg.temporal_conv:
        raise InputError(
            "this video U-Net has temporal convolutions (unet.temporal_conv=true), which AnimateDiff's motion modules "
            "do not have; train with --set unet.temporal_conv=false to export it"
        )


def motion_state_to_diffusers(unet: UNet) -> dict[str, torch.Tensor]:
    """The temporal layers of a video U-Net under MotionAdapter's (and UNetMotionModel's) names, positions included."""
    cfg = unet.cfg
    _check_animatediff(cfg)
    out = keymaps.translate(temporal_state(unet), motion_rules(cfg), what="temporal")
    for key in [k for k in out if k.endswith(".attn1.to_q.weight")]:
        block, dim = key[: -len(".attn1.to_q.weight")], out[key].shape[1]
        out[f"{block}.{POSITIONS}"] = frame_positions(cfg.max_frames, dim)[None]  # (1, max_frames, dim)
    return out


def motion_state_from_diffusers(state: dict[str, torch.Tensor], cfg: UNetConfig, source: str = "") -> dict:
    """A MotionAdapter's (or a UNetMotionModel's motion modules') state -> ldmkit's temporal layer names. Stored
    positions must be the sinusoids ldmkit computes (CheckpointError otherwise)."""
    plain = {}
    for k, v in state.items():
        if k.endswith(POSITIONS):
            want = frame_positions(v.shape[1], v.shape[2])[None]
            if v.shape[1] != cfg.max_frames or not torch.allclose(v.float(), want, atol=1e-4):
                raise CheckpointError(f"{source}: {k} holds positions other than the {cfg.max_frames} sinusoids")
            continue
        plain[k] = v
    return keymaps.translate(plain, motion_rules(cfg), reverse=True, source=source, what="motion module")


def _adapter_config(cfg: UNetConfig) -> dict[str, Any]:
    return {
        "_class_name": ADAPTER,
        "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
        "motion_layers_per_block": cfg.num_res_blocks,
        "motion_transformer_layers_per_block": cfg.temporal_depth,
        "motion_mid_block_layers_per_block": 1,
        "motion_transformer_layers_per_mid_block": cfg.temporal_depth,
        "motion_num_attention_heads": cfg.temporal_heads,
        "motion_norm_num_groups": cfg.norm_groups,
        "motion_max_seq_length": cfg.max_frames,
        "use_motion_mid_block": True,
        "conv_in_channels": None,
    }


def _temporal_config(cfg: UNetConfig, adapter: dict[str, Any], source: str) -> UNetConfig:
    """`cfg` with the temporal layers a MotionAdapter config describes (InputError for what ldmkit cannot hold)."""

    def one(key: str, default):
        v = adapter.get(key, default)
        if isinstance(v, (list, tuple)):
            if len(set(v)) != 1:
                raise InputError(f"{source}: {key}={list(v)} varies per block; ldmkit's temporal layers take one value")
            v = v[0]
        return v

    blocks = list(adapter.get("block_out_channels", []))
    if blocks != [cfg.model_channels * m for m in cfg.channel_mult]:
        raise InputError(f"{source}: motion modules for blocks {blocks}, but the U-Net's are {cfg.model_channels}x"
                         f"{list(cfg.channel_mult)}")  # fmt: skip
    if one("motion_layers_per_block", 2) != cfg.num_res_blocks or not adapter.get("use_motion_mid_block", True):
        raise InputError(f"{source}: its motion modules do not sit after every block of this U-Net")
    if one("motion_norm_num_groups", 32) != cfg.norm_groups or adapter.get("conv_in_channels"):
        raise InputError(f"{source}: GroupNorm groups or an input convolution this U-Net does not have")
    depth = one("motion_transformer_layers_per_block", 1)
    if one("motion_transformer_layers_per_mid_block", 1) != depth:
        raise InputError(f"{source}: the middle block's motion module has another depth than the others")
    return replace(
        cfg,
        temporal_heads=one("motion_num_attention_heads", 8),
        temporal_depth=depth,
        temporal_conv=False,
        max_frames=int(adapter.get("motion_max_seq_length", 32)),
    )


# --- MotionAdapter ----------------------------------------------------------------------------------------------


def motion_adapter_from_unet(unet: UNet) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(MotionAdapter config, state dict) of a video U-Net's temporal layers."""
    return _adapter_config(unet.cfg), motion_state_to_diffusers(unet)


def write_motion_adapter(unet: UNet, path: str | Path) -> Path:
    """The temporal layers of a video U-Net as a MotionAdapter save_pretrained folder; diffusers is not needed."""
    config, state = motion_adapter_from_unet(unet)
    return write_model_folder(path, WEIGHTS_STEM, versioned_config(config), state)


def with_motion_adapter(unet: UNet, x, *, unsafe_pickle: bool = False) -> UNet:
    """An image U-Net plus a MotionAdapter (object or folder) -> ldmkit's video U-Net holding both."""
    config, state, source = _config_and_state(x, ADAPTER, unsafe_pickle)
    _check_class(config, ADAPTER, source)
    cfg = _temporal_config(unet.cfg, config, source)
    video = UNet(cfg)
    image = {k: v for k, v in unet.state_dict().items() if k not in temporal_state(unet)}
    load_state(video, image | motion_state_from_diffusers(state, cfg, source), source, "video U-Net")
    return video.eval()


# --- UNetMotionModel ----------------------------------------------------------------------------------------------


def motion_unet_from_diffusers(x, *, unsafe_pickle: bool = False) -> UNet:
    """diffusers UNetMotionModel (object or folder) -> ldmkit's video U-Net with the same weights, in eval mode.
    Calls correspond as `motion(sample.permute(0, 2, 1, 3, 4), t, encoder_hidden_states=ctx.repeat_interleave(F, 0))
    .sample == ours(sample, t, Conditioning(context=ctx)).permute(0, 2, 1, 3, 4)`: diffusers' clips are
    (B, C, F, H, W) and its context is one per frame."""
    config, state, source = _config_and_state(x, MOTION_UNET, unsafe_pickle)
    _check_class(config, MOTION_UNET, source)
    if config.get("mid_block_layers", 1) != 1 or config.get("transformer_layers_per_mid_block") not in (None, 1):
        raise InputError(f"{source}: a middle block of more than one layer, which ldmkit's U-Net does not have")
    motion_only = ("mid_block_layers", "transformer_layers_per_mid_block", "reverse_motion_num_attention_heads")
    spatial = {
        k: v
        for k, v in config.items()
        if not k.startswith(("motion_", "temporal_", "reverse_temporal_", "use_motion")) and k not in motion_only
    }
    spatial |= {
        "_class_name": "UNet2DConditionModel",
        "down_block_types": [t.replace("Motion", "2D") for t in config["down_block_types"]],
        "up_block_types": [t.replace("Motion", "2D") for t in config["up_block_types"]],
        "attention_head_dim": config.get("num_attention_heads") or config.get("attention_head_dim", 8),
    }
    spatial = {
        k: v for k, v in spatial.items() if k not in ("num_attention_heads", "reverse_transformer_layers_per_block")
    }
    cfg = unet_config_from_diffusers(spatial)
    adapter = {
        "block_out_channels": config["block_out_channels"],
        "motion_layers_per_block": config.get("layers_per_block", 2),
        "motion_transformer_layers_per_block": config.get("temporal_transformer_layers_per_block", 1),
        "motion_transformer_layers_per_mid_block": config.get("temporal_transformer_layers_per_mid_block", 1),
        "motion_num_attention_heads": config.get("motion_num_attention_heads", 8),
        "motion_norm_num_groups": config.get("norm_num_groups", 32),
        "motion_max_seq_length": config.get("motion_max_seq_length", 32),
        "use_motion_mid_block": config.get("use_motion_mid_block", True),
    }
    cfg = _temporal_config(cfg, adapter, source)
    motion = {k: v for k, v in state.items() if ".motion_modules." in k}
    image = keymaps.unet_from_layout({k: v for k, v in state.items() if k not in motion}, cfg, "diffusers", source)
    video = UNet(cfg)
    load_state(video, image | motion_state_from_diffusers(motion, cfg, source), source, "video U-Net")
    return video.eval()


def motion_unet_state_to_diffusers(unet: UNet) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(UNetMotionModel config, state dict) of ldmkit's video U-Net (InputError for what diffusers cannot hold)."""
    cfg = unet.cfg
    _check_animatediff(cfg)
    if cfg.num_classes or cfg.upcast_attention or not cfg.flip_sin_to_cos or cfg.freq_shift:
        raise InputError(
            "diffusers' UNetMotionModel has no class embedding, no float32 attention option and Stable Diffusion's "
            "noise-level embedding; this video U-Net differs (unet.num_classes, upcast_attention, flip_sin_to_cos "
            "or freq_shift)"
        )
    config = unet_config_to_diffusers(cfg)
    for key in ("class_embed_type", "num_class_embeds", "upcast_attention", "flip_sin_to_cos", "freq_shift"):
        config.pop(key, None)  # UNet2DConditionModel's options that UNetMotionModel does not take
    config |= {
        "_class_name": MOTION_UNET,
        "down_block_types": [t.replace("2D", "Motion") for t in config["down_block_types"]],
        "up_block_types": [t.replace("2D", "Motion") for t in config["up_block_types"]],
        "num_attention_heads": config["attention_head_dim"],
        "motion_num_attention_heads": cfg.temporal_heads,
        "motion_max_seq_length": cfg.max_frames,
        "temporal_transformer_layers_per_block": cfg.temporal_depth,
        "temporal_transformer_layers_per_mid_block": cfg.temporal_depth,
        "use_motion_mid_block": True,
    }
    image = {k: v for k, v in unet.state_dict().items() if k not in temporal_state(unet)}
    return config, keymaps.unet_to_layout(image, cfg, "diffusers") | motion_state_to_diffusers(unet)


def motion_unet_to_diffusers(unet: UNet):
    """ldmkit's video U-Net -> a diffusers UNetMotionModel with the same weights (needs diffusers installed)."""
    return _diffusers_model(MOTION_UNET, *motion_unet_state_to_diffusers(unet))
