"""LoRA files <-> a `LoRASet` on an ldmkit backbone or text encoder: the file's layer names mapped to our paths.

A U-Net's layers are named in files as in diffusers (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`),
kohya's older files as in the ldm code (`input_blocks.1.1.transformer_blocks.0.attn1.to_q`); interop/keymaps.py
holds both maps. Another backbone (DiT) has no foreign layout: its files name our own module paths.
A CLIP text encoder's layers are named as in transformers' CLIPTextModel (`text_model.encoder.layers.0.self_attn.
q_proj`: kohya's `lora_te_text_model_encoder_layers_0_self_attn_q_proj`, PEFT's `text_encoder.text_model...`),
which our CLIP encoder holds under `model.`; the trainable encoder's files name our own module paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import LORA_TARGETS, UNetConfig
from ..errors import InputError
from ..interop.keymaps import translate, unet_rules
from ..nn.lora import LoRA, LoRASet, kernel, lora_shape, targetable
from .files import Factors, LoRAFile

TARGETS = LORA_TARGETS  # what `ldmkit train --lora-targets` adapts
_ATTN = ("to_q", "to_k", "to_v", "to_out")


def target_paths(net: nn.Module, targets: str) -> list[str]:
    """The module paths `targets` names: "attn" the attention projections of the transformer blocks, "attn+ff"
    also their feed-forward layers, "all" every linear layer and 1x1 convolution, "all+conv" also every other
    convolution (LoCon)."""
    if targets not in TARGETS:
        raise InputError(f"unknown LoRA targets {targets!r}; use one of {', '.join(TARGETS)}")
    paths = list(targetable(net, kernels=targets == "all+conv"))
    if targets in ("all", "all+conv"):
        return paths
    keep = _ATTN + (("proj", "ff_out") if targets == "attn+ff" else ())
    in_block = [p for p in paths if ".blocks." in f".{p}" and p.rsplit(".", 1)[-1] in keep]
    if targets == "attn+ff":
        in_block = [p for p in in_block if not p.endswith(".proj") or p.endswith("ff_in.proj")]
    if not in_block:
        raise InputError(f"the model has no {targets} layers to adapt; use --lora-targets all")
    return in_block


def foreign_names(net: nn.Module, layout: str = "diffusers") -> dict[str, str]:
    """our module path -> the name files use ("diffusers" or "ldm" module paths for a U-Net; our own otherwise)."""
    paths = list(targetable(net))
    cfg = getattr(net, "cfg", None)
    if not isinstance(cfg, UNetConfig):
        return {p: p for p in paths}
    theirs = translate({f"{p}.weight": torch.empty(0) for p in paths}, unet_rules(cfg, layout), what="U-Net")
    return {p: k[: -len(".weight")] for p, k in zip(paths, theirs)}


@dataclass
class Matched:
    """A file matched against a model: the set for its backbone, and the names that found no layer."""

    lora: LoRASet
    matched: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # keys of U-Net layers the model lacks (or of another shape)
    text: list[str] = field(default_factory=list)  # the file's text-encoder layers
    text_lora: LoRASet | None = None  # those of them that fit the text encoder given to `match` (None: none given)
    text_unmatched: list[str] = field(default_factory=list)  # text layers the given encoder lacks


def text_names(encoder: nn.Module, spelling: str = "text_model.") -> dict[str, str]:
    """our module path -> the name files use, for a text encoder's layers: transformers' CLIPTextModel paths for
    CLIP (`text_model.encoder.layers.0.self_attn.q_proj`; our encoder holds the model under `model.`, and
    transformers 5 drops its `text_model.`), with `spelling` in front; our own paths for the trainable encoder."""
    if getattr(encoder, "name", "") != "clip":
        return {p: p for p in targetable(encoder)}
    return {p: spelling + p.removeprefix("model.").removeprefix("text_model.") for p in targetable(encoder)}


def _table(names: dict[str, str], layout: str) -> dict[str, str]:
    """file name -> our path (kohya's names spell the path with _ for .)."""
    return {(theirs.replace(".", "_") if layout == "kohya" else theirs): ours for ours, theirs in names.items()}


def _fit(layers: dict[str, Factors], table: dict[str, str], net: nn.Module, prefix: str):
    """(the set of the layers that fit `net` by name and shape, their names, the keys of those that do not)."""
    mods, fits, matched, unmatched = targetable(net), {}, [], []
    for name, f in layers.items():
        path = table.get(name)
        if path is None or lora_shape(mods[path]) != (f.down.shape[1], f.up.shape[0]) or f.up.shape[1] != f.rank:
            unmatched.append(f"{prefix}{name}")
            continue
        layer = LoRA(f.down.shape[1], f.up.shape[0], f.rank, f.alpha, kernel(mods[path]))
        with torch.no_grad():
            layer.down.copy_(f.down.float())
            layer.up.copy_(f.up.float())
        fits[path] = layer
        matched.append(name)
    return LoRASet(fits), matched, unmatched


def match(file: LoRAFile, net: nn.Module, text_encoder: nn.Module | None = None) -> Matched:
    """The layers of `file` that fit `net` (name and shape) as a LoRASet, and those that do not; with a
    `text_encoder`, its text-encoder layers matched against it the same way."""
    table: dict[str, str] = {}  # file name -> our path
    for layout in ("ldm", "diffusers"):  # diffusers names win where both spell a layer the same
        if layout == "ldm" and (file.layout != "kohya" or not isinstance(getattr(net, "cfg", None), UNetConfig)):
            continue
        table |= _table(foreign_names(net, layout), file.layout)
    kohya = file.layout == "kohya"
    lora, matched, unmatched = _fit(file.parts.get("unet", {}), table, net, "lora_unet_" if kohya else "unet.")
    out = Matched(lora, matched, unmatched, sorted(file.parts.get("text", {})))
    if text_encoder is not None:
        table = _table(text_names(text_encoder, ""), file.layout) | _table(text_names(text_encoder), file.layout)
        text = file.parts.get("text", {})
        out.text_lora, _, out.text_unmatched = _fit(text, table, text_encoder, "lora_te_" if kohya else "text_encoder.")
    return out


def to_file(
    lora: LoRASet,
    net: nn.Module,
    layout: str,
    about: dict | None = None,
    text: tuple[LoRASet, nn.Module] | None = None,
) -> tuple[LoRAFile, dict[str, tuple[int, int]]]:
    """(the file of `lora`, adapting `net`, in `layout` "peft" or "kohya"; its convolution layers' kernels by name).
    text: (a set, the text encoder it adapts), written as the file's text-encoder layers."""
    out, convs = LoRAFile(layout, {}, dict(about or {})), {}
    for part, (s, module, names) in {
        "unet": (lora, net, foreign_names(net)),
        "text": (text[0], text[1], text_names(text[1])) if text else (LoRASet({}), net, {}),
    }.items():
        mods = dict(module.named_modules())
        for path, layer in s.items():
            name = names[path].replace(".", "_") if layout == "kohya" else names[path]
            out.parts.setdefault(part, {})[name] = Factors(layer.down.detach(), layer.up.detach(), layer.alpha)
            if isinstance(mods[path], nn.Conv2d):
                convs[name] = kernel(mods[path])
    out.parts.setdefault("unet", {})
    return out, convs


def check_fits(m: Matched, source: str) -> None:
    """InputError unless every U-Net layer of the file found its layer in the model, and, when the file was matched
    against a text encoder, every text-encoder layer found its layer there."""
    if m.text_unmatched:
        n = len(m.text)
        raise InputError(
            f"{source}: the LoRA's text-encoder layers do not fit this model's text encoder: "
            f"{n - len(m.text_unmatched)} of its {n} match, first unmatched {m.text_unmatched[0]}; use a LoRA made "
            f"for this model (`ldmkit lora inspect {source} --model MODEL` lists them)"
        )
    if m.unmatched:
        n = len(m.matched) + len(m.unmatched)
        raise InputError(
            f"{source}: the LoRA does not fit this model: {len(m.matched)} of its {n} U-Net layers match, first "
            f"unmatched {m.unmatched[0]}; use a LoRA made for this model's architecture (`ldmkit lora inspect "
            f"{source} --model MODEL` lists them)"
        )
