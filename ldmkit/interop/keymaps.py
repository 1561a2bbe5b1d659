"""Key maps between ldmkit's state dicts and the two foreign layouts of the same networks.

Layouts:
- "diffusers": `UNet2DConditionModel` / `AutoencoderKL` parameter names (down_blocks.i.resnets.j, ...).
- "ldm": the original latent-diffusion names found in Stable Diffusion single-file checkpoints
  (input_blocks.k.0.in_layers.0, encoder.down.i.block.j, ...), without the `model.diffusion_model.` /
  `first_stage_model.` prefix.

A map is a list of rules `(our block prefix, their block prefix, leaf renames)`. A key is translated by its block
(the longest rule prefix it starts with) and then by the leaf renames, which replace whole dotted segments.
Tensors keep their values; only the autoencoder's attention projections change shape in the "ldm" layout
(linear (C, C) here, 1x1 convolution (C, C, 1, 1) there).
"""

from __future__ import annotations

import re

import torch

from ..checkpoint import CheckpointError
from ..config import AutoencoderConfig, UNetConfig
from ..errors import InputError

Leaf = tuple[tuple[str, str], ...]  # (our segment(s), their segment(s)), dotted, e.g. ("skip", "conv_shortcut")
Rule = tuple[str, str, Leaf]

# --- leaf renames inside one block ----------------------------------------------------------------------------------

RES_DIFFUSERS: Leaf = (("emb_proj", "time_emb_proj"), ("skip", "conv_shortcut"))
RES_LDM: Leaf = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("skip", "skip_connection"),
)
RES_LDM_VAE: Leaf = (("skip", "nin_shortcut"),)
# Spatial transformer: identical in both foreign layouts.
TRANSFORMER: Leaf = (
    ("blocks", "transformer_blocks"),
    ("to_out", "to_out.0"),
    ("ff_in.proj", "ff.net.0.proj"),
    ("ff_out", "ff.net.2"),
)
VAE_ATTN_DIFFUSERS: Leaf = (
    ("norm", "group_norm"),
    ("attn.to_q", "to_q"),
    ("attn.to_k", "to_k"),
    ("attn.to_v", "to_v"),
    ("attn.to_out", "to_out.0"),
)
VAE_ATTN_LDM: Leaf = (("attn.to_q", "q"), ("attn.to_k", "k"), ("attn.to_v", "v"), ("attn.to_out", "proj_out"))
# Names older diffusers versions used for the autoencoder's attention (still found in some saved folders).
LEGACY_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

# --- rules ----------------------------------------------------------------------------------------------------------


def unet_rules(cfg: UNetConfig, layout: str) -> list[Rule]:
    """The block map of `UNet(cfg)` to the "diffusers" or "ldm" layout."""
    if layout == "diffusers":
        return _unet_rules_diffusers(cfg)
    if layout == "ldm":
        return _unet_rules_ldm(cfg)
    raise InputError(f"unknown layout {layout!r}; use 'diffusers' or 'ldm'")


def _unet_rules_diffusers(cfg: UNetConfig) -> list[Rule]:
    n = len(cfg.channel_mult)
    rules: list[Rule] = [
        ("conv_in", "conv_in", ()),
        ("time_mlp", "time_embedding", ()),
        ("class_emb", "class_embedding", ()),
        ("norm_out", "conv_norm_out", ()),
        ("conv_out", "conv_out", ()),
        ("mid_res1", "mid_block.resnets.0", RES_DIFFUSERS),
        ("mid_attn", "mid_block.attentions.0", TRANSFORMER),
        ("mid_res2", "mid_block.resnets.1", RES_DIFFUSERS),
    ]
    for path, theirs, count, sampler in (
        ("down", "down_blocks", cfg.num_res_blocks, "downsamplers.0"),
        ("up", "up_blocks", cfg.num_res_blocks + 1, "upsamplers.0"),
    ):
        for i in range(n):
            for j in range(count):
                rules.append((f"{path}.{i}.res.{j}", f"{theirs}.{i}.resnets.{j}", RES_DIFFUSERS))
                rules.append((f"{path}.{i}.attn.{j}", f"{theirs}.{i}.attentions.{j}", TRANSFORMER))
            rules.append((f"{path}.{i}.resample", f"{theirs}.{i}.{sampler}", ()))
    return rules


