"""`ModelWeights`: a whole latent diffusion model as configs plus state dicts, the hub every format converts through.

The U-Net and autoencoder weights are in ldmkit's layouts; the CLIP text encoder's in transformers'
`CLIPTextModel` layout (`text_model.*` keys), described by a `CLIPTextConfig`-style dict (see `clip_config`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..autoencoder import build_autoencoder
from ..checkpoint import CheckpointError
from ..config import AutoencoderConfig, DiffusionConfig, UNetConfig
from ..denoisers.unet import UNet
from ..errors import InputError

CLIP_VOCAB = 49408  # CLIP's BPE vocabulary: 512 byte symbols, 48,894 merges, start and end tokens
CLIP_POSITIONS = 77


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
    wrong = [f"{k} {tuple(state[k].shape)} (expected {shapes[k]})" for k in shapes
             if k in state and tuple(state[k].shape) != shapes[k]]

    def show(keys):
        return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

    parts = [f"{name}: {show(keys)}" for name, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                                        ("wrong shapes", wrong)) if keys]
    if parts:
        raise CheckpointError(f"{source or 'weights'}: the {what} weights do not match its configuration "
                              f"({'; '.join(parts)}); the file may be truncated or from another model")


# --- CLIP text encoder ----------------------------------------------------------------------------------------------


def clip_config(width: int, layers: int, heads: int, act: str, mlp_width: int | None = None,
                vocab: int = CLIP_VOCAB, positions: int = CLIP_POSITIONS) -> dict[str, Any]:
    """A transformers `CLIPTextConfig` dict. act "quick_gelu" is OpenAI CLIP (SD 1.x, pads with the end token),
    "gelu" OpenCLIP (SD 2.x, pads with 0); token ids as Stable Diffusion's published configs give them."""
    if act not in ("quick_gelu", "gelu"):
        raise InputError(f"CLIP activation {act!r} is not known; use 'quick_gelu' (SD 1.x) or 'gelu' (SD 2.x)")
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": width,
            "intermediate_size": mlp_width or 4 * width, "num_hidden_layers": layers, "num_attention_heads": heads,
            "hidden_act": act, "vocab_size": vocab, "max_position_embeddings": positions, "layer_norm_eps": 1e-5,
            "projection_dim": 768 if act == "quick_gelu" else 512, "bos_token_id": 0, "eos_token_id": 2,
            "pad_token_id": 1, "attention_dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02}


def infer_clip_config(state: dict[str, torch.Tensor], act: str, layers: int, heads: int | None = None):
    """The CLIPTextConfig of `text_model.*` weights; heads (not in the weights) default to width / 64, which holds
    for both Stable Diffusion text encoders."""
    try:
        vocab, width = state["text_model.embeddings.token_embedding.weight"].shape
        positions = state["text_model.embeddings.position_embedding.weight"].shape[0]
        mlp = state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"text encoder weights lack {e.args[0]}; the file is truncated or not a CLIP model") \
            from None
    return clip_config(width, layers, heads or max(1, width // 64), act, mlp, vocab, positions)


def clip_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a CLIPTextModel's weights in the `text_model.*` layout."""
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    out = {"text_model.embeddings.token_embedding.weight": (cfg["vocab_size"], d),
           "text_model.embeddings.position_embedding.weight": (cfg["max_position_embeddings"], d),
           "text_model.final_layer_norm.weight": (d,), "text_model.final_layer_norm.bias": (d,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"text_model.encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{p}self_attn.{name}.weight"], out[f"{p}self_attn.{name}.bias"] = (d, d), (d,)
        for name in ("layer_norm1", "layer_norm2"):
            out[f"{p}{name}.weight"], out[f"{p}{name}.bias"] = (d,), (d,)
        out[f"{p}mlp.fc1.weight"], out[f"{p}mlp.fc1.bias"] = (f, d), (f,)
        out[f"{p}mlp.fc2.weight"], out[f"{p}mlp.fc2.bias"] = (d, f), (d,)
    return out


def clip_encoder_options(cfg: dict[str, Any]) -> dict[str, Any]:
    """Options of ldmkit's "clip" text encoder (ldmkit.conditioning.text) with this CLIPTextConfig's shape.

    Stable Diffusion's U-Nets were trained attending to padding, so every position is reported real; SD 1.x
    (quick_gelu) pads with the end token, SD 2.x (gelu) with 0.
    """
    sd1 = cfg["hidden_act"] == "quick_gelu"
    return {"preset": "sd1" if sd1 else "sd2", "width": cfg["hidden_size"], "layers": cfg["num_hidden_layers"],
            "heads": cfg["num_attention_heads"], "mlp_width": cfg["intermediate_size"], "act": cfg["hidden_act"],
            "pad_with": "eot" if sd1 else "zero", "mask_padding": False,
            "max_length": cfg["max_position_embeddings"]}


def clip_config_from_options(options: dict[str, Any]) -> dict[str, Any]:
    """The CLIPTextConfig of a "clip" text encoder rebuilt from its options (its `options` attribute)."""
    from ..conditioning.text import CLIP_PRESETS

    o = {**CLIP_PRESETS[options.get("preset", "tiny")], **{k: v for k, v in options.items() if v is not None}}
    return clip_config(o["width"], o["layers"], o["heads"], o["act"], o["mlp_width"],
                       positions=o.get("max_length", CLIP_POSITIONS))


def _clip_module_prefix(encoder: torch.nn.Module) -> str:
    """Prefix of the `text_model.*`-equivalent keys inside a "clip" text encoder's state dict."""
    names = list(encoder.state_dict())
    for prefix in ("model.text_model.", "model."):
        if f"{prefix}final_layer_norm.weight" in names:
            return prefix
    raise CheckpointError(f"{type(encoder).__name__} holds no CLIP text model under `model`; only the 'clip' text "
                          f"encoder can hold Stable Diffusion text weights")


def clip_state_to_encoder(encoder: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`text_model.*` weights -> the key names of `encoder.state_dict()` ("clip" text encoder)."""
    prefix = _clip_module_prefix(encoder)
    return {prefix + k[len("text_model."):]: v for k, v in state.items()}


def clip_state_from_encoder(encoder: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A "clip" text encoder's state dict -> `text_model.*` weights (buffers such as position_ids are dropped)."""
    prefix = _clip_module_prefix(encoder)
    shapes = set(clip_shapes(clip_config(8, 0, 1, "gelu")))  # the top-level names
    out = {"text_model." + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in out.items() if k in shapes or ".encoder.layers." in k}
