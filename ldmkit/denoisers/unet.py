"""The latent-diffusion U-Net backbone: residual blocks, noise-level embedding, self/cross-attention transformers.

Called as `unet(x_in, c_noise, cond)`: x_in (B, in_channels - concat channels, H, W) is the preconditioned latent,
c_noise (B,) the noise level as the parameterisation encodes it (a timestep for discrete-time models), cond a
`Conditioning` (context for cross-attention, labels for the class embedding, concat channels, and control residuals:
one tensor per skip connection, in the order the encoder makes them, then one for the middle block's output, each
added where it belongs; that is the one hook a ControlNet (denoisers/controlnet.py) acts through).

A clip x_in (B, F, C, H, W) is denoised as B * F images (frames_as_batch, the one place the frames axis is folded),
through temporal layers after every block when unet.temporal_heads > 0 (a video model, denoisers/temporal.py);
an image model so called denoises each frame on its own.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..conditioning.types import Conditioning, backbone_inputs
from ..config import UNetConfig
from ..errors import InputError
from ..nn.attention import SpatialTransformer
from ..nn.blocks import Downsample, ResBlock, Upsample, group_norm
from ..nn.embeddings import TimestepMLP, timestep_embedding
from ..nn.frames import is_clip, unfold
from .temporal import TemporalLayers, frames_as_batch


class Level(nn.Module):
    """One resolution of the U-Net: residual blocks, each optionally followed by a transformer and temporal layers,
    then a resampler."""

    def __init__(
        self,
        res: list[ResBlock],
        attn: list[SpatialTransformer] | None,
        resample: nn.Module | None,
        temporal: list[TemporalLayers] | None = None,
    ):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn) if attn else None
        self.resample = resample
        self.temporal = nn.ModuleList(temporal) if temporal else None

    def after(self, j: int, h: torch.Tensor, ctx, mask, frames: int) -> torch.Tensor:
        """What follows residual block j: its transformer, then its temporal layers (each where there is one)."""
        if self.attn is not None:
            h = self.attn[j](h, ctx, mask)
        if self.temporal is not None:
            h = self.temporal[j](h, frames)
        return h


class UNet(nn.Module):
    """Latent-diffusion U-Net (Rombach et al. 2022), laid out block for block like Stable Diffusion's."""

    def __init__(self, cfg: UNetConfig, encoder_only: bool = False):
        """cfg: every architectural choice; see `UNetConfig` for each field. encoder_only: build the encoder path and
        the middle block only (a ControlNet's trainable copy), with the same parameter names."""
        super().__init__()
        self.cfg = cfg
        ch0 = cfg.model_channels
        emb_dim = 4 * ch0
        chans = [ch0 * m for m in cfg.channel_mult]
        n_levels = len(chans)
        self.time_mlp = TimestepMLP(ch0, emb_dim)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)

        def res(cin, cout):
            return ResBlock(cin, cout, emb_dim, cfg.norm_groups, eps=cfg.norm_eps, dropout=cfg.dropout)

        def attn(level, ch):
            return SpatialTransformer(
                ch,
                cfg.heads_at(level),
                cfg.transformer_depth,
                cfg.context_dim,
                cfg.norm_groups,
                cfg.use_linear_projection,
                cfg.upcast_attention,
            )

        def temporal(ch):  # the temporal layers after a block, in a video model
            return TemporalLayers(ch, cfg) if cfg.temporal_heads else None

        # Encoder path: remember every skip connection's channel count.
        skips, ch = [ch0], ch0
        self.down = nn.ModuleList()
        for i, cout in enumerate(chans):
            has_attn = i in cfg.attention_levels
            rs, ats, tms = [], [], []
            for _ in range(cfg.num_res_blocks):
                rs.append(res(ch, cout))
                ats.append(attn(i, cout)) if has_attn else None
                tms.append(temporal(cout))
                ch = cout
                skips.append(ch)
            last = i == n_levels - 1
            self.down.append(Level(rs, ats if has_attn else None, None if last else Downsample(ch), _some(tms)))
            if not last:
                skips.append(ch)

        # Middle: residual, transformer, residual at the lowest resolution.
        self.mid_res1 = res(ch, ch)
        self.mid_attn = attn(n_levels - 1, ch) if cfg.mid_attention else None
        self.mid_temporal = temporal(ch)
        self.mid_res2 = res(ch, ch)

        self.skip_channels = tuple(skips)  # channels of each skip connection, in the order the encoder makes them
        self.mid_channels = ch
        if encoder_only:
            self.initialize_weights()
            return

        # Decoder path: each block consumes one skip connection.
        self.up = nn.ModuleList()
        for i in reversed(range(n_levels)):
            cout = chans[i]
            has_attn = i in cfg.attention_levels
            rs, ats, tms = [], [], []
            for _ in range(cfg.num_res_blocks + 1):
                rs.append(res(ch + skips.pop(), cout))
                ats.append(attn(i, cout)) if has_attn else None
                tms.append(temporal(cout))
                ch = cout
            self.up.append(Level(rs, ats if has_attn else None, Upsample(ch) if i > 0 else None, _some(tms)))

        self.norm_out = group_norm(ch, cfg.norm_groups, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self):
        """PyTorch defaults everywhere, except: the output convolution and every block's last layer start at zero,
        so each residual branch starts as the identity and the untrained model predicts zero; the temporal layers
        start as the identity too (an image model extended with them is unchanged)."""
        if hasattr(self, "conv_out"):
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.conv2.weight)
                nn.init.zeros_(m.conv2.bias)
            elif isinstance(m, SpatialTransformer):
                nn.init.zeros_(m.proj_out.weight)
                nn.init.zeros_(m.proj_out.bias)
            elif isinstance(m, TemporalLayers):
                m.initialize_weights()

    def embed(self, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        cfg = self.cfg
        t = timestep_embedding(c_noise, cfg.model_channels, cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = self.time_mlp(t.to(self.conv_in.weight.dtype))  # (B, 4 * ch0)
        if self.class_emb is not None:
            if labels is None:
                labels = torch.full((len(c_noise),), cfg.num_classes, device=c_noise.device, dtype=torch.long)
            emb = emb + self.class_emb(labels)
        return emb

    def encode(
        self, x: torch.Tensor, emb: torch.Tensor, ctx, mask, added: torch.Tensor | None = None, frames: int = 1
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The encoder path and the middle block: (middle block output, skip connections in order). added: a tensor
        added to the input convolution's output (a ControlNet's encoded condition); frames: frames per clip of the
        folded batch (temporal layers)."""
        h = self.conv_in(x)
        if added is not None:
            h = h + added
        skips = [h]
        for level in self.down:
            for j, block in enumerate(level.res):
                h = level.after(j, block(h, emb), ctx, mask, frames)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)

        h = self.mid_res1(h, emb)
        if self.mid_attn is not None:
            h = self.mid_attn(h, ctx, mask)
        if self.mid_temporal is not None:
            h = self.mid_temporal(h, frames)
        h = self.mid_res2(h, emb)
        return h, skips

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        clip, frames = is_clip(x), x.shape[1] if is_clip(x) else 1
        if clip:  # (B, F, C, H, W): the frames folded into the batch, here only
            x, c_noise, cond = frames_as_batch(x, c_noise, cond or Conditioning())
        x, c_noise, cond = backbone_inputs(x, c_noise, cond, self.cfg.in_channels, "U-Net")
        emb = self.embed(c_noise, cond.labels)
        ctx, mask = cond.context, cond.context_mask
        if ctx is not None:
            ctx = ctx.to(x.dtype)

        h, skips = self.encode(x, emb, ctx, mask, frames=frames)
        if cond.control is not None:  # injected residuals: one per skip connection, then the middle block's
            *down, mid = check_residuals(cond.control, skips, h)
            skips = [s + r for s, r in zip(skips, down)]
            h = h + mid

        for level in self.up:
            for j, block in enumerate(level.res):
                h = level.after(j, block(torch.cat([h, skips.pop()], dim=1), emb), ctx, mask, frames)
            if level.resample is not None:
                h = level.resample(h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return unfold(out, frames) if clip else out


def _some(modules: list) -> list | None:
    """The list, or None when it holds no module (an image model's missing temporal layers)."""
    return modules if any(m is not None for m in modules) else None


def check_residuals(control, skips: list[torch.Tensor], mid: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The control residuals, cast to the features' dtype, once their number and shapes match the skip connections
    and the middle block's output (InputError otherwise: a ControlNet made for another U-Net)."""
    want = [*skips, mid]
    if len(control) != len(want) or any(r.shape[1:] != t.shape[1:] for r, t in zip(control, want)):
        got = [tuple(r.shape[1:]) for r in control]
        raise InputError(
            f"the control residuals {got} do not fit this U-Net, whose skip connections and middle block are "
            f"{[tuple(t.shape[1:]) for t in want]}; the ControlNet was made for another denoiser"
        )
    return tuple(r.to(t.dtype) for r, t in zip(control, want))
