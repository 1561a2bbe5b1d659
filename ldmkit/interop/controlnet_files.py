"""ControlNet files in three layouts, converted both ways by `ldmkit convert` (convert.py hands ControlNets here).

- "ldm": ldmkit's ControlNet file (a safetensors checkpoint of kind "controlnet", denoisers/controlnet.py);
- "diffusers": a ControlNetModel folder (config.json naming ControlNetModel + diffusion_pytorch_model.safetensors);
- "single-file": Stable Diffusion's ControlNet file: under `control_model.`, the U-Net's ldm names for the encoder
  copy (time_embed, input_blocks, middle_block), then input_hint_block.{0, 2, 4, ...} (one sequence with a SiLU
  between its convolutions), zero_convs.i.0 and middle_block_out.0 (keymaps.controlnet_rules, "ldm" layout). Files
  without the prefix are read too; .pth pickles only with unsafe_pickle.
A single file holds no configuration. ldmkit writes its own into the file's metadata (key ldmkit_interop), so round
trips are exact; for any other file the U-Net's configuration is the base model's it was made for (`--base`), or
else inferred from the shapes with Stable Diffusion's values for what shapes cannot tell (attention heads, GroupNorm
groups; `--heads`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .. import checkpoint
from ..checkpoint import CheckpointError, load_state
from ..config import UNetConfig, from_dict, to_dict
from ..denoisers.controlnet import KIND, ControlNet, load_controlnet, save_controlnet
from ..errors import InputError
from . import keymaps
from .diffusers_controlnet import CLASS, controlnet_from_diffusers, write_diffusers_controlnet
from .files import PICKLE_SUFFIXES, read_tensors, write_tensors
from .single_file import HINTS, infer_unet_config

PREFIX = "control_model."  # Stable Diffusion's ControlNet files keep every key under it
HINT_IN = "input_hint_block.0.weight"  # the key that tells a single-file ControlNet


def controlnet_format(path: str | Path, unsafe_pickle: bool = False) -> str | None:
    """The layout ("ldm", "diffusers", "single-file") of a ControlNet at `path`, or None when it holds none. A
    pickle is only opened when it is a .pth, and refused (CheckpointError) without unsafe_pickle."""
    path = Path(path)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file() or (path / "model_index.json").is_file():
            return None
        try:
            name = json.loads(config.read_text()).get("_class_name")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None
        return "diffusers" if name == CLASS else None
    if not path.is_file():
        return None
    if path.suffix in PICKLE_SUFFIXES:  # opened only for .pth, the suffix ControlNets ship with (a .ckpt is a model)
        if path.suffix != ".pth":
            return None
        return "single-file" if _is_single_file(read_tensors(path, unsafe_pickle=unsafe_pickle)[0]) else None
    if path.suffix != ".safetensors":
        return None
    meta = checkpoint.read_header(path)
    if meta.get("format") == checkpoint.FORMAT:
        return "ldm" if meta.get("kind") == KIND else None
    try:
        with safe_open(str(path), framework="pt") as f:
            return "single-file" if _is_single_file(f.keys()) else None
    except (SafetensorError, OSError, ValueError):
        return None


def _is_single_file(keys) -> bool:
    return any(k in (HINT_IN, PREFIX + HINT_IN) for k in keys)


# --- Stable Diffusion's single file ---------------------------------------------------------------------------------


def _hint_shape(s: dict[str, torch.Tensor], source: str) -> tuple[int, tuple[int, ...]]:
    """(condition channels, hint encoder widths) from input_hint_block's convolutions (2 + 2 per halving)."""
    convs = sorted(int(k.split(".")[1]) for k in s if k.startswith("input_hint_block.") and k.endswith(".weight"))
    halvings, rem = divmod(len(convs) - 2, 2)
    if rem or halvings < 0 or convs != list(range(0, 2 * len(convs), 2)):
        raise CheckpointError(
            f"{source}: input_hint_block has convolutions at {convs}, not a hint encoder (0, 2, 4, ...: one in, two "
            f"per halving, one out); is it a ControlNet file?"
        )
    first = s[HINT_IN]  # (width, channels, 3, 3)
    widths = [first.shape[0]] + [s[f"input_hint_block.{4 * i + 4}.weight"].shape[0] for i in range(halvings)]
    return first.shape[1], tuple(widths)


