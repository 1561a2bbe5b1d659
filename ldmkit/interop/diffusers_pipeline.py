"""diffusers pipeline folders (model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/) <-> `ModelWeights`.

Read and written without importing diffusers. The tokenizer is never read (ldmkit tokenizes with its own CLIP
tokenizer); it is written from ldmkit's CLIP vocabulary when open-clip-torch is installed, so that
`StableDiffusionPipeline.from_pretrained(folder)` works on an exported folder.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointError
from ..conditioning.clip import clip_config
from ..conditioning.clip_tokenizer import END, START, CLIPTokenizer
from ..config import DiffusionConfig, UpscaleConfig
from ..errors import InputError
from . import keymaps
from .bundle import ModelWeights
from .diffusers import WEIGHTS_STEM, unet_state_from_diffusers, vae_state_from_diffusers, versioned_config
from .diffusers_config import (
    diffusion_config_from_scheduler,
    diffusion_config_to_scheduler,
    unet_config_to_diffusers,
    upscale_config_from_scheduler,
    upscale_config_to_scheduler,
    vae_config_to_diffusers,
)
from .files import read_json, read_model_folder, write_json, write_model_folder

INDEX = "model_index.json"
EXTRA = "_ldmkit"  # model_index.json entry with what diffusers has no place for (class names)


def is_pipeline_folder(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def read_pipeline(folder: str | Path, *, prediction: str | None = None, unsafe_pickle: bool = False) -> ModelWeights:
    """A diffusers Stable Diffusion pipeline folder -> ModelWeights (validated).

    prediction: "eps" or "v" overrides the scheduler's prediction_type (a folder without a scheduler is eps).
    """
    folder = Path(folder)
    index = read_json(folder / INDEX)
    for part in ("unet", "vae"):
        if not (folder / part).is_dir():
            raise CheckpointError(f"{folder} has a {INDEX} but no {part}/ folder; is the pipeline complete?")
    config, state, path = read_model_folder(folder / "unet", WEIGHTS_STEM, unsafe_pickle=unsafe_pickle)
    unet_cfg, unet = unet_state_from_diffusers(config, state, str(path))
    sample_size = config.get("sample_size")
    config, state, path = read_model_folder(folder / "vae", WEIGHTS_STEM, unsafe_pickle=unsafe_pickle)
    ae_cfg, ae = vae_state_from_diffusers(config, state, str(path))
    text_cfg = text = None
    if (folder / "text_encoder").is_dir():
        text_cfg, text = read_text_encoder(folder / "text_encoder", unsafe_pickle=unsafe_pickle)
    sched = folder / "scheduler" / "scheduler_config.json"
    diffusion = (
        diffusion_config_from_scheduler(read_json(sched), prediction)
        if sched.is_file()
        else DiffusionConfig(parameterisation=prediction or "eps")
    )
    extra = index.get(EXTRA) or {}
    resolution = extra.get("resolution") or (int(sample_size) * ae_cfg.factor if isinstance(sample_size, int) else 512)
    task, upscale = extra.get("task", "generate"), UpscaleConfig()  # an ldmkit-trained inpainting model keeps its task
    low_res = folder / "low_res_scheduler" / "scheduler_config.json"
    if low_res.is_file() or index.get("_class_name") == "StableDiffusionUpscalePipeline":
        if not low_res.is_file():
            raise CheckpointError(f"{folder} is an upscale pipeline without low_res_scheduler/scheduler_config.json")
        factor = (extra.get("upscale") or {}).get("factor", ae_cfg.factor)  # SD x4: the VAE's factor, 4
        task = "upscale"
        upscale = upscale_config_from_scheduler(read_json(low_res), index.get("max_noise_level", 350), factor)
        if extra.get("upscale"):
            upscale = replace(upscale, noise_level=extra["upscale"].get("noise_level", upscale.noise_level))
    return ModelWeights(
        unet_cfg,
        unet,
        ae_cfg,
        ae,
        diffusion,
        resolution,
        text_cfg,
        text,
        tuple(extra.get("class_names", ())),
        str(folder),
        task=task,
        upscale=upscale,
    ).validate()


def read_text_encoder(folder: str | Path, *, unsafe_pickle: bool = False) -> tuple[dict[str, Any], dict]:
    """A transformers CLIPTextModel folder -> (CLIPTextConfig dict, text_model.* weights)."""
    config, state, path = read_model_folder(folder, "model", unsafe_pickle=unsafe_pickle)
    arch = config.get("architectures") or ["CLIPTextModel"]
    if arch != ["CLIPTextModel"] or config.get("model_type", "clip_text_model") != "clip_text_model":
        raise InputError(f"{path}: the text encoder is a {arch[0]}; ldmkit converts CLIPTextModel (SD 1.x / 2.x) only")
    act = config.get("hidden_act", "quick_gelu")
    try:
        cfg = clip_config(
            config["hidden_size"],
            config["num_hidden_layers"],
            config["num_attention_heads"],
            act,
            config["intermediate_size"],
            config.get("vocab_size", 49408),
            config.get("max_position_embeddings", 77),
        )
    except KeyError as e:
        raise CheckpointError(f"{folder}/config.json lacks {e.args[0]}; is it a CLIPTextConfig?") from None
    state = keymaps.with_text_model_prefix(state)
    state.pop("text_model.embeddings.position_ids", None)
    return cfg, state


def write_pipeline(folder: str | Path, w: ModelWeights) -> Path:
    """ModelWeights -> a diffusers pipeline folder (StableDiffusionPipeline, or ...InpaintPipeline for 9 channels).

    A model without a text encoder (class-conditional or unconditional) gets unet/, vae/ and scheduler/ only.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file; a diffusers pipeline is written to a folder")
    sample = w.resolution // w.ae_config.factor
    write_model_folder(
        folder / "unet",
        WEIGHTS_STEM,
        versioned_config(unet_config_to_diffusers(w.unet_config, sample)),
        keymaps.unet_to_layout(w.unet, w.unet_config, "diffusers"),
    )
    write_model_folder(
        folder / "vae",
        WEIGHTS_STEM,
        versioned_config(vae_config_to_diffusers(w.ae_config, w.resolution)),
        keymaps.vae_to_layout(w.autoencoder, w.ae_config, "diffusers"),
    )
    write_json(
        folder / "scheduler" / "scheduler_config.json", versioned_config(diffusion_config_to_scheduler(w.diffusion))
    )
    index: dict[str, Any] = {
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        EXTRA: {"resolution": w.resolution, "class_names": list(w.class_names), "task": w.task},
    }
    if w.task == "upscale":
        write_json(
            folder / "low_res_scheduler" / "scheduler_config.json",
            versioned_config(upscale_config_to_scheduler(w.upscale)),
        )
        index["low_res_scheduler"] = ["diffusers", "DDPMScheduler"]
        index["max_noise_level"] = w.upscale.max_noise_level
        index[EXTRA]["upscale"] = {"factor": w.upscale.factor, "noise_level": w.upscale.noise_level}
    if w.text is not None:
        config = {**w.text_config, "torch_dtype": "float32"}
        write_model_folder(folder / "text_encoder", "model", config, w.text)
        index["text_encoder"] = ["transformers", "CLIPTextModel"]
        if write_tokenizer(folder / "tokenizer", w.text_config):
            index["tokenizer"] = ["transformers", "CLIPTokenizer"]
        index.update(
            safety_checker=[None, None],
            feature_extractor=[None, None],
            requires_safety_checker=False,
            _class_name=pipeline_class(w),
        )
    else:
        index["_class_name"] = "DiffusionPipeline"
    write_json(folder / INDEX, versioned_config(index))
    return folder


