"""The CLIP text tokenizer: byte-level byte-pair encoding over a 49,408-token vocabulary (Radford et al. 2021).

CLIP's text encoder reads lower-cased text split into words, each word spelled in UTF-8 bytes and then merged
bottom-up by byte-pair encoding (Sennrich et al. 2016): starting from single byte symbols, the adjacent pair with
the best (lowest) merge rank is joined everywhere in the word until no ranked pair is left. The last symbol of a
word carries a `</w>` end-of-word marker, so "a" inside a word and "a" as a word are different tokens.

The merge list is the one OpenAI published with CLIP; it ships inside the PyPI package `open-clip-torch`
(`open_clip/bpe_simple_vocab_16e6.txt.gz`). We only read that data file: `open_clip` itself is never imported
(its package imports torchvision). Install it with `pip install --no-deps open-clip-torch`.

Token ids: 0..255 the byte symbols (in code point order), 256..511 the same with `</w>`, 512.. one per merge in
rank order, then <start_of_text> = 49406 and <end_of_text> = 49407. A prompt becomes [start, tokens..., end];
when longer than the context it is cut to the context length with the end token kept last. As in open_clip, the
literal text "<start_of_text>" / "<end_of_text>" inside a prompt is read as the special token.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
from pathlib import Path

import torch

from ..errors import InputError, MissingDependencyError, MissingFileError

NUM_MERGES = 49152 - 256 - 2  # the merges CLIP uses: a 49,152-symbol BPE vocabulary less bytes and specials
START, END = "<start_of_text>", "<end_of_text>"
PAD_WITH = ("zero", "eot")  # pad with id 0 (open_clip, SD 2.x) or with the end token (SD 1.x / transformers)


def find_bpe_vocab() -> Path:
    """The CLIP merges file inside the installed open-clip-torch package, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    path = None if spec is None else Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if path is None or not path.is_file():
        raise MissingFileError(
            "the CLIP BPE vocabulary was not found; install it with "
            "`pip install --no-deps open-clip-torch` (only its vocabulary file is used)"
        )
    return path


def byte_symbols() -> list[str]:
    """One printable character per byte value, so that BPE works on strings without whitespace or control codes.

    Bytes that are visible Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the 68 others
    (controls, space, soft hyphen, ...) take the characters chr(256), chr(257), ... in increasing byte order.
    """
    visible = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    symbols, extra = {}, 0
    for b in range(256):
        if b in visible:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _import_text_libs():
    try:
        import ftfy
        import regex
    except ImportError as e:
        raise MissingDependencyError(
            f"the CLIP tokenizer needs `ftfy` and `regex` ({e.name} is missing); "
            "install them with `pip install ftfy regex`"
        ) from None
    return ftfy, regex


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer, token for token the same as OpenAI's and open_clip's."""

    def __init__(self, vocab_path: str | Path | None = None, context_length: int = 77, pad_with: str = "zero"):
        """vocab_path: the gzipped merges file (default: the one inside open-clip-torch); context_length: tokens per
        prompt including the start and end tokens (77 for every released CLIP); pad_with: "zero" pads with id 0
        (open_clip, Stable Diffusion 2.x), "eot" with the end-of-text id (Stable Diffusion 1.x, transformers)."""
        if pad_with not in PAD_WITH:
            raise InputError(f"pad_with={pad_with!r} is not known; use 'zero' (open_clip, SD 2.x) or 'eot' (SD 1.x)")
        if context_length < 2:
            raise InputError(f"context_length={context_length} leaves no room for the start and end tokens; use >= 2")
        self._ftfy, regex = _import_text_libs()
        lines = gzip.open(vocab_path or find_bpe_vocab()).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES]]  # line 0 is a version header
        self.bytes = byte_symbols()
        base = sorted(self.bytes)  # in code point order: the visible bytes first, then chr(256), chr(257), ...
        vocab = base + [s + "</w>" for s in base] + ["".join(m) for m in merges] + [START, END]
        self.ids = {tok: i for i, tok in enumerate(vocab)}
        self.tokens = vocab
        self.ranks = {m: r for r, m in enumerate(merges)}
        self.start_id, self.end_id = self.ids[START], self.ids[END]
        self.pad_id = 0 if pad_with == "zero" else self.end_id
        self.context_length, self.pad_with = context_length, pad_with
        # Words: the two special names, English contractions, runs of letters, single digits, runs of anything
        # else that is not whitespace (punctuation, symbols, emoji, combining marks).
        self.word_re = regex.compile(
            rf"{START}|{END}|'(?:s|t|re|ve|m|ll|d)|\p{{L}}+|\p{{N}}|[^\s\p{{L}}\p{{N}}]+", regex.IGNORECASE
        )
        self._cache: dict[str, list[str]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def clean(self, text: str) -> str:
        """Repair mojibake and odd unicode (ftfy), undo HTML escaping twice, collapse whitespace, lower-case."""
        text = html.unescape(html.unescape(self._ftfy.fix_text(text)))
        return " ".join(text.split()).lower()

    def bpe(self, word: str) -> list[str]:
        """Byte-pair encoding of one word given as byte symbols: merge the best-ranked adjacent pair until none."""
        if word in (START, END):
            return [word]
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            ranked = [(self.ranks[p], p) for p in zip(parts, parts[1:]) if p in self.ranks]
            if not ranked:
                break
            first, second = min(ranked)[1]
            merged, i = [], 0
            while i < len(parts):  # join every occurrence of the pair, left to right, without overlaps
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        if len(self._cache) > 100_000:  # bound the memory of a long-running server
            self._cache.clear()
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, without the start and end tokens."""
        out: list[int] = []
        for word in self.word_re.findall(self.clean(text)):
            spelled = word if word in (START, END) else "".join(self.bytes[b] for b in word.encode("utf-8"))
            out.extend(self.ids[t] for t in self.bpe(spelled))
        return out

    def decode(self, ids: list[int]) -> str:
        """Text of unpadded token ids (start and end tokens dropped); a word ends at each `</w>` marker."""
        inverse = {s: b for b, s in enumerate(self.bytes)}
        text = "".join(self.tokens[i] for i in ids if i not in (self.start_id, self.end_id))
        data = bytearray()
        for piece in text.split("</w>"):
            data.extend(inverse[c] for c in piece)
            data.extend(b" ")
        return data.decode("utf-8", errors="replace").strip()

    def token_lists(self, prompts: list[str]) -> list[list[int]]:
        """[start, tokens..., end] for each prompt, not truncated."""
        return [[self.start_id, *self.encode(p), self.end_id] for p in prompts]

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """Token ids (B, context_length) int64: truncated keeping the end token last, then padded."""
        out = torch.full((len(prompts), self.context_length), self.pad_id, dtype=torch.long)
        for row, ids in enumerate(self.token_lists(prompts)):
            if len(ids) > self.context_length:
                ids = ids[: self.context_length - 1] + [self.end_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out
