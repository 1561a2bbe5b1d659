"""The VQ-regularised autoencoder: a codebook between encoder and decoder.

van den Oord et al. 2017; Esser et al. 2021.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..config import AutoencoderConfig
from .vae import Decoder, Encoder


class VectorQuantizer(nn.Module):
    """Nearest-codebook-vector quantisation with a straight-through gradient and a commitment term."""

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25):
        """num_codes: codebook size; dim: code width (latent channels); beta: commitment weight."""
        super().__init__()
        self.beta = beta
        self.codebook = nn.Embedding(num_codes, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / num_codes, 1.0 / num_codes)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, H, W) index of the nearest code."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()  # (BHW, D)
        w = self.codebook.weight.float()
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ w.t() + w.pow(2).sum(1)[None]  # (BHW, K)
        return dist.argmin(dim=1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        return self.codebook(idx).permute(0, 3, 1, 2)  # (B, D, H, W)

    def forward(self, z: torch.Tensor):
        """Returns (quantised z with straight-through gradient, loss (B,), stats)."""
        idx = self.indices(z)
        zq = self.lookup(idx).to(z.dtype)
        codebook = F.mse_loss(zq, z.detach(), reduction="none").mean(dim=(1, 2, 3))
        commit = F.mse_loss(z, zq.detach(), reduction="none").mean(dim=(1, 2, 3))
        counts = torch.bincount(idx.flatten(), minlength=self.codebook.num_embeddings).float()
        p = counts / counts.sum()
        stats = {
            "codebook_usage": (counts > 0).float().mean().item(),  # fraction of codes used in this batch
            "perplexity": torch.exp(-(p * (p + 1e-10).log()).sum()).item(),
        }
        return z + (zq - z).detach(), codebook + self.beta * commit, stats


class AutoencoderVQ(nn.Module):
    """VQ-regularised first stage; the decoder sees quantised latents (quantisation is part of decoding)."""

    def __init__(self, cfg: AutoencoderConfig):
        """cfg: architecture; cfg.kind must be "vq"; codebook_size and commitment_beta configure the codebook."""
        super().__init__()
        self.cfg = cfg
        z = cfg.latent_channels
        self.encoder = Encoder(cfg, z)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(z, z, 1)
        self.quantizer = VectorQuantizer(cfg.codebook_size, z, cfg.commitment_beta)
        self.post_quant_conv = nn.Conv2d(z, z, 1)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latents: diffusion runs on these, decoding quantises (as latent diffusion's VQ-f4)."""
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        zq, _, _ = self.quantizer(z)
        return self.decoder(self.post_quant_conv(zq))

    def forward(self, x: torch.Tensor, sample: bool = True, generator=None):
        zq, loss, stats = self.quantizer(self.latents(x))
        return self.decoder(self.post_quant_conv(zq)), loss, stats
