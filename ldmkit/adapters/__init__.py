"""Adapters on a trained model: LoRA files read, matched to a backbone, applied unmerged or merged, written."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import InputError
from ..nn.lora import LoRASet
from .apply import Matched, check_fits, match, target_paths, text_names, to_file
from .files import LAYOUTS, LoRAFile, read_lora, write_lora

__all__ = [
    "LAYOUTS",
    "LoRAFile",
    "Matched",
    "load_lora",
    "load_lora_parts",
    "match",
    "read_lora",
    "save_lora",
    "target_paths",
    "text_names",
]


def load_lora(path: str | Path, net: nn.Module) -> LoRASet:
    """The LoRA in `path` (kohya or PEFT layout) as a set on backbone `net`; InputError, naming how many layers
    match and the first that does not, for a LoRA made for another architecture."""
    m = match(read_lora(path), net)
    check_fits(m, str(path))
    return m.lora


def load_lora_parts(path: str | Path, net: nn.Module, text_encoder: nn.Module | None) -> tuple[LoRASet, LoRASet | None]:
    """(the LoRA's set on backbone `net`, its set on `text_encoder`, or None when the file has no text-encoder
    layers); InputError as load_lora's, or when the file's text-encoder layers do not fit `text_encoder` (a model
    without one, e.g. a class model, takes no LoRA that has them)."""
    f = read_lora(path)
    if f.parts.get("text") and text_encoder is None:
        raise InputError(
            f"{path}: the LoRA adapts a text encoder ({len(f.parts['text'])} layers, first "
            f"{sorted(f.parts['text'])[0]}) and this model has none; use a LoRA made for this model"
        )
    m = match(f, net, text_encoder if f.parts.get("text") else None)
    check_fits(m, str(path))
    return m.lora, m.text_lora


def save_lora(
    path: str | Path,
    lora: LoRASet,
    net: nn.Module,
    layout: str = "peft",
    about: dict | None = None,
    text: tuple[LoRASet, nn.Module] | None = None,
) -> Path:
    """Write `lora` (a set on backbone `net`) in `layout`: "peft" (diffusers' load_lora_weights) or "kohya";
    text: (a set, the text encoder it adapts), written as `lora_te_` / `text_encoder.` layers."""
    file, convs = to_file(lora, net, layout, about, text)
    return write_lora(path, file, convs)


def describe(path: str | Path, net: nn.Module | None = None, text_encoder: nn.Module | None = None) -> dict:
    """What `ldmkit lora inspect` shows: the layout, ranks, alphas, what ldmkit recorded of its base model, and,
    given a backbone, which of its U-Net layers match that model and which do not."""
    f = read_lora(path)
    layers = f.layers()
    out = {
        "file": str(path),
        "layout": f.layout,
        "layers": {part: len(v) for part, v in f.parts.items()},
        "ranks": sorted({x.rank for _, _, x in layers}),
        "alphas": sorted({x.alpha for _, _, x in layers}),
        "base": {k: f.about[k] for k in ("base", "base_sha256", "targets", "step") if k in f.about},
    }
    if net is not None:
        m = match(f, net, text_encoder)
        out |= {"matched": len(m.matched), "unmatched": m.unmatched, "fits": not m.unmatched}
        if text_encoder is not None:
            out |= {"text_matched": len(m.text) - len(m.text_unmatched), "text_unmatched": m.text_unmatched}
            out["fits"] = out["fits"] and not m.text_unmatched
        elif m.text:
            out["text_layers_not_checked"] = len(m.text)  # no text encoder given to match them against
    return out
