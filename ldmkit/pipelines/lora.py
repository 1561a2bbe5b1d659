"""LoRAs at sampling time: `--lora FILE[:SCALE]`, repeatable, negative scales allowed, with `--lora-merge`; and the
LoRAs of a request (SampleRequest.loras), applied per image so that requests with different LoRAs share a batch.

Every LoRA is checked before sampling (a safetensors file, a finite scale, not given twice, made for the model's
backbone), then hooked into the backbone unmerged (nn/lora.py: the samplers and guidance see an ordinary model) or,
with --lora-merge, merged into its weights (fastest; `unmerge()` restores them bit for bit).

Per image: `per_sample_loras` hooks in every LoRA a batch's images use, in one order (by SHA-256), each with a scale
per image that is 0 for the images that do not use it. An image's numbers then are those it gets alone: a LoRA it
does not use adds an exact zero, and the batch-invariant kernels (nn/invariant.py) compute each image's share of
the others alone.
"""

from __future__ import annotations

import collections
import fnmatch
import math
import threading
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from ..adapters import load_lora_parts
from ..adapters.embeddings import load_embedding, read_embedding
from ..checkpoint import file_sha256
from ..errors import InputError
from ..ldm import LatentDiffusion
from ..nn.lora import Attached, LoRASet, Merged, attach, scales
from .request import LoRASpec


def parse_lora(text: str) -> LoRASpec:
    """'FILE[:SCALE]' -> LoRASpec; InputError for an empty, non-numeric or non-finite scale."""
    path, sep, scale = text.rpartition(":")
    if not sep or Path(text).is_file():  # no scale (or a ':' inside an existing file's path)
        return LoRASpec(text)
    if not scale.strip():
        raise InputError(f"--lora {text}: the scale after ':' is empty; write FILE:SCALE (e.g. {path}:0.8)")
    try:
        value = float(scale)
    except ValueError:
        fix = f"write FILE:SCALE (e.g. {path}:0.8)"
        raise InputError(f"--lora {text}: scale {scale!r} is not a number; {fix}") from None
    if not math.isfinite(value):
        raise InputError(f"--lora {text}: scale {scale} is not finite; give a number such as 0.8 or -0.5")
    return LoRASpec(path, value)


def check_loras(specs: list[LoRASpec]) -> None:
    """InputError for the same file given twice."""
    seen: set[Path] = set()
    for s in specs:
        p = Path(s.path).resolve()
        if p in seen:
            raise InputError(f"--lora {s.path} is given twice; give each LoRA once (scales add: sum them)")
        seen.add(p)


def apply_loras(ldm: LatentDiffusion, specs: list[LoRASpec], merged: bool = False) -> list[Attached] | list[Merged]:
    """Hook each LoRA into `ldm`'s backbone, and its text-encoder layers into the text encoder, at its scale (or
    merge them all with merged=True: one Merged per network); every file is read and matched first, so a bad one
    leaves the model untouched."""
    check_loras(specs)
    sets = [(loaded(ldm, s), s.scale) for s in specs]
    if merged:
        out = {}
        for got, scale in sets:
            for net, lora in _parts(ldm, got):
                out.setdefault(id(net), Merged(net)).merge(lora, scale)
        return list(out.values())
    return [attach(net, lora, scale) for got, scale in sets for net, lora in _parts(ldm, got)]


def lora_record(specs: Sequence[LoRASpec], merged: bool = False, request: Sequence[LoRASpec] = ()) -> list[dict]:
    """What the images' parameters record of each LoRA: its file name, SHA-256, scale, and how it was applied.
    request: the request's own LoRAs (req.loras), which plan.draw hooks unmerged beside `specs`: listed after them,
    so the record names every LoRA the images got."""
    return [
        {"file": Path(s.path).name, "sha256": s.sha256 or file_sha256(s.path), "scale": s.scale, "merged": m}
        for group, m in ((specs, merged), (request, False))
        for s in group
    ]


