"""The frames axis of video tensors, folded into the batch and back: the one place clips (B, F, C, H, W) become the
images (B * F, C, H, W) that image layers (convolutions, spatial attention, the autoencoder) take."""

from __future__ import annotations

import torch


def is_clip(x: torch.Tensor) -> bool:
    """Whether x has a frames axis: (B, F, C, H, W)."""
    return x.ndim == 5


def fold(x: torch.Tensor) -> torch.Tensor:
    """(B, F, ...) -> (B * F, ...): each frame an item of the batch, a clip's frames next to each other."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def unfold(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B * F, ...) -> (B, F, ...): fold's inverse."""
    return x.reshape(x.shape[0] // frames, frames, *x.shape[1:])


def per_frame(t: torch.Tensor, frames: int) -> torch.Tensor:
    """A per-clip tensor (B, ...) for each frame of its clip (B * F, ...), in fold's order."""
    return t.repeat_interleave(frames, dim=0)


def frame_major(x: torch.Tensor, frames: int) -> torch.Tensor:
    """Folded features (B * F, C, H, W) -> (B, C, F, H, W): frames as a sequence axis for temporal layers."""
    return unfold(x, frames).transpose(1, 2)


def frame_minor(x: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B * F, C, H, W): frame_major's inverse."""
    return fold(x.transpose(1, 2))
