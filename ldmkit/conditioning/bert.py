"""A BERT encoder (Devlin et al. 2019) for the frozen MiniLM weights, so that a text model's first image does not
import transformers (whose BERT module alone took 1.8 of a 6.2 s cold start).

Post-norm layers: x = LN(x + Attn(x)), x = LN(x + W2 gelu(W1 x)), the exact (erf) GELU, absolute learned positions
and token types, as the checkpoint's config.json says. Module names follow the checkpoint's keys
(`embeddings.word_embeddings.weight`, `encoder.layer.N.attention.self.query.weight`, ...), so its state dict loads
as it is; its pooler is not used (the denoiser reads the per-token hidden states).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..errors import InputError
from ..nn.construct import without_init


class _Embeddings(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.word_embeddings = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.position_embeddings = nn.Embedding(c["max_position_embeddings"], c["hidden_size"])
        self.token_type_embeddings = nn.Embedding(c["type_vocab_size"], c["hidden_size"])
        self.LayerNorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)  # (B, T, D), every token of type 0


class _SelfAttention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)


class _Output(nn.Module):
    """dense, then LN(x + dense(h)): the residual closing the attention and the feed-forward blocks."""

    def __init__(self, d_in: int, d: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(x + self.dense(h))


class _Attention(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        d = c["hidden_size"]
        self.heads = c["num_attention_heads"]
        self.self = _SelfAttention(d)
        self.output = _Output(d, d, c["layer_norm_eps"])

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, d // self.heads).transpose(1, 2) for p in self.self.children())
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])  # padding never attended
        return self.output(h.transpose(1, 2).reshape(b, t, d), x)


class _Intermediate(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.dense = nn.Linear(c["hidden_size"], c["intermediate_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # the exact (erf) GELU, config "gelu"


class _Layer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _Output(c["intermediate_size"], c["hidden_size"], c["layer_norm_eps"])

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, keep)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c["num_hidden_layers"]))


class BertEncoder(nn.Module):
    """BERT's hidden states (B, T, hidden_size) of token ids (B, T) under a padding mask (B, T), True = a token."""

    def __init__(self, config: dict):
        super().__init__()
        act, pos = config.get("hidden_act", "gelu"), config.get("position_embedding_type", "absolute")
        if act != "gelu" or pos != "absolute":
            raise InputError("the BERT encoder reads gelu, absolute-position checkpoints only (MiniLM's config)")
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    @classmethod
    def load(cls, folder: str | Path) -> "BertEncoder":
        """The checkpoint in `folder` (config.json and model.safetensors), in eval mode, frozen."""
        folder = Path(folder)
        with without_init():  # every weight is read next (strictly)
            model = cls(json.loads((folder / "config.json").read_text()))
        state = load_file(str(folder / "model.safetensors"))
        state = {k: v for k, v in state.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
        model.load_state_dict(state, strict=True)
        return model.eval().requires_grad_(False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x, keep = self.embeddings(ids), mask.bool()
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return x