def pipeline_class(w: ModelWeights) -> str:
    """The diffusers pipeline that runs a text model: the upscale, inpainting (9 channels) or plain one."""
    if w.task == "upscale":
        return "StableDiffusionUpscalePipeline"
    return "StableDiffusionInpaintPipeline" if w.unet_config.in_channels == 9 else "StableDiffusionPipeline"


def write_tokenizer(folder: Path, text_config: dict[str, Any]) -> bool:
    """transformers CLIPTokenizer files (vocab.json, merges.txt) from ldmkit's CLIP vocabulary; False (with a
    warning) when that vocabulary is not installed."""
    try:
        tok = CLIPTokenizer()
    except (ImportError, FileNotFoundError, OSError) as e:
        warnings.warn(
            f"no tokenizer/ written ({e}); install open-clip-torch (--no-deps), ftfy and regex to add it", stacklevel=2
        )
        return False
    names = {START: "<|startoftext|>", END: "<|endoftext|>"}
    vocab = {names.get(t, t): i for i, t in enumerate(tok.tokens)}
    merges = [f"{a} {b}" for (a, b), _ in sorted(tok.ranks.items(), key=lambda kv: kv[1])]
    pad = "<|endoftext|>" if text_config["hidden_act"] == "quick_gelu" else "!"  # SD 1.x / SD 2.x padding
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad,
    }
    write_json(folder / "special_tokens_map.json", special)
    write_json(
        folder / "tokenizer_config.json",
        {
            **special,
            "tokenizer_class": "CLIPTokenizer",
            "do_lower_case": True,
            "model_max_length": text_config["max_position_embeddings"],
            "errors": "replace",
            "add_prefix_space": False,
        },
    )
    return True
