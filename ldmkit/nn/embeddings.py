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


def sincos_positions_2d(rows: int, cols: int, dim: int, base: int = 0, device=None) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings (MAE / DiT) of a rows x cols patch grid, (rows * cols, dim) float32
    in row-major token order: the first dim / 2 channels encode the column, the last dim / 2 the row, each as
    [sin(p w_k), cos(p w_k)] with w_k = 10000^(-k / (dim / 4)). base > 0 spreads each axis over base positions
    (p = index * base / count, diffusers' sample_size rule); base 0 uses the indices themselves."""
    if dim % 4:
        raise ValueError(f"2-D sine-cosine positions need a width divisible by 4, got {dim}; change the width")

    def axis(n: int) -> torch.Tensor:
        p = torch.arange(n, device=device, dtype=torch.float32)
        return p / (n / base) if base else p  # (n,)

    omega = torch.arange(dim // 4, device=device, dtype=torch.float64) / (dim / 4)
    omega = 1.0 / 10000**omega  # (dim / 4,)

    def encode(p: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(p.double(), omega)  # (N, dim / 4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (N, dim / 2)

    row = axis(rows)[:, None].expand(rows, cols).reshape(-1)  # (N,)
    col = axis(cols)[None, :].expand(rows, cols).reshape(-1)  # (N,)
    return torch.cat([encode(col), encode(row)], dim=1).float()  # (N, dim)
