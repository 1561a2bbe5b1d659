"""First-stage autoencoders: `build_autoencoder(cfg)` gives the KL or VQ variant."""

from ..config import AutoencoderConfig
from ..errors import InputError
from .vae import AutoencoderKL
from .vq import AutoencoderVQ

AUTOENCODERS = {"kl": AutoencoderKL, "vq": AutoencoderVQ}


def build_autoencoder(cfg: AutoencoderConfig):
    if cfg.kind not in AUTOENCODERS:
        raise InputError(f"unknown autoencoder kind {cfg.kind!r}; choose one of: {', '.join(AUTOENCODERS)}")
    return AUTOENCODERS[cfg.kind](cfg)
