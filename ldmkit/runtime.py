"""Where models run: device choice and autocast. Below everything that runs a model."""

from __future__ import annotations

import contextlib

import torch

from .errors import DeviceError, InputError

PRECISIONS = ("auto", "bf16", "no")


def resolve_device(name: str, option: str = "--device") -> torch.device:
    """ "auto" -> CUDA when available, else the CPU; "cpu", "cuda", "cuda:1", ... as given.

    option: the setting that named the device (e.g. "train.device" or "--device"), so an error names what to change.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"{option} {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"{option} {name!r} was requested but CUDA is not available on this machine; use {option} cpu (or auto)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"{option} {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    return dev


def autocast(mixed_precision: str, device: torch.device):
    """bf16 autocast on CUDA ("auto" or "bf16"; "bf16" on the CPU too); full precision for "no"."""
    if mixed_precision not in PRECISIONS:
        raise InputError(f"mixed precision {mixed_precision!r} is not known; use one of {', '.join(PRECISIONS)}")
    on = mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")
    if on:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
