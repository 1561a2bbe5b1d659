"""Noise-level embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(
    t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal embedding of a (possibly fractional) timestep, as in "Attention is all you need".

    Frequencies are max_period ** (-k / (half - freq_shift)) for k < half; the output is [sin, cos] or, with
    flip_sin_to_cos, [cos, sin] (Stable Diffusion's order).
    """
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * k / (half - freq_shift))  # (half,)
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb  # (B, dim)


class TimestepMLP(nn.Module):
    """Two linear layers with SiLU between, lifting the sinusoidal embedding to the block embedding width."""

    def __init__(self, in_dim: int, out_dim: int):
        """in_dim: sinusoidal embedding width; out_dim: width fed to every residual block."""
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(nn.functional.silu(self.linear_1(emb)))
