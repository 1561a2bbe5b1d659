"""`convert(src, dst)`: between ldmkit's "ldm" checkpoint, a diffusers pipeline folder and an SD single file.

Formats are told from the paths:
- "diffusers": a folder holding model_index.json (a destination folder: any path without a file suffix);
- "ldm": a .safetensors file with ldmkit metadata (kind "ldm");
- "single-file": any other .safetensors, or a .ckpt (read only, and only with unsafe_pickle=True).
A .safetensors destination is "single-file" when the source is ldmkit's and "ldm" when the source is foreign;
from a diffusers folder it is ambiguous, so name the format with `to=`. ControlNets convert by the same rules between
their own three layouts (an ldmkit ControlNet file, a ControlNetModel folder, Stable Diffusion's ControlNet file;
see controlnet_files.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .. import checkpoint
from ..conditioning.clip import (
    clip_config_from_options,
    clip_encoder_options,
    clip_state_from_encoder,
    clip_state_to_encoder,
)
from ..conditioning.text import build_text_encoder
from ..config import DataConfig, DenoiserRun
from ..denoisers import backbone_name
from ..denoisers.controlnet import is_low_rank
from ..denoisers.unet import UNet
from ..errors import InputError, MissingFileError, OutputExistsError
from ..ldm import KIND as LDM
from ..ldm import LdmFile
from .bundle import ModelWeights
from .controlnet_files import controlnet_format, convert_controlnet
from .diffusers_pipeline import is_pipeline_folder, read_pipeline, write_pipeline
from .files import PICKLE_SUFFIXES
from .single_file import read_single_file, write_single_file

FORMATS = ("ldm", "diffusers", "single-file")


def source_format(path: str | Path) -> str:
    """The format of an existing checkpoint path (ValueError saying what was expected when it has none)."""
    path = Path(path)
    if path.is_dir():
        if is_pipeline_folder(path):
            return "diffusers"
        hint = (
            " (it looks like one diffusers model; give the pipeline folder above it)"
            if (path / "config.json").is_file()
            else ""
        )
        raise InputError(f"{path} is a folder without model_index.json, so not a diffusers pipeline{hint}")
    if not path.exists():
        raise MissingFileError(f"{path} does not exist; give a .safetensors / .ckpt file or a diffusers folder")
    if path.suffix in PICKLE_SUFFIXES:
        return "single-file"
    if path.suffix != ".safetensors":
        raise InputError(
            f"{path}: cannot tell the format from the suffix {path.suffix!r}; use .safetensors "
            f"(ldmkit or Stable Diffusion), .ckpt, or a diffusers folder"
        )
    meta = checkpoint.read_header(path)
    if meta.get("format") == checkpoint.FORMAT:
        if meta.get("kind") != LDM:
            raise InputError(
                f"{path} is an ldmkit {meta.get('kind')!r} checkpoint; only complete models "
                f"(kind 'ldm', written by `ldmkit train` / LatentDiffusion.save) can be converted"
            )
        return "ldm"
    return "single-file"


def destination_format(path: str | Path, src_format: str, to: str | None = None) -> str:
    path = Path(path)
    if to is not None:
        if to not in FORMATS:
            raise InputError(f"unknown format {to!r}; use one of {', '.join(FORMATS)}")
        return to
    if path.suffix in PICKLE_SUFFIXES:
        raise InputError(f"{path}: ldmkit writes no pickle files; name the destination .safetensors")
    if path.suffix == "":
        return "diffusers"
    if path.suffix != ".safetensors":
        raise InputError(
            f"{path}: cannot tell the destination format from {path.suffix!r}; use a .safetensors "
            f"file or a folder (diffusers)"
        )
    if src_format == "diffusers":
        raise InputError(
            f"{path}: a .safetensors destination may be an ldmkit checkpoint or a single-file "
            f"checkpoint; say which with to='ldm' or to='single-file'"
        )
    return "single-file" if src_format == "ldm" else "ldm"


# --- ldmkit's "ldm" bundle ------------------------------------------------------------------------------------------


def read_ldm(path: str | Path) -> ModelWeights:
    """An ldmkit "ldm" checkpoint -> ModelWeights (a text encoder must be "clip" to have SD equivalents)."""
    f = LdmFile.read(path)
    run = f.run
    if run.denoiser.kind != "unet":
        raise InputError(
            f"{path} holds a {backbone_name(run)}, and Stable Diffusion formats hold U-Nets only; to export its "
            f"transformer for diffusers use ldmkit.interop.write_diffusers_dit"
        )
    text_cfg = text = None
    if run.text_encoder:
        if run.text_encoder != "clip":
            raise InputError(
                f"{path} uses the {run.text_encoder!r} text encoder, which Stable Diffusion formats "
                f"cannot hold; only models with the 'clip' text encoder convert"
            )
        if not f.text:
            raise checkpoint.CheckpointError(
                f"{path} has no text_encoder.* weights; its CLIP encoder was random and cannot be exported"
            )
        text_cfg = clip_config_from_options(f.text_options)
        text = clip_state_from_encoder(build_text_encoder("clip", **f.text_options), f.text)
    w = ModelWeights(
        run.unet,
        f.unet,
        f.ae_config,
        f.autoencoder,
        run.diffusion,
        run.data.resolution,
        text_cfg,
        text,
        tuple(run.class_names),
        str(path),
        task=run.task,
        upscale=run.upscale,
    )
    return w.validate()


def ldm_file(w: ModelWeights) -> LdmFile:
    """ModelWeights -> the contents of an ldmkit "ldm" checkpoint (CLIP weights included), in memory."""
    text, options = {}, {}
    if w.text is not None:
        encoder = build_text_encoder("clip", **clip_encoder_options(w.text_config))
        text, options = clip_state_to_encoder(encoder, w.text), encoder.options
    run = DenoiserRun(
        unet=w.unet_config,
        diffusion=w.diffusion,
        text_encoder="clip" if w.text is not None else "",
        data=DataConfig(resolution=w.resolution, channels=w.ae_config.in_channels),
        class_names=tuple(w.class_names),
        task=w.task,
        upscale=w.upscale,
    )
    return LdmFile(run, w.ae_config, w.unet, w.autoencoder, text, options, {"converted_from": w.source})


def write_ldm(path: str | Path, w: ModelWeights) -> Path:
    """ModelWeights -> an ldmkit "ldm" checkpoint (CLIP weights included)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"{path}: ldmkit checkpoints are .safetensors files; rename it")
    return ldm_file(w).write(path)