# --- textual-inversion embeddings: `--embedding FILE[:TOKEN]` -----------------------------------------------------


def parse_embedding(text: str) -> tuple[str, str | None]:
    """'FILE[:TOKEN]' -> (file, the token prompts use instead of the file's, or None)."""
    path, sep, token = text.rpartition(":")
    if not sep or Path(text).is_file() or not path.lower().endswith(".safetensors"):
        return text, None
    if not token.strip():
        raise InputError(f"--embedding {text}: the token after ':' is empty; write FILE:TOKEN (e.g. {path}:<sks>)")
    return path, token


def apply_embeddings(ldm: LatentDiffusion, specs: Sequence[tuple[str, str | None]]) -> list[str]:
    """Load each embedding into `ldm`'s text encoder; the tokens prompts may now use. InputError for a model
    without a text encoder, or one that cannot take new tokens (MiniLM)."""
    if specs and ldm.text_encoder is None:
        raise InputError("--embedding adds a word to a text encoder, and this model has none; drop --embedding")
    return [load_embedding(ldm.text_encoder, path, token) for path, token in specs]


def embedding_record(specs: Sequence[tuple[str, str | None]]) -> list[dict]:
    """What the images' parameters record of each embedding: its file name, SHA-256 and token."""
    return [{"file": Path(p).name, "sha256": file_sha256(p), "token": read_embedding(p, t)[0]} for p, t in specs]


