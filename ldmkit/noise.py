"""Seeded Gaussian noise that does not depend on the batch size or the device.

Noise is always drawn on the CPU in float32 and then moved, so the same seed gives the same image on a CPU and a
GPU. With one generator per sample, sample i's noise does not depend on how many samples share its batch.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .errors import InputError

Generators = torch.Generator | Sequence[torch.Generator] | None


def generators_from_seed(seed: int, n: int) -> list[torch.Generator]:
    """One CPU generator per sample, seeded seed, seed+1, ...: sample i is the same at any batch size."""
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


def randn(shape: Sequence[int], generator: Generators = None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise of `shape`; per-sample when `generator` is a list (one per batch row)."""
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise InputError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per sample")
        out = torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generator])
    else:
        out = torch.randn(shape, generator=generator, dtype=torch.float32)
    return out.to(device=device, dtype=dtype or torch.float32)


def randn_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    return randn(x.shape, generator, device=x.device, dtype=x.dtype)
