"""The tiny models of the tests, declared once. Each function returns a configuration (or a saved model) small enough
to train a step in a fraction of a second on one CPU core, and takes overrides for the fields a test varies:
`tiny_denoiser_run(tiny_ae, unet=dict(num_classes=2), train=dict(steps=2))`. Stable Diffusion-shaped models for the
diffusers parity tests are in tiny_sd.py."""

from __future__ import annotations

from pathlib import Path

import torch

from ldmkit.config import (
    AutoencoderConfig,
    AutoencoderLossConfig,
    AutoencoderRun,
    DataConfig,
    DenoiserRun,
    TrainConfig,
    UNetConfig,
)

# f=2 KL autoencoder for 16x16 grayscale images: 2 latent channels
AUTOENCODER = dict(in_channels=1, base_channels=8, channel_mult=(1, 2), latent_channels=2, norm_groups=4)
# the smallest U-Net: one level, no attention anywhere
UNET = dict(
    model_channels=8, channel_mult=(1,), num_res_blocks=1, attention_levels=(), norm_groups=4, mid_attention=False
)
# two levels, attention on the second (cross-attention too when context_dim is set)
ATTENTION_UNET = dict(
    model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=(2,), norm_groups=8
)
# the images of both stages: 16x16, one channel
DATA = dict(resolution=16, channels=1)


def tiny_autoencoder(**overrides) -> AutoencoderConfig:
    """The tiny autoencoder's configuration, `overrides` replacing its fields."""
    return AutoencoderConfig(**AUTOENCODER | overrides)


def tiny_autoencoder_run(*, model=None, loss=None, data=None, train=None) -> AutoencoderRun:
    """A run of the tiny autoencoder without the perceptual loss and with a small discriminator, one training step;
    each argument is a dict of overrides of that section (`train=dict(steps=6, lr=1e-3)`)."""
    return AutoencoderRun(
        model=tiny_autoencoder(**model or {}),
        loss=AutoencoderLossConfig(**dict(perceptual_weight=0.0, disc_channels=8, disc_layers=2) | (loss or {})),
        data=DataConfig(**DATA | (data or {})),
        train=TrainConfig(**dict(steps=1) | (train or {})),
    )


def tiny_unet(**overrides) -> UNetConfig:
    """The smallest U-Net's configuration (one level, no attention), `overrides` replacing its fields."""
    return UNetConfig(**UNET | overrides)


def attention_unet(**overrides) -> UNetConfig:
    """The two-level U-Net with attention, `overrides` replacing its fields (context_dim=D adds cross-attention,
    num_classes=N class labels)."""
    return UNetConfig(**ATTENTION_UNET | overrides)


def tiny_denoiser_run(autoencoder: str | Path = "", *, unet=None, data=None, train=None, **fields) -> DenoiserRun:
    """A denoiser run on `autoencoder` (a path; in and out channels then come from it). `unet` is a UNetConfig or a
    dict of overrides of `tiny_unet`; `data` overrides the 16x16 grayscale images; `train` gives TrainConfig's
    fields; `fields` are other fields of the run (task, text_encoder, class_names, ...)."""
    if not isinstance(unet, UNetConfig):
        unet = tiny_unet(**unet or {})
    return DenoiserRun(
        autoencoder=str(autoencoder),
        unet=unet,
        data=DataConfig(**DATA | (data or {})),
        train=TrainConfig(**train or {}),
        **fields,
    )


def normal_init(module: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Every parameter drawn from N(0, std^2) with torch's global generator, the layers initialised to zero included,
    so that an untrained network's output depends on every weight."""
    for p in module.parameters():
        torch.nn.init.normal_(p, std=std)
    return module


def save_tiny_ldm(path: Path, run: DenoiserRun, *, text=None, seed: int = 0, std: float = 0.02) -> Path:
    """A complete untrained model at `path` on the autoencoder `run` names: the global generator seeded with `seed`,
    then `text()` builds the text encoder if given, then the U-Net's weights are drawn from N(0, std^2)."""
    from ldmkit.autoencoder.files import load_autoencoder
    from ldmkit.denoisers.unet import UNet
    from ldmkit.ldm import LatentDiffusion

    ae, ae_run = load_autoencoder(run.autoencoder)
    torch.manual_seed(seed)
    encoder = text() if text is not None else None
    unet = normal_init(UNet(run.unet), std)
    return LatentDiffusion(ae, ae_run.model, unet, run, encoder).save(path)


def set_options(section: str, values: dict) -> list[str]:
    """The command line's `--set SECTION.KEY=VALUE` options giving `values` (`set_options("model", AUTOENCODER)`
    for the tiny autoencoder): tuples as comma lists, booleans as true or false."""
    options = []
    for key, value in values.items():
        if isinstance(value, tuple):
            value = ",".join(map(str, value))
        elif isinstance(value, bool):
            value = str(value).lower()
        options += ["--set", f"{section}.{key}={value}"]
    return options


def with_training_data(model: str | Path, out: Path, dataset: str) -> Path:
    """A copy of `model` at `out` whose metadata says it was trained on `dataset` (its tensors unchanged)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(model), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    config["data"]["dataset"] = dataset
    save_file(tensors, str(out), metadata=meta | {"config": json.dumps(config)})
    return out
