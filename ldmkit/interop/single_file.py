"""Stable Diffusion single-file checkpoints (the original latent-diffusion layout) <-> `ModelWeights`.

Layout: `model.diffusion_model.*` (U-Net), `first_stage_model.*` (KL autoencoder) and the text encoder, either
OpenAI CLIP in transformers' layout under `cond_stage_model.transformer.*` (SD 1.x) or OpenCLIP under
`cond_stage_model.model.*` (SD 2.x; fused q/k/v `in_proj`). The architecture is inferred from the tensors'
shapes. What shapes cannot tell takes Stable Diffusion's values: attention heads (8 per block for 1.x, 64-wide
heads for 2.x), GroupNorm groups (32), the latent scaling factor (0.18215), the noise schedule (scaled linear,
0.00085..0.012) and the parameterisation (eps for 1.x and 2.x inpainting, v for 2.x; override with `prediction`).
Files written here also carry those values in their metadata (key `ldmkit_interop`), so round trips are exact.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError
from ..conditioning.clip import infer_clip_config
from ..config import AutoencoderConfig, DiffusionConfig, UNetConfig, UpscaleConfig, from_dict, to_dict
from ..errors import InputError
from . import keymaps
from .bundle import ModelWeights
from .files import read_tensors, write_tensors

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_SD1, CLIP_SD2 = "cond_stage_model.transformer.", "cond_stage_model.model."
HINTS = "ldmkit_interop"  # metadata key: the configuration the weights cannot tell
SD_SCALING = 0.18215


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _fail(source, what: str) -> CheckpointError:
    return CheckpointError(f"{source}: {what}; is it a complete Stable Diffusion 1.x / 2.x checkpoint?")


# --- inferring the architecture -------------------------------------------------------------------------------------


def infer_unet_config(
    s: dict[str, torch.Tensor], heads=None, source: str = "", out_channels: int | None = None
) -> UNetConfig:
    """The UNetConfig of U-Net weights in the ldm layout (prefix removed); heads: int or one per level, else SD's;
    out_channels: for weights without the output layers (a ControlNet's copy of the encoder)."""
    if "input_blocks.0.0.weight" not in s or ("out.2.weight" not in s and out_channels is None):
        raise _fail(source, "no U-Net weights (model.diffusion_model.input_blocks.0.0 / out.2)")
    if any(k.startswith("label_emb.0.") for k in s):
        raise CheckpointError(
            f"{source}: this U-Net has a vector (ADM) label embedding (SDXL-style label_emb.0); "
            f"ldmkit converts Stable Diffusion 1.x / 2.x only"
        )
    ch0, in_ch = s["input_blocks.0.0.weight"].shape[:2]
    blocks = sorted({int(m.group(1)) for k in s if (m := re.match(r"input_blocks\.(\d+)\.", k))})
    downs = [k for k in blocks if f"input_blocks.{k}.0.op.weight" in s]
    n = len(downs) + 1
    per_level, rem = divmod(len(blocks) - 1 - len(downs), n)
    if rem or per_level < 1:
        raise _fail(source, f"its {len(blocks)} U-Net input blocks do not form {n} equal levels")
    chans, attn, k = [], [], 0
    for i in range(n):
        first = k + 1
        chans.append(s[f"input_blocks.{first}.0.in_layers.2.weight"].shape[0])
        if f"input_blocks.{first}.1.norm.weight" in s:
            attn.append(i)
        k += per_level + (1 if i < n - 1 else 0)
    if any(c % ch0 for c in chans):
        raise _fail(source, f"level channels {chans} are not multiples of {ch0}")
    to_k = [v for key, v in s.items() if key.endswith("attn2.to_k.weight")]
    proj = [v for key, v in s.items() if key.endswith(".proj_in.weight")]
    depth = len({m.group(1) for key in s if (m := re.search(r"\.transformer_blocks\.(\d+)\.", key))})
    context = to_k[0].shape[1] if to_k else 0
    sd2 = context == 1024
    if heads is None:
        if context not in (768, 1024) and (attn or "middle_block.1.norm.weight" in s):
            raise CheckpointError(
                f"{source}: cannot tell the attention head count of a U-Net with context width "
                f"{context} (SD 1.x has 768, 2.x 1024); pass heads= (one int, or one per level)"
            )
        heads = tuple(max(1, c // 64) for c in chans) if sd2 else (8,)
    label = s.get("label_emb.weight")
    return UNetConfig(
        in_channels=in_ch,
        out_channels=out_channels or s["out.2.weight"].shape[0],
        model_channels=ch0,
        channel_mult=tuple(c // ch0 for c in chans),
        num_res_blocks=per_level,
        attention_levels=tuple(attn),
        num_heads=(heads,) if isinstance(heads, int) else tuple(heads),
        transformer_depth=max(depth, 1),
        context_dim=context,
        num_classes=label.shape[0] - 1 if label is not None else 0,
        use_linear_projection=bool(proj) and proj[0].ndim == 2,
        upcast_attention=sd2,
        mid_attention="middle_block.1.norm.weight" in s,
    )


def infer_vae_config(s: dict[str, torch.Tensor], source: str = "") -> AutoencoderConfig:
    """The AutoencoderConfig of KL autoencoder weights in the ldm layout (prefix removed)."""
    if "encoder.conv_in.weight" not in s or "post_quant_conv.weight" not in s:
        raise _fail(source, "no autoencoder weights (first_stage_model.encoder.conv_in / post_quant_conv)")
    base, in_ch = s["encoder.conv_in.weight"].shape[:2]
    n = len({m.group(1) for k in s if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    res = len({m.group(1) for k in s if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    chans = [s[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(n)]
    latent = s["post_quant_conv.weight"].shape[0]
    if s["encoder.conv_out.weight"].shape[0] != 2 * latent:
        raise CheckpointError(
            f"{source}: the autoencoder is not a KL autoencoder (its encoder gives "
            f"{s['encoder.conv_out.weight'].shape[0]} channels for {latent} latent channels)"
        )
    return AutoencoderConfig(
        kind="kl",
        in_channels=in_ch,
        base_channels=base,
        channel_mult=tuple(c // base for c in chans),
        num_res_blocks=res,
        latent_channels=latent,
        mid_attention="encoder.mid.attn_1.q.weight" in s,
        scaling_factor=SD_SCALING,
    )


def _read_text(tensors, hints: dict[str, Any], source: str):
    """(CLIPTextConfig dict, text_model.* weights) or (None, None) when the file has no text encoder."""
    sd1, sd2 = _strip(tensors, CLIP_SD1), _strip(tensors, CLIP_SD2)
    heads = (hints.get("text") or {}).get("num_attention_heads")
    if sd1:
        state = keymaps.with_text_model_prefix(sd1)
        state.pop("text_model.embeddings.position_ids", None)  # an index buffer, rebuilt by the model
        layers = keymaps.clip_layer_count(state)
        return infer_clip_config(state, "quick_gelu", layers, heads), state
    if sd2:
        total = keymaps.open_clip_layer_count(sd2)
        # SD 2.x conditions on OpenCLIP ViT-H/14's penultimate layer: its 24th layer is never used.
        layers = (hints.get("text") or {}).get("num_hidden_layers") or (total - 1 if total == 24 else total)
        state = keymaps.clip_from_open_clip(sd2, layers, source)
        return infer_clip_config(state, "gelu", layers, heads), state
    return None, None


# --- reading and writing --------------------------------------------------------------------------------------------


def read_single_file(
    path: str | Path, *, unsafe_pickle: bool = False, prediction: str | None = None, heads=None
) -> ModelWeights:
    """A Stable Diffusion single-file checkpoint -> ModelWeights (validated against the inferred shapes).

    prediction: "eps" or "v" (default: eps for SD 1.x and 9-channel inpainting, v for other SD 2.x);
    heads: U-Net attention heads (int or one per level) for models that are neither SD 1.x nor 2.x.
    .ckpt pickles need unsafe_pickle=True.
    """
    if prediction not in (None, "eps", "v"):
        raise InputError(f"prediction={prediction!r} is not known; use 'eps' or 'v'")
    tensors, meta = read_tensors(path, unsafe_pickle=unsafe_pickle)
    source = str(path)
    hints = json.loads(meta[HINTS]) if HINTS in meta else {}
    unet_raw, vae_raw = _strip(tensors, UNET), _strip(tensors, VAE)
    if "unet" in hints:
        unet_cfg = from_dict(UNetConfig, hints["unet"])
    else:
        unet_cfg = infer_unet_config(unet_raw, heads, source)
    ae_cfg = (
        from_dict(AutoencoderConfig, hints["autoencoder"])
        if "autoencoder" in hints
        else infer_vae_config(vae_raw, source)
    )
    text_cfg, text = _read_text(tensors, hints, source)
    sd2 = unet_cfg.context_dim == 1024
    default_v = sd2 and unet_cfg.in_channels != 9
    diffusion = (
        from_dict(DiffusionConfig, hints["diffusion"])
        if "diffusion" in hints
        else DiffusionConfig(parameterisation="v" if default_v else "eps")
    )
    if prediction:
        diffusion = replace(diffusion, parameterisation=prediction)
    resolution = hints.get("resolution") or (768 if sd2 and diffusion.parameterisation == "v" else 512)
    used = (UNET, VAE, CLIP_SD1, CLIP_SD2)
    w = ModelWeights(
        unet_cfg,
        keymaps.unet_from_layout(unet_raw, unet_cfg, "ldm", source),
        ae_cfg,
        keymaps.vae_from_layout(_without_loss(vae_raw), ae_cfg, "ldm", source),
        diffusion,
        int(resolution),
        text_cfg,
        text,
        tuple(hints.get("class_names", ())),
        source,
        unused=[k for k in tensors if not k.startswith(used)],
        task=hints.get("task", "generate"),
        upscale=from_dict(UpscaleConfig, hints["upscale"]) if "upscale" in hints else UpscaleConfig(),
    )
    return w.validate()


def _without_loss(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Training-only autoencoder weights (discriminator, LPIPS) are not part of the model."""
    return {k: v for k, v in state.items() if not k.startswith("loss.")}


def single_file_tensors(w: ModelWeights) -> dict[str, torch.Tensor]:
    """ModelWeights -> the flat single-file state dict (ldm layout with its prefixes)."""
    out = {UNET + k: v for k, v in keymaps.unet_to_layout(w.unet, w.unet_config, "ldm").items()}
    out.update({VAE + k: v for k, v in keymaps.vae_to_layout(w.autoencoder, w.ae_config, "ldm").items()})
    if w.text is not None:
        if w.text_config["hidden_act"] == "quick_gelu":
            out.update({CLIP_SD1 + k: v for k, v in w.text.items()})
        else:
            out.update({CLIP_SD2 + k: v for k, v in keymaps.clip_to_open_clip(w.text).items()})
    return out


def write_single_file(path: str | Path, w: ModelWeights) -> Path:
    """ModelWeights -> a Stable Diffusion single-file .safetensors (plus ldmkit's configuration in its metadata).

    An SD 2.x text encoder is written with the layers it uses (23 of OpenCLIP's 24), as diffusers' exporter does.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(
            f"{path}: single-file checkpoints are written as .safetensors only; rename it to "
            f"{path.with_suffix('.safetensors').name}"
        )
    hints = {
        "unet": to_dict(w.unet_config),
        "autoencoder": to_dict(w.ae_config),
        "diffusion": to_dict(w.diffusion),
        "resolution": w.resolution,
        "class_names": list(w.class_names),
        "text": w.text_config,
        "task": w.task,
        "upscale": to_dict(w.upscale),
    }
    return write_tensors(path, single_file_tensors(w), {HINTS: json.dumps(hints)})
