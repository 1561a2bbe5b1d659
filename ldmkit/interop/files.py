"""Reading and writing foreign weight files: safetensors, opt-in pickles, JSON configs, model folders.

Pickle files (.ckpt, .pt, .pth, .bin) can run code when loaded; they are refused unless the caller passes
`unsafe_pickle=True`, and even then are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checkpoint import CheckpointError, atomic_write, read_header

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_tensors(path: str | Path, *, unsafe_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) from a .safetensors file, or from a pickle when unsafe_pickle is set."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path, unsafe_pickle), {}
    meta = read_header(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or in another format"
        ) from None
    return tensors, meta


def _read_pickle(path: Path, unsafe_pickle: bool) -> dict[str, torch.Tensor]:
    if not unsafe_pickle:
        raise CheckpointError(
            f"{path} is a pickle file, which can run arbitrary code when loaded; prefer a "
            f".safetensors version of it, or pass unsafe_pickle=True (--unsafe-pickle) if you "
            f"trust its source"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or non-tensor pickles
        raise CheckpointError(
            f"{path} could not be read as a tensor-only pickle ({type(e).__name__}: {e}); it may "
            f"be truncated or hold Python objects beside the weights"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """An atomic .safetensors write (contiguous CPU copies)."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata or {}))


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; a diffusers folder needs it")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_model_folder(
    folder: str | Path, stem: str, *, unsafe_pickle: bool = False
) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """(config.json, tensors, weights path) of a folder written by save_pretrained.

    stem: "diffusion_pytorch_model" (diffusers) or "model" (transformers). Looks for stem.safetensors, a sharded
    stem.safetensors.index.json, the fp16 variant, and stem.bin (a pickle) in that order.
    """
    folder = Path(folder)
    config = read_json(folder / "config.json")
    if (path := folder / f"{stem}.safetensors").is_file():
        return config, read_tensors(path)[0], path
    if (index := folder / f"{stem}.safetensors.index.json").is_file():
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(read_json(index).get("weight_map", {}).values())):
            tensors.update(read_tensors(folder / shard)[0])
        return config, tensors, index
    for path in (folder / f"{stem}.fp16.safetensors", folder / f"{stem}.bin", folder / "pytorch_model.bin"):
        if path.is_file():
            return config, read_tensors(path, unsafe_pickle=unsafe_pickle)[0], path
    raise CheckpointError(
        f"{folder} has a config.json but no weights ({stem}.safetensors); was the folder copied completely?"
    )


def write_model_folder(folder: str | Path, stem: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """config.json + stem.safetensors, as save_pretrained writes them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", config)
    write_tensors(folder / f"{stem}.safetensors", tensors, {"format": "pt"})
    return folder
