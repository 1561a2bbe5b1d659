"""Convolutional building blocks shared by the autoencoders and the U-Net."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InputError


def group_norm(channels: int, groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    if channels % groups:
        raise InputError(
            f"{channels} channels cannot be split into {groups} GroupNorm groups; "
            f"choose channel counts divisible by {groups} or set norm_groups to a divisor"
        )
    return nn.GroupNorm(groups, channels, eps=eps)


class ResBlock(nn.Module):
    """Pre-activation residual block (GroupNorm, SiLU, 3x3 conv, twice) with an optional embedding added between."""

    def __init__(
        self, in_ch: int, out_ch: int, emb_dim: int = 0, groups: int = 32, eps: float = 1e-6, dropout: float = 0.0
    ):
        """in_ch/out_ch: channels; emb_dim: width of the noise/class embedding (0: none, as in autoencoders);
        groups/eps: GroupNorm settings; dropout: before the second convolution."""
        super().__init__()
        self.norm1 = group_norm(in_ch, groups, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch) if emb_dim else None
        self.norm2 = group_norm(out_ch, groups, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb_proj is not None:
            h = h + self.emb_proj(F.silu(emb))[:, :, None, None]  # (B, C, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.skip is None else self.skip(x)) + h


class Downsample(nn.Module):
    """Strided 3x3 convolution halving height and width.

    asymmetric=True pads only right and bottom (the first-stage autoencoders of latent diffusion); otherwise the
    convolution pads one pixel on every side (the U-Net).
    """

    def __init__(self, channels: int, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(upsample_nearest_2x(x))


def upsample_nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 2H, 2W), each pixel repeated 2x2: the values of F.interpolate(x, scale_factor=2,
    mode="nearest"), written as a broadcast copy. On the CPU that is several times faster than interpolate's NCHW
    kernel, and it works in every dtype (interpolate lacks bf16 nearest on some backends)."""
    B, C, H, W = x.shape
    return x[:, :, :, None, :, None].expand(B, C, H, 2, W, 2).reshape(B, C, 2 * H, 2 * W)