# --- the LoRAs of a request, per image ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    """A LoRA file read and matched to one model: its set on the backbone and its set on the text encoder (None:
    the file has no text-encoder layers), each on its network's device, and the file's SHA-256."""

    lora: LoRASet
    sha256: str
    text: LoRASet | None = None


def _parts(ldm: LatentDiffusion, got: Loaded) -> list[tuple[nn.Module, LoRASet]]:
    """(network, set) of each network the LoRA adapts: the backbone, and the text encoder when it has layers there."""
    return [(ldm.unet, got.lora)] + ([(ldm.text_encoder, got.text)] if got.text is not None else [])


# backbone -> {(path, size, mtime): Loaded}, newest last; forgotten with the backbone
_CACHE: weakref.WeakKeyDictionary[nn.Module, collections.OrderedDict] = weakref.WeakKeyDictionary()
_CACHE_SIZE = 32  # LoRAs kept read per backbone (a few MB each)
_LOCK = threading.Lock()


def loaded(ldm: LatentDiffusion, spec: LoRASpec) -> Loaded:
    """The LoRA of `spec` on `ldm`'s backbone, read once and kept (a file changed on disk is read again); InputError
    for a file that is missing, unreadable or made for another architecture."""
    if not spec.path:
        raise InputError(f"LoRA {spec.name!r} names no file; a server finds it in its LoRA folder (LoRAFolder.resolve)")
    path = Path(spec.path)
    try:
        st = path.stat()
    except OSError:
        raise InputError(f"LoRA file {path} does not exist; give the path of a .safetensors LoRA") from None
    unet, key = ldm.unet, (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _LOCK:
        cache = _CACHE.setdefault(unet, collections.OrderedDict())
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit
    lora, text = load_lora_parts(path, unet, ldm.text_encoder)
    if text is not None:
        text = text.to(next(ldm.text_encoder.parameters()).device).requires_grad_(False)
    out = Loaded(lora.to(next(unet.parameters()).device).requires_grad_(False), file_sha256(path), text)
    with _LOCK:
        cache[key] = out
        while len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    return out


@contextmanager
def per_sample_loras(ldm: LatentDiffusion, per_image: Sequence[Sequence[LoRASpec]]) -> Iterator[None]:
    """Within the block, image i of a batch (of len(per_image) images, or k times that under guidance) gets the
    LoRAs per_image[i] at their scales, and no other: every LoRA any image uses is hooked into the backbone once,
    with a scale per image (0 where the image does not use it). Nothing is hooked when no image has a LoRA."""
    if not any(per_image):
        yield
        return
    sets: dict[str, Loaded] = {}  # sha256 -> loaded; one order whatever the batch: by SHA-256
    use: list[dict[str, float]] = []
    for specs in per_image:
        mine = {}
        for spec in specs:
            got = loaded(ldm, spec)
            sets[got.sha256] = got
            mine[got.sha256] = mine.get(got.sha256, 0.0) + spec.scale
        use.append(mine)
    with ExitStack() as stack:
        per_set = {}
        for sha in sorted(sets):
            for net, lora in _parts(ldm, sets[sha]):
                stack.callback(attach(net, lora, 0.0).remove)
                per_set[lora] = torch.tensor([u.get(sha, 0.0) for u in use])
        with scales(per_set):
            yield


@contextmanager
def request_loras(ldm: LatentDiffusion, specs: Sequence[LoRASpec]) -> Iterator[None]:
    """Within the block, every image `ldm` draws gets the LoRAs `specs` at their scales (one request's: plan.draw
    and request_batches hook req.loras so, for every pipeline); hooked in the order per_sample_loras uses, so the
    numbers are those of a batch."""
    if not specs:
        yield
        return
    with ExitStack() as stack:
        for got, scale in sorted(((loaded(ldm, s), s.scale) for s in specs), key=lambda x: x[0].sha256):
            for net, lora in _parts(ldm, got):
                stack.callback(attach(net, lora, scale).remove)
        yield


class LoRAFolder:
    """The LoRAs a server may apply: the .safetensors files under one folder, named by their path inside it without
    the suffix ("toy", "styles/ink"). A name that leaves the folder, or names no file of it, is refused."""

    SUFFIX = ".safetensors"

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise InputError(f"LoRA folder {self.root} does not exist; create it or set serve.loras to a folder")
        self.root = self.root.resolve()

    def names(self) -> list[str]:
        """Every LoRA of the folder, by name, sorted."""
        return sorted(
            p.relative_to(self.root).as_posix()[: -len(self.SUFFIX)]
            for p in self.root.rglob(f"*{self.SUFFIX}")
            if p.is_file() and p.resolve().is_relative_to(self.root)
        )

    def path(self, name: str) -> Path:
        """The file of LoRA `name`; InputError naming it when it leaves the folder or is not there."""
        shown = repr(name[:80])
        rel = name.replace("\\", "/")
        rel = rel if rel.endswith(self.SUFFIX) else rel + self.SUFFIX
        parts = Path(rel).parts
        if not name or Path(rel).is_absolute() or ".." in parts or ":" in parts[0]:
            raise InputError(f"LoRA {shown} leaves the LoRA folder; name a LoRA inside it (GET /sdapi/v1/loras)")
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root):  # a link out of the folder
            raise InputError(f"LoRA {shown} leaves the LoRA folder; name a LoRA inside it (GET /sdapi/v1/loras)")
        if not path.is_file():
            raise InputError(f"LoRA {shown} is not in this server's LoRA folder; GET /sdapi/v1/loras lists them")
        return path

    def resolve(self, ldm: LatentDiffusion, specs: Sequence[LoRASpec]) -> tuple[LoRASpec, ...]:
        """The request's LoRAs with their files and SHA-256, each read and matched to `ldm` now (InputError naming
        the LoRA otherwise), so the batch that runs them finds them ready."""
        out = []
        for spec in specs:
            path = str(self.path(spec.name))
            try:
                got = loaded(ldm, replace(spec, path=path))
            except InputError as err:  # said with the LoRA's name: the client knows no server path
                raise InputError(str(err).replace(path, repr(spec.name[:80]))) from None
            out.append(replace(spec, path=path, sha256=got.sha256))
        return tuple(out)


def allowed(patterns: Sequence[str], name: str) -> bool:
    """Whether LoRA `name` matches one of `patterns` (shell patterns: "styles/*")."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