def _unet_rules_ldm(cfg: UNetConfig) -> list[Rule]:
    n, attn = len(cfg.channel_mult), set(cfg.attention_levels)
    rules: list[Rule] = [
        ("conv_in", "input_blocks.0.0", ()),
        ("time_mlp.linear_1", "time_embed.0", ()),
        ("time_mlp.linear_2", "time_embed.2", ()),
        ("class_emb", "label_emb", ()),
        ("norm_out", "out.0", ()),
        ("conv_out", "out.2", ()),
        ("mid_res1", "middle_block.0", RES_LDM),
    ]
    if cfg.mid_attention:
        rules += [("mid_attn", "middle_block.1", TRANSFORMER), ("mid_res2", "middle_block.2", RES_LDM)]
    else:
        rules.append(("mid_res2", "middle_block.1", RES_LDM))
    k = 0  # input_blocks.0 is conv_in
    for i in range(n):
        for j in range(cfg.num_res_blocks):
            k += 1
            rules.append((f"down.{i}.res.{j}", f"input_blocks.{k}.0", RES_LDM))
            if i in attn:
                rules.append((f"down.{i}.attn.{j}", f"input_blocks.{k}.1", TRANSFORMER))
        if i < n - 1:
            k += 1
            rules.append((f"down.{i}.resample.conv", f"input_blocks.{k}.0.op", ()))
    k = -1
    for u, level in enumerate(reversed(range(n))):  # up[u] is level n - 1 - u
        for j in range(cfg.num_res_blocks + 1):
            k += 1
            rules.append((f"up.{u}.res.{j}", f"output_blocks.{k}.0", RES_LDM))
            if level in attn:  # else output_blocks.k.1 is the upsampler
                rules.append((f"up.{u}.attn.{j}", f"output_blocks.{k}.1", TRANSFORMER))
        if level > 0:
            rules.append((f"up.{u}.resample", f"output_blocks.{k}.{2 if level in attn else 1}", ()))
    return rules


def controlnet_rules(cfg: UNetConfig, halvings: int, layout: str) -> list[Rule]:
    """The block map of a ControlNet for `UNet(cfg)` whose hint encoder halves `halvings` times: the U-Net's map for
    its encoder copy, then the hint encoder, the zero convolutions and the middle block's projection, to diffusers'
    ControlNetModel ("diffusers") or to Stable Diffusion's ControlNet files ("ldm", `control_model.` removed), whose
    input_hint_block is one sequence with a SiLU between convolutions (so convolution j sits at index 2j)."""
    rules = unet_rules(cfg, layout)
    skips = len(cfg.channel_mult) * (cfg.num_res_blocks + 1)  # conv_in, each block, a downsampler but the last
    if layout == "diffusers":
        rules += [("hint", "controlnet_cond_embedding", ()), ("mid_out", "controlnet_mid_block", ())]
        return rules + [(f"zero_convs.{i}", f"controlnet_down_blocks.{i}", ()) for i in range(skips)]
    rules += [("hint.conv_in", "input_hint_block.0", ()), ("mid_out", "middle_block_out.0", ())]
    rules += [(f"hint.blocks.{j}", f"input_hint_block.{2 * j + 2}", ()) for j in range(2 * halvings)]
    rules.append(("hint.conv_out", f"input_hint_block.{4 * halvings + 2}", ()))
    return rules + [(f"zero_convs.{i}", f"zero_convs.{i}.0", ()) for i in range(skips)]


