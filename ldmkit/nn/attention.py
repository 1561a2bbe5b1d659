"""Attention layers, all computed by torch.nn.functional.scaled_dot_product_attention."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InputError
from .blocks import group_norm


class Attention(nn.Module):
    """Multi-head scaled dot-product attention, self- or cross- (Vaswani et al. 2017)."""

    def __init__(self, dim: int, heads: int, context_dim: int = 0, qkv_bias: bool = False, upcast: bool = False):
        """dim: query width (also the output width); heads: number of heads, dim must be divisible by it;
        context_dim: key/value input width for cross-attention (0: self-attention on the query input);
        qkv_bias: biases on the q/k/v projections; upcast: compute attention in float32 (fp16 overflow guard)."""
        super().__init__()
        if dim % heads:
            raise InputError(f"attention width {dim} is not divisible by {heads} heads; change the head count")
        self.heads, self.upcast = heads, upcast
        kv_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, N, dim); context: (B, T, context_dim) or None; mask: (B, T) bool, True for tokens to attend."""
        ctx = x if context is None else context
        B, N, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        q, k, v = (t.view(B, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, d)
        attn_mask = None if mask is None else mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, T)
        dtype = q.dtype
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).to(dtype)  # (B, heads, N, d)
        return self.to_out(out.transpose(1, 2).reshape(B, N, -1))


class GEGLU(nn.Module):
    """Gated GELU feed-forward input projection (Shazeer 2020): a * gelu(b) from one linear layer."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, optional cross-attention, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int = 0, upcast: bool = False):
        """dim: token width; heads: attention heads; context_dim: cross-attention context width (0: no
        cross-attention); upcast: float32 attention scores."""
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, upcast=upcast)
        if context_dim:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, heads, context_dim=context_dim, upcast=upcast)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = nn.LayerNorm(dim)
        self.ff_in = GEGLU(dim, 4 * dim)
        self.ff_out = nn.Linear(4 * dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None:
            if context is None:
                raise InputError("this model uses cross-attention but got no context; pass a text conditioning")
            x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff_out(self.ff_in(self.norm3(x)))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: GroupNorm, project in, blocks, project out, residual."""

    def __init__(
        self,
        channels: int,
        heads: int,
        depth: int = 1,
        context_dim: int = 0,
        groups: int = 32,
        linear_proj: bool = False,
        upcast: bool = False,
    ):
        """channels: feature-map channels (= token width); heads: attention heads; depth: transformer blocks;
        context_dim: cross-attention width (0: none); groups: GroupNorm groups; linear_proj: linear projections
        (Stable Diffusion 2.x) instead of 1x1 convolutions (1.x); upcast: float32 attention scores."""
        super().__init__()
        self.linear_proj = linear_proj
        self.norm = group_norm(channels, groups, eps=1e-6)
        proj = (lambda: nn.Linear(channels, channels)) if linear_proj else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim, upcast) for _ in range(depth))
        self.proj_out = proj()

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if self.linear_proj:
            h = self.proj_in(h.flatten(2).transpose(1, 2))  # (B, HW, C)
        else:
            h = self.proj_in(h).flatten(2).transpose(1, 2)  # (B, HW, C)
        for block in self.blocks:
            h = block(h, context, mask)
        if self.linear_proj:
            h = self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)
        else:
            h = self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))
        return x + h


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the pixels of a feature map (the autoencoders' middle block)."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, groups, eps=1e-6)
        self.attn = Attention(channels, heads=1, qkv_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.attn(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)
