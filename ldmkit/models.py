"""Models that ship with ldmkit: where their weights live, how a name resolves, and the half-precision export.

Shipped models are ordinary "ldm" checkpoints stored in half precision under `weights/` at the repository root
(override the folder with the environment variable LDMKIT_WEIGHTS). Each has a model card `weights/NAME.md` and
a sample grid `weights/NAME.png`; the recipe that trains it is `recipes/NAME/`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from . import checkpoint
from .errors import InputError, MissingFileError

DEFAULT_MODEL = "emoji"
SHIPPED = {
    "emoji": "text-conditional (MiniLM text encoder), 64x64 emoji, trained on the built-in `emoji` data set",
    "fashion-mnist": "class-conditional (10 classes), 32x32 Fashion-MNIST",
}


def default_model() -> str:
    """The model `ldmkit generate` uses without --model: emoji when its weights are present, else fashion-mnist."""
    for name in (DEFAULT_MODEL, *SHIPPED):
        if (weights_dir() / f"{name}.safetensors").is_file():
            return name
    return DEFAULT_MODEL


def weights_dir() -> Path:
    """The folder of shipped weights: $LDMKIT_WEIGHTS, else `weights/` beside the package."""
    env = os.environ.get("LDMKIT_WEIGHTS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "weights"


def resolve_model(name_or_path: str) -> Path:
    """A shipped model's name or a checkpoint path -> the checkpoint file (clear error when neither exists)."""
    p = Path(name_or_path)
    if p.suffix == ".safetensors" or p.exists():
        if not p.is_file():
            raise MissingFileError(f"{p} does not exist; give a model.safetensors from `ldmkit train` or one of "
                                    f"the shipped models: {', '.join(SHIPPED)}")
        return p
    if name_or_path not in SHIPPED:
        raise InputError(f"unknown model {name_or_path!r}; shipped models: {', '.join(SHIPPED)} (or give a path to "
                         f"a model.safetensors)")
    path = weights_dir() / f"{name_or_path}.safetensors"
    if not path.is_file():
        raise MissingFileError(f"the shipped model {name_or_path!r} is missing at {path}; restore it with "
                                f"`git checkout -- weights/` or train it with `python recipes/build.py {name_or_path}`")
    return path


def export_half(src: str | Path, dst: str | Path) -> Path:
    """Copy an "ldm" checkpoint with its floating-point tensors in float16 (loading casts them back to float32).

    The autoencoder is decoded in float32 at run time, so half-precision storage does not bring fp16 overflow.
    """
    tensors, meta = checkpoint.load(src, "ldm")
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    extra = {k: v for k, v in meta.items() if k not in ("format", "kind", "config")}
    return checkpoint.save(dst, half, "ldm", meta["config"], **extra, stored_dtype="float16")