def vae_rules(cfg: AutoencoderConfig, layout: str) -> list[Rule]:
    """The block map of `AutoencoderKL(cfg)` to the "diffusers" or "ldm" layout."""
    if layout not in ("diffusers", "ldm"):
        raise InputError(f"unknown layout {layout!r}; use 'diffusers' or 'ldm'")
    d = layout == "diffusers"
    n = len(cfg.channel_mult)
    res, attn = (RES_DIFFUSERS, VAE_ATTN_DIFFUSERS) if d else (RES_LDM_VAE, VAE_ATTN_LDM)
    rules: list[Rule] = [("quant_conv", "quant_conv", ()), ("post_quant_conv", "post_quant_conv", ())]
    for part in ("encoder", "decoder"):
        mid = f"{part}.mid_block" if d else f"{part}.mid"
        rules += [
            (f"{part}.conv_in", f"{part}.conv_in", ()),
            (f"{part}.conv_out", f"{part}.conv_out", ()),
            (f"{part}.norm_out", f"{part}.conv_norm_out" if d else f"{part}.norm_out", ()),
            (f"{part}.mid_res1", f"{mid}.resnets.0" if d else f"{mid}.block_1", res),
            (f"{part}.mid_attn", f"{mid}.attentions.0" if d else f"{mid}.attn_1", attn),
            (f"{part}.mid_res2", f"{mid}.resnets.1" if d else f"{mid}.block_2", res),
        ]
    for i in range(n):
        count = cfg.num_res_blocks
        theirs = f"encoder.down_blocks.{i}" if d else f"encoder.down.{i}"
        for j in range(count):
            rules.append((f"encoder.down.{i}.res.{j}", f"{theirs}.resnets.{j}" if d else f"{theirs}.block.{j}", res))
        rules.append((f"encoder.down.{i}.resample", f"{theirs}.downsamplers.0" if d else f"{theirs}.downsample", ()))
        # The decoder runs its levels from the lowest resolution up; the ldm layout numbers them by level.
        theirs = f"decoder.up_blocks.{i}" if d else f"decoder.up.{n - 1 - i}"
        for j in range(count + 1):
            rules.append((f"decoder.up.{i}.res.{j}", f"{theirs}.resnets.{j}" if d else f"{theirs}.block.{j}", res))
        rules.append((f"decoder.up.{i}.resample", f"{theirs}.upsamplers.0" if d else f"{theirs}.upsample", ()))
    return rules


# --- translation ----------------------------------------------------------------------------------------------------


def _rename_leaf(rest: str, leaf: Leaf, reverse: bool) -> str:
    s = f".{rest}."
    for ours, theirs in leaf:
        a, b = (theirs, ours) if reverse else (ours, theirs)
        s = s.replace(f".{a}.", f".{b}.", 1)
    return s[1:-1]


def translate(
    state: dict[str, torch.Tensor], rules: list[Rule], *, reverse: bool = False, source: str = "", what: str = "weights"
) -> dict[str, torch.Tensor]:
    """Rename every key of `state` by `rules` (ours -> theirs, or theirs -> ours with reverse=True).

    A key that no rule covers raises CheckpointError naming `source` and the keys.
    """
    table = sorted(((t, o, leaf) if reverse else (o, t, leaf) for o, t, leaf in rules), key=lambda r: -len(r[0]))
    out, unknown = {}, []
    for key, value in state.items():
        for src, dst, leaf in table:
            if key.startswith(src + "."):
                out[f"{dst}.{_rename_leaf(key[len(src) + 1 :], leaf, reverse)}"] = value
                break
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise CheckpointError(
            f"{source or 'state dict'}: unexpected {what} keys: {shown}; the file does not hold "
            f"the network its configuration describes"
        )
    return out


def unet_to_layout(state, cfg: UNetConfig, layout: str) -> dict[str, torch.Tensor]:
    """Our U-Net state dict -> the "diffusers" or "ldm" names."""
    return translate(state, unet_rules(cfg, layout), what="U-Net")


def unet_from_layout(state, cfg: UNetConfig, layout: str, source: str = "") -> dict[str, torch.Tensor]:
    """A "diffusers" or "ldm" U-Net state dict -> our names."""
    return translate(state, unet_rules(cfg, layout), reverse=True, source=source, what="U-Net")


_LDM_VAE_CONV = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def vae_to_layout(state, cfg: AutoencoderConfig, layout: str) -> dict[str, torch.Tensor]:
    """Our autoencoder state dict -> the "diffusers" or "ldm" names (ldm attention weights as 1x1 convolutions)."""
    out = translate(state, vae_rules(cfg, layout), what="autoencoder")
    if layout == "ldm":
        out = {k: v[:, :, None, None] if _LDM_VAE_CONV.search(k) and v.ndim == 2 else v for k, v in out.items()}
    return out


