"""diffusers' `ControlNetModel` <-> ldmkit's ControlNet (denoisers/controlnet.py), both ways.

The key map is keymaps.controlnet_rules ("diffusers" layout): the U-Net's for the encoder and middle block, and
controlnet_cond_embedding.{conv_in, blocks.i, conv_out} <-> hint.{conv_in, blocks.i, conv_out},
controlnet_down_blocks.i <-> zero_convs.i, controlnet_mid_block <-> mid_out. A model object or the folder its
save_pretrained wrote is read, and folders are written, without importing diffusers. Calls correspond as
`controlnet(sample, t, encoder_hidden_states=ctx, controlnet_cond=image, return_dict=False)` ==
`ours(sample, t, Conditioning(context=ctx), image)` (down residuals then the middle block's), the image in [0, 1] RGB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_state
from ..denoisers.controlnet import ControlNet
from ..errors import InputError
from . import keymaps
from .diffusers import WEIGHTS_STEM, _check_class, _config_and_state, _diffusers_model, versioned_config
from .diffusers_config import UNET_DEFAULTS, unet_config_from_diffusers, unet_config_to_diffusers
from .files import write_model_folder

CLASS = "ControlNetModel"

# the ControlNetModel options a U-Net configuration carries over (the rest describe the decoder or are U-Net only)
CONTROLNET_KEYS = {
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "class_embed_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "num_class_embeds",
    "upcast_attention",
    "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim",
    "mid_block_type",
}


def _unet_config(config: dict[str, Any]) -> dict[str, Any]:
    """The UNet2DConditionModel config whose encoder a ControlNetModel config describes (the decoder mirrored)."""
    c = {k: v for k, v in config.items() if k in UNET_DEFAULTS}
    down = list(c.get("down_block_types", UNET_DEFAULTS["down_block_types"]))
    c["up_block_types"] = ["CrossAttnUpBlock2D" if t.startswith("CrossAttn") else "UpBlock2D" for t in down[::-1]]
    c["out_channels"] = c.get("in_channels", UNET_DEFAULTS["in_channels"])
    return c


def controlnet_state_from_diffusers(
    config: dict[str, Any], state: dict[str, torch.Tensor], source: str = ""
) -> ControlNet:
    """A ControlNetModel's (config, state dict) -> ldmkit ControlNet with the same weights, in eval mode."""
    _check_class(config, CLASS, source or "config")
    if config.get("controlnet_conditioning_channel_order", "rgb") != "rgb" or config.get("global_pool_conditions"):
        raise InputError(f"{source or CLASS}: only ControlNets with RGB conditions and no global pooling convert")
    cfg = unet_config_from_diffusers(_unet_config(config))
    widths = tuple(config.get("conditioning_embedding_out_channels", (16, 32, 96, 256)))
    net = ControlNet(cfg, config.get("conditioning_channels", 3), widths)
    rules = keymaps.controlnet_rules(cfg, len(widths) - 1, "diffusers")
    ours = keymaps.translate(state, rules, reverse=True, source=source, what="ControlNet")
    load_state(net, ours, source or CLASS, "ControlNet")
    return net.eval()


def controlnet_from_diffusers(x, *, unsafe_pickle: bool = False) -> ControlNet:
    """A diffusers ControlNetModel (object, or the folder its save_pretrained wrote) -> ldmkit ControlNet with the
    same weights, in eval mode."""
    config, state, source = _config_and_state(x, CLASS, unsafe_pickle)
    return controlnet_state_from_diffusers(config, state, source)


def controlnet_state_to_diffusers(net: ControlNet) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """ldmkit ControlNet -> (ControlNetModel config, state dict in its names)."""
    unet_cfg = unet_config_to_diffusers(net.cfg)
    config = {k: v for k, v in unet_cfg.items() if k in CONTROLNET_KEYS}
    config |= {"conditioning_channels": net.hint_channels, "conditioning_embedding_out_channels": list(net.widths)}
    rules = keymaps.controlnet_rules(net.cfg, len(net.widths) - 1, "diffusers")
    return config, keymaps.translate(net.state_dict(), rules, what="ControlNet")


def write_diffusers_controlnet(net: ControlNet, path: str | Path) -> Path:
    """ldmkit ControlNet -> a ControlNetModel save_pretrained folder at `path`; diffusers is not needed."""
    config, state = controlnet_state_to_diffusers(net)
    return write_model_folder(path, WEIGHTS_STEM, versioned_config({"_class_name": CLASS, **config}), state)


def controlnet_to_diffusers(net: ControlNet):
    """ldmkit ControlNet -> a diffusers ControlNetModel with the same weights (needs diffusers)."""
    config, state = controlnet_state_to_diffusers(net)
    return _diffusers_model(CLASS, config, state).eval()
