"""LoRA files in the two layouts the ecosystem writes, read into and written from one neutral form.

Layouts (the module paths are those of the diffusers `UNet2DConditionModel` and transformers `CLIPTextModel`):
- "kohya" (kohya's sd-scripts, AUTOMATIC1111, ComfyUI): `lora_unet_<path with _ for .>.lora_down.weight`,
  `.lora_up.weight` and a scalar `.alpha`; text encoder layers under `lora_te_` (`lora_te1_` / `lora_te2_`).
  The underscores make the path ambiguous, so it stays as written until it is matched against a model
  (adapters/apply.py). Older files name the U-Net's layers as the original ldm code did (`input_blocks_1_1_...`).
- "peft" (diffusers `save_lora_weights`, PEFT): `unet.<path>.lora_A.weight` / `.lora_B.weight` (or
  `text_encoder.`); no alpha per layer: alpha is the rank unless the file's `lora_adapter_metadata` says
  otherwise, so ldmkit writes (alpha / r) folded into B.
A convolution's factors are 4-D in both layouts: down (r, in, k, k), a convolution with the layer's kernel (LoCon
for k > 1), up (out, r, 1, 1); here they are kept 2-D, down flattened to (r, in * k * k), and matched to a layer
by that shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..checkpoint import atomic_write
from ..errors import InputError

LAYOUTS = ("peft", "kohya")
PARTS = ("unet", "text")  # the denoiser and the text encoder
KOHYA_PREFIX = {"lora_unet_": "unet", "lora_te_": "text", "lora_te1_": "text", "lora_te2_": "text"}
PEFT_PREFIX = {"unet.": "unet", "text_encoder.": "text"}
# the factors of LyCORIS's other adapters (LoHa, LoKr) and of its Tucker-decomposed LoCon: a file holding them would
# apply wrongly as a plain LoRA, so it is refused
LYCORIS_ONLY = ("hada_w1_a", "hada_w1_b", "lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a", "lora_mid", "hada_t1")
META_KEY = "ldmkit.lora"  # our description of a file we wrote: rank, alpha, targets, base model


@dataclass
class Factors:
    """One layer's update (alpha / r) * up @ down: down (r, in), up (out, r)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class LoRAFile:
    """A LoRA file's contents: per part ("unet", "text"), the layers by the name the file gives them (dotted
    diffusers path for "peft", the underscored name for "kohya")."""

    layout: str
    parts: dict[str, dict[str, Factors]] = field(default_factory=dict)
    about: dict = field(default_factory=dict)  # META_KEY of a file ldmkit wrote, else {}

    def layers(self) -> list[tuple[str, str, Factors]]:
        return [(part, name, f) for part, layers in self.parts.items() for name, f in layers.items()]


