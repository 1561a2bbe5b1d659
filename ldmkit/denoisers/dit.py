"""The Diffusion Transformer backbone (Peebles & Xie 2023): patchify, adaLN-Zero blocks, linear unpatchify.

Called as `dit(x_in, c_noise, cond)` like the U-Net: x_in (B, in_channels - concat channels, H, W) is the
preconditioned latent, c_noise (B,) the noise level as the parameterisation encodes it, cond a `Conditioning`
(labels for the class embedding, context for cross-attention, concat channels). The noise level and the class
label make one embedding that scales, shifts and gates every block (adaLN-Zero); a text model's blocks also
cross-attend to the context after their self-attention (as PixArt-alpha, Chen et al. 2023).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..conditioning.types import Conditioning, backbone_inputs
from ..config import DiTConfig
from ..errors import InputError
from ..nn.attention import Attention
from ..nn.embeddings import TimestepMLP, sincos_positions_2d, timestep_embedding

FREQ_DIM = 256  # width of the sinusoidal noise-level embedding (DiT's frequency_embedding_size)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D) * (1 + scale) + shift, with shift and scale (B, 1, D) from the conditioning."""
    return x * (1 + scale) + shift


def layer_norm(dim: int, eps: float = 1e-6) -> nn.LayerNorm:
    """A LayerNorm without its own scale and bias: adaLN supplies them."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=eps)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block (Peebles & Xie 2023, Fig. 3): gated self-attention, optional cross-attention,
    gated GELU feed-forward, each gate and modulation regressed from the conditioning embedding."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, context_dim: int = 0, norm_eps: float = 1e-6):
        """dim: token width; heads: attention heads; mlp_ratio: feed-forward width / dim; context_dim: text context
        width for cross-attention (0: none); norm_eps: epsilon of the LayerNorm before the feed-forward."""
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, heads, qkv_bias=True)
        self.norm_cross = layer_norm(dim) if context_dim else None
        self.cross = Attention(dim, heads, context_dim=context_dim, qkv_bias=True) if context_dim else None
        self.norm2 = layer_norm(dim, norm_eps)
        inner = int(dim * mlp_ratio)
        self.ff_in = nn.Linear(dim, inner)
        self.ff_out = nn.Linear(inner, dim)
        self.ada = nn.Linear(dim, 6 * dim)  # -> shift, scale, gate of the attention, then of the feed-forward

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x: (B, N, D) tokens; emb: (B, D) conditioning; context: (B, T, context_dim); mask: (B, T) bool."""
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.ada(F.silu(emb))[:, None].chunk(6, dim=2)  # (B, 1, D)
        x = x + gate_a * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        if self.cross is not None:
            if context is None:
                raise InputError("this DiT cross-attends to text but got no context; pass a text conditioning")
            x = x + self.cross(self.norm_cross(x), context, mask)
        h = F.gelu(self.ff_in(modulate(self.norm2(x), shift_f, scale_f)), approximate="tanh")  # (B, N, inner)
        return x + gate_f * self.ff_out(h)


class DiT(nn.Module):
    """Diffusion Transformer (Peebles & Xie 2023) on latents: p x p patches -> tokens + fixed 2-D sine-cosine
    positions -> adaLN-Zero blocks -> adaLN final layer -> p x p x C values per token, folded back to (C, H, W)."""

    def __init__(self, cfg: DiTConfig):
        """cfg: every architectural choice; see `DiTConfig` for each field (the preset gives the size)."""
        super().__init__()
        self.cfg = cfg
        depth, dim, heads, patch = cfg.size()
        self.dim, self.patch = dim, patch
        out = cfg.out_channels * (2 if cfg.learned_sigma else 1)
        self.patch_embed = nn.Conv2d(cfg.in_channels, dim, patch, stride=patch)
        self.time_mlp = TimestepMLP(FREQ_DIM, dim)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, dim) if cfg.num_classes else None
        self.blocks = nn.ModuleList(
            DiTBlock(dim, heads, cfg.mlp_ratio, cfg.context_dim, cfg.norm_eps) for _ in range(depth)
        )
        self.norm_out = layer_norm(dim)
        self.final_ada = nn.Linear(dim, 2 * dim)  # -> shift, scale of the final layer
        self.final = nn.Linear(dim, patch * patch * out)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's initialisation: Xavier-uniform linear layers (and the patch projection, as a linear layer) with zero
        biases; N(0, 0.02) noise-level and label embeddings; zero adaLN regressions and output layer, so every block
        starts as the identity and the untrained model predicts zero; zero cross-attention outputs (PixArt-alpha)
        for the same reason."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        if self.class_emb is not None:
            nn.init.normal_(self.class_emb.weight, std=0.02)
        nn.init.normal_(self.time_mlp.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_mlp.linear_2.weight, std=0.02)
        zero = [self.final_ada, self.final] + [b.ada for b in self.blocks]
        zero += [b.cross.to_out for b in self.blocks if b.cross is not None]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def embed(self, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The conditioning embedding (B, D): noise level (+ class label; none given = the null label)."""
        t = timestep_embedding(c_noise, FREQ_DIM, flip_sin_to_cos=True, freq_shift=1)  # (B, 256)
        emb = self.time_mlp(t.to(self.patch_embed.weight.dtype))  # (B, D)
        if self.class_emb is not None:
            if labels is None:
                labels = torch.full((len(c_noise),), self.cfg.num_classes, device=c_noise.device, dtype=torch.long)
            emb = emb + self.class_emb(labels)
        return emb

    def positions(self, rows: int, cols: int, device) -> torch.Tensor:
        """(1, rows * cols, D) fixed positions of the patch grid (spread over cfg.sample_size when it is set)."""
        base = self.cfg.sample_size // self.patch
        return sincos_positions_2d(rows, cols, self.dim, base, device)[None]

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        x, c_noise, cond = backbone_inputs(x, c_noise, cond, self.cfg.in_channels, "DiT")
        B, _, H, W = x.shape
        p, C = self.patch, self.cfg.out_channels
        if H % p or W % p:
            raise InputError(
                f"latent size {H}x{W} is not a multiple of the DiT's patch size {p}; use latent sides that are "
                f"multiples of {p} (image sides that are multiples of {p} times the autoencoder's factor)"
            )
        rows, cols = H // p, W // p
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D), N = rows * cols, row-major
        h = (h + self.positions(rows, cols, x.device)).to(h.dtype)
        emb = self.embed(c_noise, cond.labels)  # (B, D)
        ctx, mask = cond.context, cond.context_mask
        if ctx is not None:
            ctx = ctx.to(h.dtype)
        for block in self.blocks:
            h = block(h, emb, ctx, mask)
        shift, scale = self.final_ada(F.silu(emb))[:, None].chunk(2, dim=2)  # (B, 1, D) each
        h = self.final(modulate(self.norm_out(h), shift, scale))  # (B, N, p * p * out)
        h = h.reshape(B, rows, cols, p, p, -1).permute(0, 5, 1, 3, 2, 4)  # (B, out, rows, p, cols, p)
        return h.reshape(B, -1, H, W)[:, :C]  # (B, C, H, W); a learned variance's channels are dropped
