"""diffusers' `ControlNetModel` <-> ldmkit's ControlNet (denoisers/controlnet.py), both ways.

The encoder and middle block use the U-Net's key map (keymaps.unet_rules, "diffusers" layout); the rest is renamed
here: controlnet_cond_embedding.{conv_in, blocks.i, conv_out} <-> hint.{conv_in, blocks.i, conv_out},
controlnet_down_blocks.i <-> zero_convs.i, controlnet_mid_block <-> mid_out. Calls correspond as
`controlnet(sample, t, encoder_hidden_states=ctx, controlnet_cond=image, return_dict=False)` ==
`ours(sample, t, Conditioning(context=ctx), image)` (down residuals then the middle block's), the image in [0, 1] RGB.
"""

from __future__ import annotations

from typing import Any

import torch

from ..checkpoint import load_state
from ..denoisers.controlnet import ControlNet
from ..errors import InputError
from . import keymaps
from .diffusers import _diffusers_model
from .diffusers_config import UNET_DEFAULTS, unet_config_from_diffusers, unet_config_to_diffusers

_OWN = (
    ("controlnet_cond_embedding.", "hint."),
    ("controlnet_down_blocks.", "zero_convs."),
    ("controlnet_mid_block.", "mid_out."),
)

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


def controlnet_from_diffusers(model) -> ControlNet:
    """A diffusers ControlNetModel (object) -> ldmkit ControlNet with the same weights, in eval mode."""
    config, state = dict(model.config), model.state_dict()
    if config.get("controlnet_conditioning_channel_order", "rgb") != "rgb" or config.get("global_pool_conditions"):
        raise InputError("only ControlNets with RGB conditions and no global pooling convert to ldmkit")
    cfg = unet_config_from_diffusers(_unet_config(config))
    widths = tuple(config.get("conditioning_embedding_out_channels", (16, 32, 96, 256)))
    net = ControlNet(cfg, config.get("conditioning_channels", 3), widths)
    own = {k: v for k, v in state.items() if k.startswith(tuple(a for a, _ in _OWN))}
    rest = {k: v for k, v in state.items() if k not in own}
    ours = keymaps.unet_from_layout(rest, cfg, "diffusers", "ControlNetModel")
    for key, value in own.items():
        for theirs, mine in _OWN:
            if key.startswith(theirs):
                ours[mine + key[len(theirs) :]] = value
    load_state(net, ours, "ControlNetModel", "ControlNet")
    return net.eval()


def controlnet_state_to_diffusers(net: ControlNet) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """ldmkit ControlNet -> (ControlNetModel config, state dict in its names)."""
    unet_cfg = unet_config_to_diffusers(net.cfg)
    config = {k: v for k, v in unet_cfg.items() if k in CONTROLNET_KEYS}
    config |= {"conditioning_channels": net.hint_channels, "conditioning_embedding_out_channels": list(net.widths)}
    state = net.state_dict()
    own = {k: v for k, v in state.items() if k.startswith(tuple(m for _, m in _OWN))}
    theirs = keymaps.unet_to_layout({k: v for k, v in state.items() if k not in own}, net.cfg, "diffusers")
    for key, value in own.items():
        for t, mine in _OWN:
            if key.startswith(mine):
                theirs[t + key[len(mine) :]] = value
    return config, theirs


def controlnet_to_diffusers(net: ControlNet):
    """ldmkit ControlNet -> a diffusers ControlNetModel with the same weights (needs diffusers)."""
    config, state = controlnet_state_to_diffusers(net)
    return _diffusers_model("ControlNetModel", config, state).eval()