def read_safetensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an adapter file (what: "LoRA", "embedding"); InputError in one line for a pickle,
    a missing file and an unreadable or truncated one."""
    if path.suffix.lower() in (".pt", ".ckpt", ".bin", ".pth"):
        raise InputError(
            f"{path}: {what} files are read as .safetensors only (a pickle file can run code); convert it with "
            f"safetensors.torch.save_file or get the .safetensors release"
        )
    if not path.is_file():
        raise InputError(f"{what} file {path} does not exist; give the path of a .safetensors {what}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e}); is it truncated? download it again") from e


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1) if t.ndim == 4 else t  # (r, in, k, k) -> (r, in * k * k)


def _split(key: str, prefixes: dict[str, str]) -> tuple[str, str] | None:
    for prefix, part in prefixes.items():
        if key.startswith(prefix):
            return part, key[len(prefix) :]
    return None


def read_lora(path: str | Path) -> LoRAFile:
    """The layers of a kohya or PEFT LoRA file; InputError (one line) for pickles, unreadable files and files
    holding no LoRA keys."""
    path = Path(path)
    state, meta = read_safetensors(path, "LoRA")
    about = json.loads(meta[META_KEY]) if META_KEY in meta else {}
    lycoris = sorted({part for k in state for part in k.split(".")[1:] if part in LYCORIS_ONLY})
    if lycoris:
        raise InputError(
            f"{path}: a LyCORIS file ({', '.join(lycoris)} keys: LoHa, LoKr or Tucker-decomposed LoCon), which "
            f"ldmkit does not apply; use a LoRA or LoCon (lora_down / lora_up, or lora_A / lora_B, keys only)"
        )
    if any(k.endswith(".lora_down.weight") for k in state):
        return _read_kohya(path, state, about)
    if any(k.endswith(".lora_A.weight") for k in state):
        return _read_peft(path, state, meta, about)
    first = next(iter(state), "(no tensors)")
    raise InputError(
        f"{path}: no LoRA keys (first key {first}); a LoRA file names its layers `lora_unet_....lora_down.weight` "
        f"(kohya) or `unet.....lora_A.weight` (diffusers/PEFT)"
    )


def _read_kohya(path: Path, state: dict, about: dict) -> LoRAFile:
    out = LoRAFile("kohya", about=about)
    for key in state:
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key[: -len(".lora_down.weight")]
        where = _split(stem, KOHYA_PREFIX)
        if where is None or f"{stem}.lora_up.weight" not in state:
            raise InputError(f"{path}: key {key} is not a kohya LoRA layer (lora_unet_/lora_te_ with lora_up)")
        down, up = _flat(state[key]), _flat(state[f"{stem}.lora_up.weight"])
        alpha = float(state[f"{stem}.alpha"]) if f"{stem}.alpha" in state else float(down.shape[0])
        out.parts.setdefault(where[0], {})[where[1]] = Factors(down, up, alpha)
    return out


def _read_peft(path: Path, state: dict, meta: dict, about: dict) -> LoRAFile:
    adapter = json.loads(meta.get("lora_adapter_metadata", "{}") or "{}")
    out = LoRAFile("peft", about=about)
    for key in state:
        if not key.endswith(".lora_A.weight"):
            continue
        stem = key[: -len(".lora_A.weight")]
        part, name = _split(stem, PEFT_PREFIX) or ("unet", stem)  # unprefixed files hold a U-Net's layers
        if f"{stem}.lora_B.weight" not in state:
            raise InputError(f"{path}: {key} has no {stem}.lora_B.weight; the file is incomplete")
        down, up = _flat(state[key]), _flat(state[f"{stem}.lora_B.weight"])
        prefix = "unet." if part == "unet" else "text_encoder."
        r = adapter.get(f"{prefix}r", down.shape[0])
        alpha = float(adapter.get(f"{prefix}lora_alpha", r)) * down.shape[0] / r  # same factor alpha / r
        out.parts.setdefault(part, {})[name] = Factors(down, up, alpha)
    return out


def write_lora(path: str | Path, lora: LoRAFile, convs: dict[str, tuple[int, int]] | None = None) -> Path:
    """Write `lora` in its layout; the layers named in `convs` (as in lora.parts) are convolutions with that kernel:
    down (r, in, k, k), up (out, r, 1, 1). The PEFT layout folds alpha / r into up."""
    convs = convs or {}
    if lora.layout not in LAYOUTS:
        raise InputError(f"unknown LoRA layout {lora.layout!r}; use one of {', '.join(LAYOUTS)}")
    state: dict[str, torch.Tensor] = {}
    for part, name, f in lora.layers():
        down, up = f.down.detach().float().cpu(), f.up.detach().float().cpu()
        if name in convs:
            down, up = down.view(f.rank, -1, *convs[name]), up[:, :, None, None]
        if lora.layout == "kohya":
            stem = f"{'lora_unet_' if part == 'unet' else 'lora_te_'}{name}"
            state |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
            state[f"{stem}.alpha"] = torch.tensor(f.alpha)
        else:
            stem = f"{'unet.' if part == 'unet' else 'text_encoder.'}{name}"
            state |= {f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up * (f.alpha / f.rank)}
    flat, meta = {k: v.contiguous() for k, v in state.items()}, {META_KEY: json.dumps(lora.about)}
    # in one rename, with the usual permissions (safetensors' save_file creates its files private, 0o600)
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=meta))