def vae_from_layout(state, cfg: AutoencoderConfig, layout: str, source: str = "") -> dict[str, torch.Tensor]:
    """A "diffusers" or "ldm" autoencoder state dict -> our names (1x1 convolution weights become linear)."""
    if layout == "ldm":
        state = {k: v.flatten(1) if _LDM_VAE_CONV.search(k) and v.ndim == 4 else v for k, v in state.items()}
    else:
        state = {
            _modern_vae_attn_key(k): v.flatten(1) if ".attentions." in k and v.ndim == 4 else v
            for k, v in state.items()
        }
    return translate(state, vae_rules(cfg, layout), reverse=True, source=source, what="autoencoder")


def _modern_vae_attn_key(key: str) -> str:
    parts = key.split(".")
    if ".attentions." in key and len(parts) >= 2 and parts[-2] in LEGACY_VAE_ATTN:
        parts[-2] = LEGACY_VAE_ATTN[parts[-2]]
    return ".".join(parts)


# --- CLIP text encoder: transformers layout (text_model.*) <-> open_clip layout -------------------------------------

_OPEN_CLIP_TOP = (
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.final_layer_norm.weight", "ln_final.weight"),
    ("text_model.final_layer_norm.bias", "ln_final.bias"),
)
_OPEN_CLIP_LAYER = (
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("self_attn.out_proj", "attn.out_proj"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)
_HF_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")
_OC_LAYER = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")


def clip_to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel (`text_model.*`) -> open_clip text tower; q/k/v are fused into in_proj."""
    top = dict(_OPEN_CLIP_TOP)
    out, qkv = {}, {}
    for key, v in state.items():
        if key in top:
            out[top[key]] = v
            continue
        m = _HF_LAYER.match(key)
        if m is None:
            raise CheckpointError(f"text encoder key {key} has no open_clip equivalent")
        i, rest = m.groups()
        proj = re.match(r"self_attn\.(q|k|v)_proj\.(weight|bias)$", rest)
        if proj:
            qkv.setdefault((i, proj.group(2)), {})[proj.group(1)] = v
            continue
        out[f"transformer.resblocks.{i}.{_rename_leaf(rest, _OPEN_CLIP_LAYER, False)}"] = v
    for (i, kind), parts in qkv.items():
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def clip_from_open_clip(
    state: dict[str, torch.Tensor], layers: int | None = None, source: str = ""
) -> dict[str, torch.Tensor]:
    """open_clip text tower -> transformers CLIPTextModel (`text_model.*`), keeping the first `layers` blocks.

    in_proj (3D, D) splits into q, k, v in that order. text_projection, logit_scale and attn_mask are not part
    of a CLIPTextModel and are left out.
    """
    top = {b: a for a, b in _OPEN_CLIP_TOP}
    out, unknown = {}, []
    for key, v in state.items():
        if key in top:
            out[top[key]] = v
            continue
        m = _OC_LAYER.match(key)
        if m is None:
            if key not in ("text_projection", "logit_scale", "attn_mask"):
                unknown.append(key)
            continue
        i, rest = int(m.group(1)), m.group(2)
        if layers is not None and i >= layers:
            continue
        base = f"text_model.encoder.layers.{i}"
        fused = re.match(r"attn\.in_proj_(weight|bias)$", rest)
        if fused:
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                out[f"{base}.self_attn.{name}_proj.{fused.group(1)}"] = part.contiguous()
        else:
            out[f"{base}.{_rename_leaf(rest, _OPEN_CLIP_LAYER, True)}"] = v
    if unknown:
        raise CheckpointError(f"{source or 'state dict'}: unexpected open_clip text keys: {', '.join(unknown[:8])}")
    return out


def clip_layer_count(state: dict[str, torch.Tensor], pattern: re.Pattern = _HF_LAYER) -> int:
    """Number of transformer layers in a CLIP text state dict (transformers or open_clip layout)."""
    ids = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(ids) + 1 if ids else 0


def open_clip_layer_count(state: dict[str, torch.Tensor]) -> int:
    return clip_layer_count(state, _OC_LAYER)


def with_text_model_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP text weights saved by transformers >= 5 lack the `text_model.` prefix; add it."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
