"""Temporal layers that turn an image U-Net into a video denoiser: attention across frames (AnimateDiff's motion
module, Guo et al. 2024) and a 1-D convolution across frames (Video LDM, Blattmann et al. 2023).

A clip's latents are (B, F, C, H, W). The U-Net folds the frames into the batch once (`frames_as_batch`), so every
image layer sees (B * F, C, H, W) exactly as for images, and the temporal layers, placed after each of its blocks,
mix each pixel's features along the frames. Their outputs start at zero, so an image model extended with them
gives, before any training, exactly the image model's output frame by frame.

The temporal attention is laid out as AnimateDiff's (a GroupNorm over the clip, a linear projection in, transformer
blocks with two self-attentions over frames, sinusoidal frame positions added before each, a GEGLU feed-forward, a
linear projection out), so motion modules convert to and from diffusers' `MotionAdapter` (interop/motion.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..conditioning.types import Conditioning
from ..config import UNetConfig
from ..errors import InputError
from ..nn.attention import GEGLU, Attention
from ..nn.blocks import group_norm
from ..nn.frames import fold, frame_major, frame_minor, per_frame


def frame_positions(frames: int, dim: int) -> torch.Tensor:
    """Sinusoidal positions (frames, dim) (Vaswani et al. 2017), sine and cosine interleaved:
    PE[p, 2i] = sin(p / 10000^(2i / dim)), PE[p, 2i + 1] = cos(p / 10000^(2i / dim))."""
    p = torch.arange(frames, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(frames, dim)
    pe[:, 0::2] = torch.sin(p * freq)
    pe[:, 1::2] = torch.cos(p * freq)
    return pe


class TemporalBlock(nn.Module):
    """Pre-LayerNorm transformer block over frames: self-attention twice (frame positions added to the normalised
    input of each), then a GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, max_frames: int):
        """dim: token width (the features' channels); heads: attention heads; max_frames: the positions' length."""
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff_in = GEGLU(dim, 4 * dim)
        self.ff_out = nn.Linear(4 * dim, dim)
        self.register_buffer("positions", frame_positions(max_frames, dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, F, dim), one sequence of F frames per pixel of each clip."""
        pos = self.positions[: x.shape[1]].to(x.dtype)  # (F, dim)
        x = x + self.attn1(self.norm1(x) + pos)
        x = x + self.attn2(self.norm2(x) + pos)
        return x + self.ff_out(self.ff_in(self.norm3(x)))


class TemporalAttention(nn.Module):
    """Attention across the frames of each pixel: GroupNorm over the clip, project in, blocks, project out, residual."""

    def __init__(self, channels: int, heads: int, depth: int, groups: int, max_frames: int):
        """channels: the features' channels (= token width); heads: attention heads (channels // heads per head);
        depth: transformer blocks; groups: GroupNorm groups; max_frames: frames per clip at most."""
        super().__init__()
        self.norm = group_norm(channels, groups, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(TemporalBlock(channels, heads, max_frames) for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        BF, C, H, W = x.shape
        B = BF // frames
        h = self.norm(frame_major(x, frames))  # (B, C, F, H, W): statistics over the whole clip
        h = self.proj_in(h.permute(0, 3, 4, 2, 1).reshape(B * H * W, frames, C))  # (B*H*W, F, C)
        for block in self.blocks:
            h = block(h)
        h = self.proj_out(h).reshape(B, H, W, frames, C).permute(0, 3, 4, 1, 2).reshape(BF, C, H, W)
        return x + h


class TemporalConv(nn.Module):
    """A 1-D convolution across frames (kernel 3, zero padding at the clip's ends): GroupNorm, SiLU, convolution,
    residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.conv = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        h = self.conv(F.silu(self.norm(frame_major(x, frames))))  # (B, C, F, H, W)
        return x + frame_minor(h)


class TemporalLayers(nn.Module):
    """The temporal layers after one block of the U-Net: an optional convolution, then attention across frames."""

    def __init__(self, channels: int, cfg: UNetConfig):
        """channels: the block's output channels; cfg: the U-Net's configuration (temporal_heads, temporal_depth,
        temporal_conv, max_frames, norm_groups)."""
        super().__init__()
        self.max_frames = cfg.max_frames
        self.conv = TemporalConv(channels, cfg.norm_groups) if cfg.temporal_conv else None
        self.attn = TemporalAttention(channels, cfg.temporal_heads, cfg.temporal_depth, cfg.norm_groups, cfg.max_frames)

    def initialize_weights(self) -> None:
        """The last layer of each branch starts at zero: the layers start as the identity."""
        for layer in (self.attn.proj_out, self.conv.conv if self.conv is not None else None):
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """x: (B * F, C, H, W) with each clip's F frames next to each other."""
        if frames > self.max_frames:
            raise InputError(f"{frames} frames is more than this model's limit of {self.max_frames}; ask for fewer")
        if self.conv is not None:
            x = self.conv(x, frames)
        return self.attn(x, frames)


def frames_as_batch(
    x: torch.Tensor, c_noise: torch.Tensor, cond: Conditioning
) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """A clip batch as an image batch: x (B, F, C, H, W) -> (B * F, C, H, W); c_noise (B,) and every per-clip
    conditioning tensor (context, labels, ...) repeated for each frame; a conditioning tensor with the frames axis
    (B, F, ...) (a per-frame concat) folded like x."""
    B, frames = x.shape[:2]
    if c_noise.ndim == 0:
        c_noise = c_noise.expand(B)

    def each(t: torch.Tensor) -> torch.Tensor:
        return fold(t) if t.ndim == 5 and tuple(t.shape[:2]) == (B, frames) else per_frame(t, frames)

    return fold(x), per_frame(c_noise, frames), cond.map(each)


def temporal_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of the temporal layers inside `module`, under their names in its state dict."""
    names = [n for n, m in module.named_modules() if isinstance(m, TemporalLayers)]
    return {k: v for k, v in module.state_dict().items() if any(k.startswith(n + ".") for n in names)}


def temporal_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of the temporal layers inside `module` (what `train.trainable=temporal` trains)."""
    return [p for m in module.modules() if isinstance(m, TemporalLayers) for p in m.parameters()]
