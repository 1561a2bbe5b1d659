"""CLIP's text transformer (Radford et al. 2021) as an ldmkit text encoder, and its weight layout.

`CLIPTextEncoder` wraps transformers' `CLIPTextModel`, tokenized by ldmkit's own BPE tokenizer
(`clip_tokenizer.py`). The helpers below describe the weights in transformers' `text_model.*` layout with a
`CLIPTextConfig`-style dict, which is how every interop format (diffusers folders, SD single files) carries them.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import CheckpointError, InputError
from .clip_tokenizer import CLIPTokenizer
from .encoder import TextEncoder, transformers_module

CLIP_VOCAB = 49408  # CLIP's BPE vocabulary: 512 byte symbols, 48,894 merges, start and end tokens
CLIP_POSITIONS = 77


# Shapes of the CLIP text transformer. SD 1.x uses OpenAI's ViT-L/14 text tower (padding with the end token);
# SD 2.x OpenCLIP ViT-H/14's without its last layer (23 of 24; padding with 0). Both attend to padding.
CLIP_PRESETS = {
    "tiny": dict(width=64, layers=2, heads=2, mlp_width=256, act="quick_gelu", pad_with="zero", mask_padding=True),
    "sd1": dict(width=768, layers=12, heads=12, mlp_width=3072, act="quick_gelu", pad_with="eot", mask_padding=False),
    "sd2": dict(width=1024, layers=23, heads=16, mlp_width=4096, act="gelu", pad_with="zero", mask_padding=False),
}


class CLIPTextEncoder(TextEncoder):
    """CLIP text transformer (Radford et al. 2021): causal, with a final LayerNorm."""

    name = "clip"

    def __init__(
        self,
        preset: str = "tiny",
        width: int | None = None,
        layers: int | None = None,
        heads: int | None = None,
        mlp_width: int | None = None,
        act: str | None = None,
        pad_with: str | None = None,
        mask_padding: bool | None = None,
        max_length: int = 77,
        seed: int = 0,
    ):
        """preset: "tiny", "sd1" or "sd2" (CLIP_PRESETS); width, layers, heads, mlp_width, act ("quick_gelu" or
        "gelu"), pad_with ("zero" or "eot") and mask_padding (report padding as masked) override the preset;
        max_length: context length (77 for released CLIP weights); seed: seeds the random initial weights, so a
        frozen random encoder is rebuilt identically from its options (load real weights into `self.model`)."""
        if preset not in CLIP_PRESETS:
            raise InputError(f"unknown CLIP preset {preset!r}; use one of {', '.join(CLIP_PRESETS)}")
        given = dict(
            width=width,
            layers=layers,
            heads=heads,
            mlp_width=mlp_width,
            act=act,
            pad_with=pad_with,
            mask_padding=mask_padding,
        )
        o = CLIP_PRESETS[preset] | {k: v for k, v in given.items() if v is not None}
        if o["width"] % o["heads"]:
            raise InputError(f"CLIP width {o['width']} is not divisible by {o['heads']} heads; change one of them")
        if o["act"] not in ("quick_gelu", "gelu"):
            raise InputError(f"CLIP act={o['act']!r} is not known; use 'quick_gelu' (SD 1.x) or 'gelu' (SD 2.x)")
        tokenizer = CLIPTokenizer(context_length=max_length, pad_with=o["pad_with"])
        tf = transformers_module()
        config = tf.CLIPTextConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=o["width"],
            intermediate_size=o["mlp_width"],
            num_hidden_layers=o["layers"],
            num_attention_heads=o["heads"],
            max_position_embeddings=max_length,
            hidden_act=o["act"],
            bos_token_id=tokenizer.start_id,
            eos_token_id=tokenizer.end_id,
            pad_token_id=tokenizer.pad_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = tf.CLIPTextModel(config)
        super().__init__(
            o["width"], max_length, tokenizer.pad_id, {"preset": preset, **o, "max_length": max_length, "seed": seed}
        )
        self.mask_padding = bool(o["mask_padding"])
        self.tokenizer, self.model = tokenizer, model.eval().requires_grad_(False)

    def token_lists(self, prompts: list[str]) -> list[list[int]]:
        return self.tokenizer.token_lists(prompts)

    def embedding_site(self) -> tuple[torch.nn.Module, str]:
        return getattr(self.model, "text_model", self.model).embeddings, "token_embedding"  # transformers 5: none

    def in_vocabulary(self, token: str) -> bool:
        """A word of the BPE vocabulary (as a whole word, `cat</w>`, or a piece, `cat`), or a token added before."""
        ids = self.tokenizer.ids
        return token in self.added_tokens or token in ids or f"{token}</w>" in ids

    def load_clip_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load CLIP text-tower weights in transformers / diffusers naming (with or without `text_model.`)."""
        state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
        own = self.model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise InputError(
                f"CLIP weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}; "
                f"pass the text encoder's weights only, for preset {self.options['preset']!r} with "
                f"{self.options['layers']} layers"
            )
        wrong = [k for k in own if own[k].shape != state[k].shape]
        if wrong:
            raise InputError(
                f"CLIP weight {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, this encoder "
                f"{tuple(own[wrong[0]].shape)} (preset {self.options['preset']!r}, width {self.dim}); "
                "pick the preset the weights were trained with (sd1 or sd2)"
            )
        self.model.load_state_dict(state)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # No attention mask: attention is causal, so padding never reaches a real token, and the padding
        # positions come out exactly as the Stable Diffusion U-Nets saw them in training.
        return self.model(input_ids=ids).last_hidden_state  # (B, T, width), after the final LayerNorm


