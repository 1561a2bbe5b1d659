"""First-stage autoencoders: the convolutional encoder/decoder pair and the KL-regularised autoencoder."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..config import AutoencoderConfig
from ..nn.attention import SpatialSelfAttention
from ..nn.blocks import Downsample, ResBlock, Upsample, group_norm
from ..noise import Generators, randn


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> features (B, out_channels, H/f, W/f), f = 2 ** (levels - 1)."""

    def __init__(self, cfg: AutoencoderConfig, out_channels: int):
        """cfg: the autoencoder's configuration; out_channels: 2 * latent for a KL posterior, latent for VQ."""
        super().__init__()
        g = cfg.norm_groups
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.down = nn.ModuleList()
        ch = chans[0]
        for i, cout in enumerate(chans):
            level = nn.Module()
            level.res = nn.ModuleList(
                ResBlock(ch if j == 0 else cout, cout, groups=g) for j in range(cfg.num_res_blocks)
            )
            level.resample = Downsample(cout, asymmetric=True) if i < len(chans) - 1 else None
            self.down.append(level)
            ch = cout
        self.mid_res1 = ResBlock(ch, ch, groups=g)
        self.mid_attn = SpatialSelfAttention(ch, g) if cfg.mid_attention else None
        self.mid_res2 = ResBlock(ch, ch, groups=g)
        self.norm_out = group_norm(ch, g)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.res:
                h = block(h)
            if level.resample is not None:
                h = level.resample(h)  # (B, C, H/2, W/2)
        h = self.mid_res1(h)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid_res2(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, in_channels, h*f, w*f)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        g = cfg.norm_groups
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        ch = chans[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid_res1 = ResBlock(ch, ch, groups=g)
        self.mid_attn = SpatialSelfAttention(ch, g) if cfg.mid_attention else None
        self.mid_res2 = ResBlock(ch, ch, groups=g)
        self.up = nn.ModuleList()
        for i in reversed(range(len(chans))):
            cout = chans[i]
            level = nn.Module()
            level.res = nn.ModuleList(
                ResBlock(ch if j == 0 else cout, cout, groups=g) for j in range(cfg.num_res_blocks + 1)
            )
            level.resample = Upsample(cout) if i > 0 else None
            self.up.append(level)
            ch = cout
        self.norm_out = group_norm(ch, g)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid_res1(h)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid_res2(h)
        for level in self.up:
            for block in level.res:
                h = block(h)
            if level.resample is not None:
                h = level.resample(h)  # (B, C, 2H, 2W)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The KL autoencoder's posterior q(z|x) = N(mean, diag(std^2)), log-variance clamped to [-30, 20]."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.float().chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, noise: torch.Tensor | None = None, generator: Generators = None) -> torch.Tensor:
        """z = mean + std * noise; the noise drawn from `generator` (one per item when a list) unless given."""
        if noise is None:
            noise = randn(self.mean.shape, generator).to(self.mean.device)
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over latent dimensions: (B,)."""
        return 0.5 * (self.mean**2 + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder (Rombach et al. 2022, section 3 and appendix G)."""

    def __init__(self, cfg: AutoencoderConfig):
        """cfg: architecture and latent scaling; cfg.kind must be "kl"."""
        super().__init__()
        self.cfg = cfg
        z = cfg.latent_channels
        self.encoder = Encoder(cfg, 2 * z)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample: bool = True, generator=None):
        """Returns (reconstruction, regularisation loss (B,), stats dict)."""
        post = self.encode(x)
        z = post.sample(generator=generator) if sample else post.mean
        return self.decode(z.to(x.dtype)), post.kl(), {}

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic latents (posterior mean), unscaled."""
        return self.encode(x).mean
