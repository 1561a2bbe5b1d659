"""Adapters on a trained model: LoRA files read, matched to a backbone, applied unmerged or merged, written."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..nn.lora import LoRASet
from .apply import Matched, check_fits, match, target_paths, to_file
from .files import LAYOUTS, LoRAFile, read_lora, write_lora

__all__ = ["LAYOUTS", "LoRAFile", "Matched", "load_lora", "match", "read_lora", "save_lora", "target_paths"]


def load_lora(path: str | Path, net: nn.Module) -> LoRASet:
    """The LoRA in `path` (kohya or PEFT layout) as a set on backbone `net`; InputError, naming how many layers
    match and the first that does not, for a LoRA made for another architecture."""
    m = match(read_lora(path), net)
    check_fits(m, str(path))
    return m.lora


def save_lora(path: str | Path, lora: LoRASet, net: nn.Module, layout: str = "peft", about: dict | None = None) -> Path:
    """Write `lora` (a set on backbone `net`) in `layout`: "peft" (diffusers' load_lora_weights) or "kohya"."""
    file, convs = to_file(lora, net, layout, about)
    return write_lora(path, file, convs)


def describe(path: str | Path, net: nn.Module | None = None) -> dict:
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
        m = match(f, net)
        out |= {"matched": len(m.matched), "unmatched": m.unmatched, "fits": not m.unmatched}
        out["text_encoder_layers_not_applied"] = len(m.text)
    return out