def read_model(source: str | Path, *, unsafe_pickle: bool = False) -> LdmFile:
    """Any model ldmkit can load, as the contents of an ldm file: an ldm file, a diffusers pipeline folder or a
    Stable Diffusion single file (converted in memory)."""
    if source_format(source) == "ldm":
        return LdmFile.read(source)
    return ldm_file(read_any(source, unsafe_pickle=unsafe_pickle))


def model_sha256(source: str | Path) -> str:
    """The SHA-256 of a model file, or of a folder's files (each relative path and its SHA-256, in order)."""
    path = Path(source)
    if path.is_file():
        return checkpoint.file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{checkpoint.file_sha256(f)}\n".encode())
    return h.hexdigest()


# --- convert --------------------------------------------------------------------------------------------------------


def read_any(
    path: str | Path, *, unsafe_pickle: bool = False, prediction: str | None = None, heads=None
) -> ModelWeights:
    """Any supported checkpoint -> ModelWeights (format told from the path)."""
    if prediction not in (None, "eps", "v"):
        raise InputError(f"prediction={prediction!r} is not known; use 'eps' or 'v'")
    fmt = source_format(path)
    if fmt == "ldm":
        if prediction:
            raise InputError(
                f"{path} is an ldmkit checkpoint, which records its parameterisation; leave prediction unset for it"
            )
        return read_ldm(path)
    if fmt == "diffusers":
        return read_pipeline(path, prediction=prediction, unsafe_pickle=unsafe_pickle)
    return read_single_file(path, unsafe_pickle=unsafe_pickle, prediction=prediction, heads=heads)


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    unsafe_pickle: bool = False,
    prediction: str | None = None,
    to: str | None = None,
    heads=None,
    overwrite: bool = False,
    base: str | Path | None = None,
) -> Path:
    """Convert a model between ldmkit's "ldm" checkpoint, a diffusers pipeline folder and an SD single file.

    unsafe_pickle: allow reading a .ckpt pickle (torch.load(weights_only=True)); prediction: "eps" or "v" for
    foreign sources (default from the scheduler config, or by SD version for single files); to: "ldm",
    "diffusers" or "single-file" when the destination path does not say; heads: U-Net attention heads for a
    single file that is neither SD 1.x nor 2.x; overwrite: replace an existing destination (a folder is
    replaced component by component); base: for a ControlNet, the model it was made for (any format), whose U-Net
    configuration a foreign single file lacks and whose SHA-256 an ldmkit ControlNet file records. Returns the
    written path.
    """
    control = controlnet_format(src, unsafe_pickle)
    src_fmt = control or source_format(src)
    dst_fmt = destination_format(dst, src_fmt, to)
    if Path(src).resolve() == Path(dst).resolve():
        raise InputError(f"source and destination are the same path ({dst}); write to a new path")
    if Path(dst).exists() and not overwrite and not (Path(dst).is_dir() and not any(Path(dst).iterdir())):
        raise OutputExistsError(f"{dst} already exists; choose a new path or pass overwrite=True (--overwrite)")
    if control:
        if prediction:
            raise InputError(f"{src} is a ControlNet, which has no prediction type; drop --prediction")
        model = read_model(base, unsafe_pickle=unsafe_pickle) if base else None
        unet = model.run.unet if model else None
        sha = model_sha256(base) if base else None
        base_unet = None
        if control == "ldm" and is_low_rank(src):  # its copy is rebuilt on the base model's U-Net
            if model is None:
                raise InputError(
                    f"{src} is a low-rank ControlNet: its copy is rebuilt from the U-Net of the model it was made "
                    f"for; pass that model with --base MODEL"
                )
            base_unet = UNet(model.run.unet)
            checkpoint.load_state(base_unet, model.unet, base, "U-Net")
        return convert_controlnet(
            src, control, dst, dst_fmt, unet=unet, heads=heads, unsafe_pickle=unsafe_pickle, base_sha256=sha,
            base_unet=base_unet,
        )  # fmt: skip
    if base:
        raise InputError(f"--base names the model a ControlNet was made for; {src} is a model, so drop --base")
    w = read_any(src, unsafe_pickle=unsafe_pickle, prediction=prediction, heads=heads)
    writers = {"ldm": write_ldm, "diffusers": write_pipeline, "single-file": write_single_file}
    return writers[dst_fmt](dst, w)
