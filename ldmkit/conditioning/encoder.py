"""The text-encoder interface: prompts -> tokens -> Conditioning (per-token context and its mask).

Every encoder reads at most `max_length` tokens (start and end tokens included); longer prompts are cut, keeping
the end token, with one `PromptTruncatedWarning` per call. Frozen encoders always run in eval mode without
gradients, so they are deterministic. Nothing is downloaded: pretrained files come from installed packages.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError, MissingDependencyError
from .types import Conditioning


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the encoder's window and its tail was dropped."""


def _shorten(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


class TextEncoder(nn.Module):
    """Prompts -> Conditioning. Subclasses give `token_lists` (tokenizer) and `forward` (ids -> features)."""

    name = ""
    trainable = False  # frozen encoders stay in eval mode and never build a graph
    mask_padding = True  # False: report every position as real (models trained attending to padding, e.g. SD)

    def __init__(self, dim: int, max_length: int, pad_id: int, options: dict):
        """dim: width D of the per-token context; max_length: tokens T
        read per prompt, start and end tokens included; pad_id: token id filling rows past a prompt's end;
        options: the constructor arguments as plain values (`build_text_encoder(name, **options)` rebuilds it)."""
        super().__init__()
        self.dim, self.max_length, self.pad_id = dim, max_length, pad_id
        self.options = dict(options)
        self.added_tokens: dict[str, list[int]] = {}  # textual inversion: a new token -> the ids it stands for

    def embedding_site(self) -> tuple[nn.Module, str]:
        """(module, attribute) of the token embedding table, where textual inversion adds rows (adapters/
        embeddings.py); InputError for an encoder that cannot learn new tokens, saying why."""
        raise InputError(f"the {self.name!r} text encoder has no token table to extend; use clip or trainable")

    def in_vocabulary(self, token: str) -> bool:
        """Whether `token` is already one token of the vocabulary (textual inversion refuses it)."""
        return token in self.added_tokens

    def _token_lists(self, prompts: list[str]) -> list[list[int]]:
        """token_lists, with each added token (textual inversion) cut out of the text first and replaced by its
        ids; the text around it is tokenized as it stands."""
        if not self.added_tokens:
            return self.token_lists(prompts)
        start, *_, end = self.token_lists([""])[0]
        pattern = re.compile("|".join(re.escape(t) for t in sorted(self.added_tokens, key=len, reverse=True)))
        out = []
        for prompt in prompts:
            ids, pos = [], 0
            for m in pattern.finditer(prompt):
                ids += self.token_lists([prompt[pos : m.start()]])[0][1:-1] + self.added_tokens[m.group(0)]
                pos = m.end()
            out.append([start, *ids, *self.token_lists([prompt[pos:]])[0][1:-1], end])
        return out

    def token_lists(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt with its start and end tokens, not truncated."""
        raise NotImplementedError

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids (B, T) int64, mask (B, T) bool -> context (B, T, D)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def train(self, mode: bool = True):
        """Frozen encoders ignore train(): dropout inside them would make embeddings random."""
        return super().train(mode and self.trainable)

    def tokenize(self, prompts: list[str], trim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, T) int64 and mask (B, T) bool; prompts over T tokens keep their first T-1 and the end token.
        trim: T is the longest prompt's length instead of max_length, where the encoder masks its padding (a padded
        position then changes no real one)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("encode() takes a list of prompt strings, e.g. encode([prompt]); use '' for no prompt")
        if not prompts:
            raise InputError("encode() got no prompts; pass at least one (use '' for the unconditional prompt)")
        T = self.max_length
        ids = torch.full((len(prompts), T), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(prompts), T, dtype=torch.bool)  # (B, T)
        cut = []
        for row, toks in enumerate(self._token_lists(list(prompts))):
            if len(toks) > T:
                cut.append(f"{len(toks) - T} tokens from prompt {row} ({_shorten(prompts[row])!r})")
                toks = toks[: T - 1] + toks[-1:]
            ids[row, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[row, : len(toks)] = True
        if cut:
            warnings.warn(
                f"text encoder {self.name!r} reads at most {T} tokens per prompt; cut {', '.join(cut)}. "
                "Shorten these prompts to keep their ends.",
                PromptTruncatedWarning,
                stacklevel=3,
            )
        if trim and self.mask_padding:
            n = int(mask.sum(1).max())
            ids, mask = ids[:, :n], mask[:, :n]
        return ids, mask

    def encode(self, prompts: list[str], trim: bool = False) -> Conditioning:
        """Conditioning with context (B, T, D) and context_mask (B, T) on the encoder's device. trim: see tokenize
        (the embedding cache's batches: emoji's 3,789 captions took 74 s padded to 77 tokens on one thread)."""
        ids, mask = self.tokenize(prompts, trim)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            if torch.is_grad_enabled() or any(m._forward_hooks for m in self.modules()):
                context = self(ids, mask)  # hooks (a LoRA applied per row) may treat equal prompts differently
            else:  # each distinct prompt once (`generate "red apple" --n 16` encodes one), then put back in its rows
                row_of = {}
                which = torch.tensor([row_of.setdefault(p, i) for i, p in enumerate(prompts)], device=ids.device)
                first = torch.tensor(list(row_of.values()), device=ids.device)
                slot = torch.searchsorted(first, which)  # row i's place among the distinct prompts' rows
                context = self(ids[first], mask[first])[slot]
        return Conditioning(context=context, context_mask=mask if self.mask_padding else torch.ones_like(mask))


def package_dir(module: str, install: str) -> Path:
    """Folder of an installed package found without importing it (importing may pull heavy dependencies)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"package {module!r} is not installed; install it with `{install}`")
    return Path(spec.submodule_search_locations[0])


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError(
            "the 'minilm' and 'clip' text encoders need transformers; install it with `pip install transformers`"
        ) from None
    return transformers
