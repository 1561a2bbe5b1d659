"""LoRAs at sampling time: `--lora FILE[:SCALE]`, repeatable, negative scales allowed, with `--lora-merge`.

Every LoRA is checked before sampling (a safetensors file, a finite scale, not given twice, made for the model's
backbone), then hooked into the backbone unmerged (nn/lora.py: the samplers and guidance see an ordinary model) or,
with --lora-merge, merged into its weights (fastest; `unmerge()` restores them bit for bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..adapters import load_lora
from ..checkpoint import file_sha256
from ..errors import InputError
from ..ldm import LatentDiffusion
from ..nn.lora import Attached, Merged, attach


@dataclass(frozen=True)
class LoRASpec:
    """One --lora: the file and its scale."""

    path: str
    scale: float = 1.0


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


def apply_loras(ldm: LatentDiffusion, specs: list[LoRASpec], merged: bool = False) -> list[Attached] | Merged:
    """Hook each LoRA into `ldm`'s backbone at its scale (or merge them all with merged=True); every file is read
    and matched first, so a bad one leaves the model untouched."""
    check_loras(specs)
    unet = ldm.unet
    device = next(unet.parameters()).device
    sets = [(load_lora(s.path, unet).to(device), s.scale) for s in specs]
    if merged:
        m = Merged(unet)
        for lora, scale in sets:
            m.merge(lora, scale)
        return m
    return [attach(unet, lora, scale) for lora, scale in sets]


def lora_record(specs: list[LoRASpec], merged: bool = False) -> list[dict]:
    """What the images' parameters record of each LoRA: its file name, SHA-256, scale, and how it was applied."""
    return [
        {"file": Path(s.path).name, "sha256": file_sha256(s.path), "scale": s.scale, "merged": merged} for s in specs
    ]
