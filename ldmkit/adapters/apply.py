"""LoRA files <-> a `LoRASet` on an ldmkit backbone: the file's layer names mapped to our module paths.

A U-Net's layers are named in files as in diffusers (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`),
kohya's older files as in the ldm code (`input_blocks.1.1.transformer_blocks.0.attn1.to_q`); interop/keymaps.py
holds both maps. Another backbone (DiT) has no foreign layout: its files name our own module paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import UNetConfig
from ..errors import InputError
from ..interop.keymaps import translate, unet_rules
from ..nn.lora import LoRA, LoRASet, lora_shape
from .files import Factors, LoRAFile

TARGETS = ("attn", "attn+ff", "all")  # what `ldmkit train --lora-targets` adapts
_ATTN = ("to_q", "to_k", "to_v", "to_out")


def targetable(net: nn.Module) -> dict[str, nn.Module]:
    """Every layer of `net` a LoRA can adapt (linear layers, 1x1 convolutions), by module path."""
    out = {}
    for path, m in net.named_modules():
        try:
            lora_shape(m)
        except InputError:
            continue
        out[path] = m
    return out


def target_paths(net: nn.Module, targets: str) -> list[str]:
    """The module paths `targets` names: "attn" the attention projections of the transformer blocks, "attn+ff"
    also their feed-forward layers, "all" every linear layer and 1x1 convolution."""
    if targets not in TARGETS:
        raise InputError(f"unknown LoRA targets {targets!r}; use one of {', '.join(TARGETS)}")
    paths = list(targetable(net))
    if targets == "all":
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
    text: list[str] = field(default_factory=list)  # text-encoder layers (not applied by this version)


def match(file: LoRAFile, net: nn.Module) -> Matched:
    """The layers of `file` that fit `net` (name and shape) as a LoRASet, and those that do not."""
    table: dict[str, str] = {}  # file name -> our path
    for layout in ("ldm", "diffusers"):  # diffusers names win where both spell a layer the same
        if layout == "ldm" and (file.layout != "kohya" or not isinstance(getattr(net, "cfg", None), UNetConfig)):
            continue
        for ours, theirs in foreign_names(net, layout).items():
            table[theirs.replace(".", "_") if file.layout == "kohya" else theirs] = ours
    mods = targetable(net)
    layers, out = {}, Matched(LoRASet({}))
    for name, f in file.parts.get("unet", {}).items():
        path = table.get(name)
        if path is None or lora_shape(mods[path]) != (f.down.shape[1], f.up.shape[0]) or f.up.shape[1] != f.rank:
            out.unmatched.append(f"{'lora_unet_' if file.layout == 'kohya' else 'unet.'}{name}")
            continue
        layer = LoRA(f.down.shape[1], f.up.shape[0], f.rank, f.alpha)
        with torch.no_grad():
            layer.down.copy_(f.down.float())
            layer.up.copy_(f.up.float())
        layers[path] = layer
        out.matched.append(name)
    out.lora = LoRASet(layers)
    out.text = sorted(file.parts.get("text", {}))
    return out


def to_file(lora: LoRASet, net: nn.Module, layout: str, about: dict | None = None) -> tuple[LoRAFile, set[str]]:
    """(the file of `lora`, adapting `net`, in `layout` "peft" or "kohya"; the names of its 1x1-convolution layers)."""
    names, mods = foreign_names(net), dict(net.named_modules())
    out, convs = LoRAFile(layout, {"unet": {}}, dict(about or {})), set()
    for path, layer in lora.items():
        name = names[path].replace(".", "_") if layout == "kohya" else names[path]
        out.parts["unet"][name] = Factors(layer.down.detach(), layer.up.detach(), layer.alpha)
        if isinstance(mods[path], nn.Conv2d):
            convs.add(name)
    return out, convs


def check_fits(m: Matched, source: str) -> None:
    """InputError unless every U-Net layer of the file found its layer in the model."""
    if m.unmatched:
        n = len(m.matched) + len(m.unmatched)
        raise InputError(
            f"{source}: the LoRA does not fit this model: {len(m.matched)} of its {n} U-Net layers match, first "
            f"unmatched {m.unmatched[0]}; use a LoRA made for this model's architecture (`ldmkit lora inspect "
            f"{source} --model MODEL` lists them)"
        )