# --- the weight layout ---------------------------------------------------------------------------------------------


def clip_config(
    width: int,
    layers: int,
    heads: int,
    act: str,
    mlp_width: int | None = None,
    vocab: int = CLIP_VOCAB,
    positions: int = CLIP_POSITIONS,
) -> dict[str, Any]:
    """A transformers `CLIPTextConfig` dict. act "quick_gelu" is OpenAI CLIP (SD 1.x, pads with the end token),
    "gelu" OpenCLIP (SD 2.x, pads with 0); token ids as Stable Diffusion's published configs give them."""
    if act not in ("quick_gelu", "gelu"):
        raise InputError(f"CLIP activation {act!r} is not known; use 'quick_gelu' (SD 1.x) or 'gelu' (SD 2.x)")
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": width,
        "intermediate_size": mlp_width or 4 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "hidden_act": act,
        "vocab_size": vocab,
        "max_position_embeddings": positions,
        "layer_norm_eps": 1e-5,
        "projection_dim": 768 if act == "quick_gelu" else 512,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "attention_dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
    }


def infer_clip_config(state: dict[str, torch.Tensor], act: str, layers: int, heads: int | None = None):
    """The CLIPTextConfig of `text_model.*` weights; heads (not in the weights) default to width / 64, which holds
    for both Stable Diffusion text encoders."""
    try:
        vocab, width = state["text_model.embeddings.token_embedding.weight"].shape
        positions = state["text_model.embeddings.position_embedding.weight"].shape[0]
        mlp = state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(
            f"text encoder weights lack {e.args[0]}; the file is truncated or not a CLIP model"
        ) from None
    return clip_config(width, layers, heads or max(1, width // 64), act, mlp, vocab, positions)


def clip_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a CLIPTextModel's weights in the `text_model.*` layout."""
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    out = {
        "text_model.embeddings.token_embedding.weight": (cfg["vocab_size"], d),
        "text_model.embeddings.position_embedding.weight": (cfg["max_position_embeddings"], d),
        "text_model.final_layer_norm.weight": (d,),
        "text_model.final_layer_norm.bias": (d,),
    }
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
    """Options of ldmkit's "clip" text encoder (`CLIPTextEncoder`) with this CLIPTextConfig's shape.

    Stable Diffusion's U-Nets were trained attending to padding, so every position is reported real; SD 1.x
    (quick_gelu) pads with the end token, SD 2.x (gelu) with 0.
    """
    sd1 = cfg["hidden_act"] == "quick_gelu"
    return {
        "preset": "sd1" if sd1 else "sd2",
        "width": cfg["hidden_size"],
        "layers": cfg["num_hidden_layers"],
        "heads": cfg["num_attention_heads"],
        "mlp_width": cfg["intermediate_size"],
        "act": cfg["hidden_act"],
        "pad_with": "eot" if sd1 else "zero",
        "mask_padding": False,
        "max_length": cfg["max_position_embeddings"],
    }


def clip_config_from_options(options: dict[str, Any]) -> dict[str, Any]:
    """The CLIPTextConfig of a "clip" text encoder rebuilt from its options (its `options` attribute)."""
    o = {**CLIP_PRESETS[options.get("preset", "tiny")], **{k: v for k, v in options.items() if v is not None}}
    return clip_config(
        o["width"], o["layers"], o["heads"], o["act"], o["mlp_width"], positions=o.get("max_length", CLIP_POSITIONS)
    )


def _clip_module_prefix(encoder: torch.nn.Module) -> str:
    """Prefix of the `text_model.*`-equivalent keys inside a "clip" text encoder's state dict."""
    names = list(encoder.state_dict())
    for prefix in ("model.text_model.", "model."):
        if f"{prefix}final_layer_norm.weight" in names:
            return prefix
    raise CheckpointError(
        f"{type(encoder).__name__} holds no CLIP text model under `model`; only the 'clip' text "
        f"encoder can hold Stable Diffusion text weights"
    )


def clip_state_to_encoder(encoder: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`text_model.*` weights -> the key names of `encoder.state_dict()` ("clip" text encoder)."""
    prefix = _clip_module_prefix(encoder)
    return {prefix + k[len("text_model.") :]: v for k, v in state.items()}


def clip_state_from_encoder(encoder: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A "clip" text encoder's state dict -> `text_model.*` weights (buffers such as position_ids are dropped)."""
    prefix = _clip_module_prefix(encoder)
    shapes = set(clip_shapes(clip_config(8, 0, 1, "gelu")))  # the top-level names
    out = {"text_model." + k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in out.items() if k in shapes or ".encoder.layers." in k}
