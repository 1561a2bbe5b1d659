"""Textual inversion (Gal et al. 2022): new tokens whose embedding vectors are learned, everything else frozen.

A token stands for n vectors of the text encoder's width: its prompt word is cut out before tokenizing and replaced
by n new ids (conditioning/encoder.py), whose rows `NewTokens` appends to the frozen token table.

Files, both read and written (safetensors only):
- "a1111" (AUTOMATIC1111's embeddings folder): one tensor `emb_params` (n, width); the token is the file's name
  (ldmkit also records it in the metadata, `name`);
- "diffusers" (`load_textual_inversion`, diffusers' `learned_embeds.safetensors`): one tensor named by the token,
  (n, width) or (width,).
A file for SDXL (`clip_l` and `clip_g`: two text encoders) is refused: ldmkit's models have one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..checkpoint import atomic_write
from ..errors import InputError
from .files import read_safetensors

EMBEDDING_LAYOUTS = ("a1111", "diffusers")
A1111_KEY = "emb_params"
META_KEY = "ldmkit.embedding"


class NewTokens(nn.Module):
    """A token table with rows appended: ids below `vocab` look up the frozen table, ids from `vocab` on the rows."""

    def __init__(self, table: nn.Module, vocab: int, rows: torch.Tensor):
        """table: the encoder's table (nn.Embedding, or a NewTokens of earlier tokens); vocab: its number of rows;
        rows: (k, width), the new ones (a Parameter: textual inversion trains them and nothing else)."""
        super().__init__()
        self.table, self.vocab = table, vocab
        self.rows = nn.Parameter(rows.detach().clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        known = ids < self.vocab  # (B, T)
        old = self.table(ids.clamp(max=self.vocab - 1))  # (B, T, width)
        new = self.rows[(ids - self.vocab).clamp(min=0, max=len(self.rows) - 1)].to(old.dtype)  # (B, T, width)
        return torch.where(known[..., None], old, new)


def table_rows(table: nn.Module) -> int:
    """How many ids a token table (nn.Embedding or NewTokens) answers."""
    return table.num_embeddings if isinstance(table, nn.Embedding) else table.vocab + len(table.rows)


def table_weight(table: nn.Module) -> torch.Tensor:
    """The base table's weights (vocab, width) under any NewTokens."""
    return table.weight if isinstance(table, nn.Embedding) else table_weight(table.table)


def add_embedding(encoder: nn.Module, token: str, vectors: torch.Tensor) -> NewTokens:
    """Make `token` stand for `vectors` (n, width) in the prompts of `encoder` (n new ids); the table's NewTokens.
    InputError when the encoder cannot learn tokens (MiniLM, frozen), the token is already in its vocabulary or
    empty, or the vectors are not of the encoder's width."""
    owner, attr = encoder.embedding_site()
    if not token.strip() or token != token.strip():
        raise InputError(f"textual-inversion token {token!r} must be a word without spaces around it, e.g. <sks>")
    if encoder.in_vocabulary(token):
        raise InputError(
            f"textual-inversion token {token!r} is already in the {encoder.name} text encoder's vocabulary, so "
            f"prompts could not tell it from the word it is; choose another, e.g. <{token.strip('<>')}-concept>"
        )
    vectors = vectors.reshape(-1, vectors.shape[-1]) if vectors.ndim == 1 else vectors
    if vectors.ndim != 2 or vectors.shape[1] != encoder.dim or not len(vectors):
        raise InputError(
            f"the embedding for {token!r} has shape {tuple(vectors.shape)}; this {encoder.name} text encoder needs "
            f"(n, {encoder.dim}) vectors: an embedding made for another model"
        )
    table = getattr(owner, attr)
    weight = table_weight(table)
    start = table_rows(table)
    new = NewTokens(table, start, vectors.to(weight.device, weight.dtype))
    setattr(owner, attr, new)
    encoder.added_tokens[token] = list(range(start, start + len(vectors)))
    return new


def initial_vectors(encoder: nn.Module, n: int, word: str = "") -> torch.Tensor:
    """(n, width) starting vectors: the mean embedding of `word`'s tokens, or of the whole table for no word."""
    owner, attr = encoder.embedding_site()
    weight = table_weight(getattr(owner, attr)).detach()
    ids = encoder.token_lists([word])[0][1:-1] if word else []
    base = weight[ids].mean(0) if ids else weight.mean(0)
    return base.float().expand(n, -1).clone()


# --- files ----------------------------------------------------------------------------------------------------------


def read_embedding(path: str | Path, token: str | None = None) -> tuple[str, torch.Tensor]:
    """(token, vectors (n, width)) of an embedding file in either layout; token overrides the file's. InputError,
    in one line, for pickles, unreadable files and files that hold no embedding."""
    path = Path(path)
    state, meta = read_safetensors(path, "embedding")
    if {"clip_l", "clip_g"} & set(state):
        raise InputError(f"{path} is an SDXL embedding (clip_l and clip_g: two text encoders); ldmkit's have one")
    if A1111_KEY in state:
        about = json.loads(meta.get(META_KEY, "{}"))
        name, vectors = about.get("token") or path.stem, state[A1111_KEY]
    elif len(state) == 1:
        name, vectors = next(iter(state.items()))
    else:
        raise InputError(
            f"{path}: not a textual-inversion embedding (keys {', '.join(sorted(state)[:4])}); an embedding holds "
            f"one tensor: {A1111_KEY} (AUTOMATIC1111) or the token's (diffusers learned_embeds)"
        )
    vectors = vectors.float()
    return token or name, vectors[None] if vectors.ndim == 1 else vectors


def write_embedding(
    path: str | Path, token: str, vectors: torch.Tensor, layout: str = "a1111", about: dict | None = None
) -> Path:
    """Write `vectors` (n, width) of `token` in `layout` ("a1111" or "diffusers")."""
    if layout not in EMBEDDING_LAYOUTS:
        raise InputError(f"unknown embedding layout {layout!r}; use one of {', '.join(EMBEDDING_LAYOUTS)}")
    key = A1111_KEY if layout == "a1111" else token
    meta = {META_KEY: json.dumps({"token": token, **(about or {})})}
    state = {key: vectors.detach().float().cpu().contiguous()}
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))  # in one rename, readable as usual


def load_embedding(encoder: nn.Module, path: str | Path, token: str | None = None) -> str:
    """Read the embedding in `path` (either layout) into `encoder`; the token prompts now use."""
    name, vectors = read_embedding(path, token)
    try:
        add_embedding(encoder, name, vectors)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    return name
