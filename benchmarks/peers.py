"""diffusers peers of ldmkit models, for the benchmarks that compare the two on the same network.

`ldmkit.interop.diffusers.unet_to_diffusers` refuses a U-Net without cross-attention, because diffusers'
UNet2DConditionModel always builds it. A class-only ldmkit U-Net still has an exact diffusers counterpart: the
model built with a dummy context size whose transformer blocks drop their cross-attention (attn2 and norm2 set to
None, the form diffusers itself builds for a block with cross_attention_dim=None).
"""

from __future__ import annotations

from dataclasses import replace

from ldmkit.config import UNetConfig
from ldmkit.interop import keymaps
from ldmkit.interop.diffusers_config import unet_config_to_diffusers


def diffusers_unet(cfg: UNetConfig):
    """diffusers' UNet2DConditionModel laid out like an ldmkit U-Net of config `cfg` (randomly initialised)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock

    config = unet_config_to_diffusers(replace(cfg, context_dim=cfg.context_dim or 1))
    unet = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    if not cfg.context_dim:
        for block in unet.modules():
            if isinstance(block, BasicTransformerBlock):
                block.attn2, block.norm2 = None, None
    return unet


def diffusers_copy(unet):
    """The diffusers peer of an ldmkit UNet module, holding the same weights."""
    from ldmkit.interop.diffusers import unet_to_diffusers

    if unet.cfg.context_dim:
        return unet_to_diffusers(unet)
    peer = diffusers_unet(unet.cfg)
    peer.load_state_dict(keymaps.unet_to_layout(unet.state_dict(), unet.cfg, "diffusers"), strict=True)
    return peer