def controlnet_from_single_file(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    unet: UNetConfig | None = None,
    heads=None,
    source: str = "",
) -> tuple[ControlNet, dict[str, Any]]:
    """(the ControlNet in a Stable Diffusion single file's tensors, what ldmkit recorded about it). Its U-Net
    configuration: ldmkit's metadata where it wrote the file, else `unet` (the base model's), else the shapes."""
    s = {k[len(PREFIX) :] if k.startswith(PREFIX) else k: v for k, v in tensors.items()}
    hints = json.loads((metadata or {}).get(HINTS, "{}")).get("controlnet")
    if hints:
        cfg, channels, widths = from_dict(UNetConfig, hints["unet"]), hints["hint_channels"], hints["hint_widths"]
    else:
        channels, widths = _hint_shape(s, source)
        cfg = unet or infer_unet_config(s, heads, source, out_channels=s["input_blocks.0.0.weight"].shape[1])
    net = ControlNet(cfg, channels, tuple(widths))
    rules = keymaps.controlnet_rules(cfg, len(widths) - 1, "ldm")
    try:
        ours = keymaps.translate(s, rules, reverse=True, source=source, what="ControlNet")
        load_state(net, ours, source, "ControlNet")
    except (RuntimeError, CheckpointError) as e:  # other blocks or other shapes: the configuration is not the file's
        if hints:
            raise
        why = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e).removeprefix(f"{source}: ").split(";")[0]
        made = "the --base model" if unet is not None else "the configuration inferred from its shapes"
        raise InputError(
            f"{source}: the ControlNet does not fit {made} ({why}); give the model it was made for"
        ) from None
    return net.eval(), dict(hints.get("about", {})) if hints else {}


def single_file_controlnet_tensors(net: ControlNet) -> dict[str, torch.Tensor]:
    """ldmkit ControlNet -> Stable Diffusion's single-file names (with the control_model. prefix)."""
    rules = keymaps.controlnet_rules(net.cfg, len(net.widths) - 1, "ldm")
    return {PREFIX + k: v for k, v in keymaps.translate(net.state_dict(), rules, what="ControlNet").items()}


def write_single_file_controlnet(path: str | Path, net: ControlNet, about: dict[str, Any] | None = None) -> Path:
    """ldmkit ControlNet -> a Stable Diffusion ControlNet .safetensors, its configuration and `about` (the
    condition, the base model's SHA-256 ...) in the metadata so that reading it back is exact."""
    hints = {"unet": to_dict(net.cfg), "hint_channels": net.hint_channels, "hint_widths": list(net.widths)}
    meta = {HINTS: json.dumps({"controlnet": hints | {"about": about or {}}})}
    return write_tensors(path, single_file_controlnet_tensors(net), meta)


# --- convert --------------------------------------------------------------------------------------------------------


def read_controlnet(
    path: str | Path,
    fmt: str,
    *,
    unet: UNetConfig | None = None,
    heads=None,
    unsafe_pickle: bool = False,
    base_unet: nn.Module | None = None,
) -> tuple[ControlNet, dict[str, Any]]:
    """(the ControlNet at `path` in layout `fmt`, what its file says about it beside the weights). base_unet: the
    U-Net a low-rank ldmkit ControlNet is rebuilt on."""
    if fmt == "ldm":
        net, meta = load_controlnet(path, unet=base_unet)
        return net, {k: v for k, v in meta.items() if k not in ("format", "kind", "config")}
    if fmt == "diffusers":
        return controlnet_from_diffusers(path, unsafe_pickle=unsafe_pickle), {}
    tensors, metadata = read_tensors(path, unsafe_pickle=unsafe_pickle)
    return controlnet_from_single_file(tensors, metadata, unet, heads, str(path))


def convert_controlnet(
    src: str | Path,
    src_fmt: str,
    dst: str | Path,
    dst_fmt: str,
    *,
    unet: UNetConfig | None = None,
    heads=None,
    unsafe_pickle: bool = False,
    base_sha256: str | None = None,
    base_unet: nn.Module | None = None,
) -> Path:
    """Convert the ControlNet at `src` (layout src_fmt) to `dst` (layout dst_fmt). unet: the configuration of the
    base model it was made for (a foreign single file's), whose SHA-256 `base_sha256` an ldmkit file records;
    base_unet: that model's U-Net, which a low-rank ldmkit ControlNet is rebuilt on (written out whole)."""
    if dst_fmt != "diffusers" and Path(dst).suffix != ".safetensors":
        raise InputError(f"{dst}: a ControlNet file is written as .safetensors; rename it")
    net, about = read_controlnet(src, src_fmt, unet=unet, heads=heads, unsafe_pickle=unsafe_pickle, base_unet=base_unet)
    if base_sha256:
        about["base_sha256"] = base_sha256
    if dst_fmt == "diffusers":
        return write_diffusers_controlnet(net, dst)
    if dst_fmt == "single-file":
        return write_single_file_controlnet(dst, net, about)
    about.setdefault("condition", "raw")  # a foreign file does not say what its condition images are
    return save_controlnet(dst, net, **(about | {"converted_from": str(src)}))
