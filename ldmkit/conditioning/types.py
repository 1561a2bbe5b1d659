"""The conditioning a denoiser receives, whatever produced it (labels, text, images)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import InputError


@dataclass(frozen=True)
class Conditioning:
    """Everything a backbone may be conditioned on; every field is optional.

    context: (B, T, D) token features for cross-attention (text encoders).
    context_mask: (B, T) bool, True where a token is real; None means all tokens are real.
    labels: (B,) int64 class indices; the value `num_classes` means "no label" (the null class for guidance).
    concat: (B, C, H, W) channels concatenated to the latent input (inpainting masks, low-res images).
    hint: one control image (B, C, H, W) in [0, 1] per ControlNet of a controlled backbone (denoisers/controlnet.py),
      at the image's resolution; the U-Net itself ignores it.
    control: residuals injected into the U-Net: one (B, C_i, h_i, w_i) per skip connection, in the order its encoder
      makes them, then one for its middle block's output (what ControlNets compute from `hint`).
    """

    context: torch.Tensor | None = None
    context_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    concat: torch.Tensor | None = None
    hint: tuple[torch.Tensor, ...] | None = None
    control: tuple[torch.Tensor, ...] | None = None

    def fields(self) -> dict[str, torch.Tensor | tuple[torch.Tensor, ...]]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def map(self, fn) -> "Conditioning":
        """Apply `fn` to every tensor present (device moves, repeats, slicing), each of a tuple field's too."""
        return replace(self, **{k: _apply(fn, v) for k, v in self.fields().items()})

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch axis; every item must carry the same fields."""
        keys = items[0].fields().keys()
        for it in items[1:]:
            if it.fields().keys() != keys:
                raise InputError(f"cannot batch conditionings with fields {sorted(keys)} and {sorted(it.fields())}")
        return Conditioning(**{k: _cat([getattr(it, k) for it in items]) for k in keys})

    def __len__(self) -> int:
        f = self.fields()
        if not f:
            return 0
        v = next(iter(f.values()))
        return (v[0] if isinstance(v, tuple) else v).shape[0]


def _apply(fn, v):
    return tuple(fn(t) for t in v) if isinstance(v, tuple) else fn(v)


def _cat(values: list):
    """The batch-axis concatenation of one field's values (tensors, or tuples of tensors element by element)."""
    if isinstance(values[0], tuple):
        if len({len(v) for v in values}) != 1:
            raise InputError("cannot batch conditionings with different numbers of control images or residuals")
        return tuple(torch.cat(parts) for parts in zip(*values))
    return torch.cat(values)


def backbone_inputs(
    x: torch.Tensor, c_noise: torch.Tensor, cond: Conditioning | None, in_channels: int, name: str
) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """What every backbone (`name`: "U-Net", "DiT") does first: (x with cond.concat appended on the channel axis,
    c_noise as one value per item (B,), cond, never None); InputError unless x then has `in_channels` channels."""
    cond = cond or Conditioning()
    if c_noise.ndim == 0:
        c_noise = c_noise.expand(x.shape[0])
    if cond.concat is not None:
        x = torch.cat([x, cond.concat.to(x.dtype)], dim=1)  # (B, in_channels, H, W)
    if x.shape[1] != in_channels:
        raise InputError(
            f"{name} expects {in_channels} input channels (latent + concat), got {x.shape[1]}; check the "
            f"conditioning's concat channels"
        )
    return x, c_noise, cond
