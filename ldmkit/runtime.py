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


# --- sampling precision ---------------------------------------------------------------------------------------------
SAMPLING_PRECISIONS = ("fp32", "bf16", "auto")  # --precision, serve.precision: what sampling steps compute in
BACKENDS = ("torch", "openvino")  # --backend: what runs the backbone of the sampling steps (pipelines/openvino.py)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively: a CUDA GPU that supports it, or a CPU with AVX-512 BF16 or AMX
    tiles, as torch's cpuinfo detects them (never guessed from the model name)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def sampling_dtype(precision: str, device: torch.device, option: str = "--precision") -> torch.dtype | None:
    """The autocast dtype of the sampling steps for `precision`: None (float32) for "fp32", bfloat16 for "bf16",
    and for "auto" bfloat16 where the device computes it natively (benchmarks/precision.py measures it) and
    float32 elsewhere. "bf16" on a device without native bf16 is refused: emulated, it runs slower than float32."""
    if precision not in SAMPLING_PRECISIONS:
        raise InputError(f"{option} {precision!r} is not known; use one of {', '.join(SAMPLING_PRECISIONS)}")
    if precision == "fp32":
        return None
    native = native_bf16(device)
    if precision == "bf16" and not native:
        where = "this CPU has neither AVX-512 BF16 nor AMX" if device.type == "cpu" else f"{device} has no bf16"
        raise InputError(
            f"{option} bf16: {where}, so bfloat16 would be emulated and slower than float32; use {option} fp32 "
            f"(or auto, which picks bf16 only where it is native)"
        )
    return torch.bfloat16 if native else None


def sampling_autocast(precision: str, device: torch.device, option: str = "--precision"):
    """The context the sampling steps run in: bf16 autocast when sampling_dtype says so, else nothing (float32, the
    same numbers bit for bit as without the option)."""
    dtype = sampling_dtype(precision, device, option)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
