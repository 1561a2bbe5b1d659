"""Start a denoiser run from an existing model (`ldmkit train --init MODEL`): a shipped name, an ldm file, a
diffusers pipeline folder or a Stable Diffusion single file.

The architecture comes from the model: the backbone, the parameterisation and schedule, the text encoder, the task
and the class names. A setting that contradicts it is refused in one line, before any slow work. The model's
autoencoder is the run's (a converted model's is written into the run folder once, so a resume finds it), its
backbone and text encoder weights are the starting point, and the run records the model's SHA-256.
"""

from __future__ import annotations

import warnings
from dataclasses import fields, replace
from pathlib import Path

import torch
from torch import nn

from .. import checkpoint
from ..autoencoder import build_autoencoder
from ..autoencoder.files import KIND as AE_KIND
from ..config import AutoencoderRun, DataConfig, DenoiserRun, to_dict
from ..denoisers.temporal import temporal_state
from ..errors import InputError
from ..interop.convert import model_sha256, read_model, source_format
from ..interop.files import PICKLE_SUFFIXES
from ..ldm import LdmFile
from ..shipped import resolve_model
from .rundir import flatten

# what a started run takes from its model (dotted prefixes of DenoiserRun's settings)
INHERITED = ("unet.", "dit.", "denoiser.", "diffusion.", "upscale.", "text_encoder", "task", "class_names")
PARENT_AE = "parent-autoencoder.safetensors"  # a converted model's autoencoder, kept in the run folder


def init_source(init: str) -> tuple[Path, str]:
    """(the model's path, its format): a shipped name resolves to its file, anything else is read as a path."""
    p = Path(init)
    if not (p.exists() or p.suffix in PICKLE_SUFFIXES):
        p = resolve_model(init)  # a shipped name, or its own error for a name or file that is not there
    return p, source_format(p)


def _contradictions(run: DenoiserRun, parent: DenoiserRun) -> list[str]:
    """The settings the user changed from their defaults that differ from the model's."""
    default, given, model = (flatten(to_dict(r)) for r in (DenoiserRun(), run, parent))
    return [
        f"{k}={given[k]!r} (the model has {model.get(k)!r})"
        for k in given
        if k.startswith(INHERITED) and given[k] != default.get(k) and given[k] != model.get(k)
    ]


def start_from(run: DenoiserRun, out_dir: str | Path) -> tuple[DenoiserRun, LdmFile | None]:
    """(run with the model's architecture, autoencoder and SHA-256 filled in, the model's contents); (run, None)
    without --init. InputError for a setting that contradicts the model."""
    if not run.init:
        return run, None
    source, fmt = init_source(run.init)
    if run.autoencoder:
        raise InputError(
            f"--init {run.init} brings its own autoencoder; drop --autoencoder {run.autoencoder} (or train from "
            f"scratch without --init)"
        )
    parent = read_model(source)
    bad = _contradictions(run, parent.run)
    if bad:
        raise InputError(
            f"--init {run.init}: the architecture comes from the model, so drop {'; '.join(bad)} (or train from "
            f"scratch without --init)"
        )
    autoencoder = str(source)
    if fmt != "ldm":  # a converted model: its autoencoder as a file of the run, for the cache
        autoencoder = str(Path(out_dir) / PARENT_AE)
        if not Path(autoencoder).is_file():
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            ae = build_autoencoder(parent.ae_config)
            checkpoint.load_state(ae, parent.autoencoder, source, "autoencoder")
            checkpoint.save(autoencoder, ae.state_dict(), AE_KIND, to_dict(AutoencoderRun(model=parent.ae_config)))
    p = parent.run
    if fmt != "ldm" and run.data.dataset == DataConfig().dataset == p.data.dataset:
        warnings.warn(
            f"--init {run.init}: the model does not record what it was trained on, so this run trains on "
            f"{run.data.dataset}, the default data set; give your own images with --data DIR",
            stacklevel=2,
        )
    started = replace(
        run,
        unet=p.unet,
        dit=p.dit,
        denoiser=p.denoiser,
        diffusion=p.diffusion,
        upscale=p.upscale,
        text_encoder=p.text_encoder,
        task=p.task,
        class_names=p.class_names,
        autoencoder=autoencoder,
        data=replace(_inherited_data(run.data, p.data), channels=parent.ae_config.in_channels),
        init_sha256=model_sha256(source),
    )
    return started, parent


def _inherited_data(given: DataConfig, model: DataConfig) -> DataConfig:
    """The run's data settings: each one left at its default comes from the data the model was trained on (its data
    set, resolution, held-out images ...), so that `--init MODEL` alone goes on training on the model's own data."""
    default = DataConfig()
    kept = {
        f.name: getattr(model, f.name) for f in fields(DataConfig) if getattr(given, f.name) == getattr(default, f.name)
    }
    return replace(given, **kept)


def trains_text(run: DenoiserRun) -> bool:
    """Whether the run trains a trainable text encoder: as train.trainable says ("auto": from scratch only)."""
    t = run.train.trainable
    return t == "backbone+text" or (t == "auto" and not run.init)


def load_parent_weights(
    parent: LdmFile, backbone: nn.Module | None, text_encoder: nn.Module | None, source: str
) -> None:
    """The model's backbone weights (and its text encoder's, when it stores them) into the run's modules. Temporal
    layers the model lacks (an image model starting a video run) keep their initial weights, the identity."""
    with torch.no_grad():
        if backbone is not None:
            checkpoint.load_state(backbone, temporal_state(backbone) | parent.unet, source, "backbone")
        if text_encoder is not None and parent.text:
            checkpoint.load_state(text_encoder, parent.text, source, "text encoder")
