"""Models that ship with ldmkit: where their weights live, how a name resolves, and the half-precision export.

Shipped models are ordinary "ldm" checkpoints stored in half precision under `weights/` at the repository root
(override the folder with the environment variable LDMKIT_WEIGHTS). Each has a model card `weights/NAME.md` and
a sample grid `weights/NAME.png`; the recipe that trains it is `recipes/NAME/`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import checkpoint
from .adapters import load_lora_parts
from .adapters.files import META_KEY
from .config import DenoiserRun, DistillConfig, from_dict
from .errors import InputError, MissingFileError
from .ldm import LatentDiffusion, LdmFile
from .nn.lora import merge
from .tasks import get_task

DEFAULT_MODEL = "emoji"
SHIPPED = {
    "emoji": "text-conditional (MiniLM text encoder), 64x64 emoji, trained on the built-in `emoji` data set",
    "fashion-mnist": "class-conditional (10 classes), 32x32 Fashion-MNIST",
    "fashion-mnist-inpaint": "class-conditional inpainting model (10 classes), 32x32 Fashion-MNIST",
    "emoji-upscale": "4x upscaler, 16x16 -> 64x64 emoji, trained on the built-in `emoji` data set",
    "fashion-mnist-lcm": "4-step LCM-LoRA of fashion-mnist (consistency-distilled; loads as its base, merged)",
    "emoji-lcm": "4-step LCM-LoRA of emoji (consistency-distilled; loads as its base, merged)",
    "emoji-pixel": "pixel-art style LoRA of emoji, an example LoRA (LoCon, rank 4; loads as its base, merged)",
}
# ControlNets that ship (weights/NAME.safetensors beside their card): --control takes the name for the file
CONTROLNETS = {
    "fashion-mnist-mask": "mask ControlNet of fashion-mnist: a garment's outline from a mask (low-rank, rank 16)",
}
# example style LoRAs among them: loaded as a model by name (their base, merged) or applied with --lora, but not
# served as models of their own by default (each would hold a second copy of its base)
STYLE_LORAS = ("emoji-pixel",)
# the models each command uses without --model, first the one whose weights are present
DEFAULTS = {
    "generate": (DEFAULT_MODEL, "fashion-mnist"),
    "inpaint": ("fashion-mnist-inpaint", DEFAULT_MODEL, "fashion-mnist"),
    "upscale": ("emoji-upscale",),
}


def default_model(task: str = "generate", text: bool = False) -> str:
    """The model a command of `task` uses without --model: the first of DEFAULTS[task] whose weights are present
    (generate: emoji, else fashion-mnist; inpaint: fashion-mnist-inpaint, else the generation models, which
    inpaint by the latent blend; upscale: emoji-upscale). text: the first that takes prompts, when one does (a
    prompt given to `inpaint` picks emoji over the class-conditional inpainting model)."""
    names = DEFAULTS[task]
    present = [n for n in names if (weights_dir() / f"{n}.safetensors").is_file()]
    if text:
        texts = [
            n
            for n in present
            if (checkpoint.read_metadata(weights_dir() / f"{n}.safetensors")["config"] or {}).get("text_encoder")
        ]
        present = texts or present
    return present[0] if present else names[0]


def weights_dir() -> Path:
    """The folder of shipped weights: $LDMKIT_WEIGHTS, else `weights/` beside the package."""
    env = os.environ.get("LDMKIT_WEIGHTS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "weights"


def resolve_model(name_or_path: str) -> Path:
    """A shipped model's name or a checkpoint path -> the checkpoint file (clear error when neither exists)."""
    p = Path(name_or_path)
    if p.suffix == ".safetensors" or p.exists():
        if not p.is_file():
            raise MissingFileError(
                f"{p} does not exist; give a model.safetensors from `ldmkit train` or one of "
                f"the shipped models: {', '.join(SHIPPED)}"
            )
        return p
    if name_or_path not in SHIPPED:
        raise InputError(
            f"unknown model {name_or_path!r}; shipped models: {', '.join(SHIPPED)} (or give a path to "
            f"a model.safetensors)"
        )
    return _shipped_file(name_or_path, "model")


def controlnet_file(name: str) -> Path:
    """The file of the shipped ControlNet `name` (MissingFileError saying how to restore it when it is absent)."""
    return _shipped_file(name, "ControlNet")


def _shipped_file(name: str, what: str) -> Path:
    path = weights_dir() / f"{name}.safetensors"
    if not path.is_file():
        raise MissingFileError(
            f"the shipped {what} {name!r} is missing at {path}; restore it with `git checkout -- weights/` or "
            f"train it with `python recipes/build.py {name}`"
        )
    return path


def resolve_control_spec(text: str) -> str:
    """A --control CONTROLNET:IMAGE[...] whose CONTROLNET is a shipped ControlNet's name (and no file of that
    name exists) with the name replaced by its file; any other spec as given."""
    name, sep, rest = text.partition(":")
    if name not in CONTROLNETS or Path(name).exists():
        return text
    return f"{controlnet_file(name)}{sep}{rest}"


# --- a LoRA that names its base is a model of its own (an LCM-LoRA shipped as fashion-mnist-lcm) -------------------
def model_source(path: str | Path) -> tuple[Path, Path | None, dict]:
    """(the ldm file, the LoRA to merge into it or None, the LoRA's description) of a model path. An ldm file is
    itself; a LoRA file ldmkit wrote names the model it was trained on (its `base`: a path, relative to the LoRA's
    folder or as given, or a shipped name), which must still have the SHA-256 the LoRA recorded. So a LoRA that is
    a model of its own (an LCM-LoRA shipped as fashion-mnist-lcm) loads wherever a model does."""
    header = checkpoint.read_header(path)
    if header.get("format") == checkpoint.FORMAT or META_KEY not in header:
        return Path(path), None, {}
    about = json.loads(header[META_KEY])
    base = str(about.get("base") or "")
    if not base:
        raise InputError(f"{path} is a LoRA that names no base model; apply it to its model with --lora {path}")
    here = Path(path).parent / base
    found = here if here.is_file() else resolve_model(base)
    want = about.get("base_sha256")
    if want and checkpoint.file_sha256(found) != want:
        raise InputError(
            f"{path} is a LoRA trained on {base} (SHA-256 {want[:12]}), but {found} is another model; restore that "
            f"model, or retrain the LoRA on this one"
        )
    return Path(found), Path(path), about


def with_distill(run: DenoiserRun, about: dict) -> DenoiserRun:
    """`run` with the distillation a LoRA's description records (an LCM-LoRA makes its base a few-step model)."""
    if not about.get("distill"):
        return run
    return replace(run, distill=from_dict(DistillConfig, about["distill"]))


def model_config(path: str | Path) -> dict:
    """The recorded configuration (a DenoiserRun as a dict) of a model path, an ldm file or a LoRA naming its base,
    without loading tensors."""
    base, _, about = model_source(path)
    config = checkpoint.read_metadata(base).get("config") or {}
    return config | {"distill": about["distill"]} if about.get("distill") else config


def load_model(path: str | Path, device="cpu") -> LatentDiffusion:
    """The model at `path` in eval mode: an ldm file (LatentDiffusion.load), or a LoRA that names its base, loaded
    as the base with the LoRA merged at scale 1 and the LoRA's distillation (its sampler and steps) recorded."""
    base, lora, about = model_source(path)
    ldm = LatentDiffusion.load(base, device)
    if lora is None:
        return ldm
    on_unet, on_text = load_lora_parts(lora, ldm.unet, ldm.text_encoder)
    merge(ldm.unet, on_unet.to(ldm.device))
    if on_text is not None:
        merge(ldm.text_encoder, on_text.to(ldm.device))
    return replace(ldm, run=with_distill(ldm.run, about), source=Path(path))


@dataclass(frozen=True)
class GenerationPlan:
    """What `ldmkit generate` runs."""

    checkpoint: Path  # the resolved model file
    prompts: list[str] | None  # one prompt per image (each given prompt repeated n times); None for class models
    n: int  # images in all
    out: Path  # the PNG to write


def plan_generation(
    model: str | None,
    prompts: list[str],
    labels: list[int] | None,
    n: int,
    out: str | Path | None = None,
    task: str = "generate",
) -> GenerationPlan:
    """A shipped model's name (default: `default_model(task)`) or a checkpoint path, prompts or labels, and n images
    per prompt -> the checkpoint, one prompt per image and the output (default generated/PROMPT.png).

    Prompts go to text models only: given to a class model they are refused with its class list.
    """
    model = model or default_model(task, text=bool(prompts))
    path = resolve_model(model)
    if prompts and labels is not None:
        raise InputError("give prompts (text models) or --label (class models), not both")
    if prompts:
        meta = model_config(path)  # a LoRA that is a model (emoji-pixel): its base's configuration
        task = get_task(meta.get("task", "generate"), key=f"{model}'s task")
        if not meta.get("text_encoder") and not task.user_labels:  # e.g. an upscaler: no labels to suggest either
            what = task.summary.split(" ", 1)[-1]  # "an upscaler" -> "upscaler"
            raise InputError(f"the {what} {model!r} is not text-conditional, so it takes no prompt; drop --prompt")
        if not meta.get("text_encoder"):
            names = ", ".join(f"{i}={c}" for i, c in enumerate(meta.get("class_names", [])))
            raise InputError(
                f"the model {model!r} is not text-conditional, so it takes no prompt; use --label N"
                f" ({names or 'unconditional: no label'}). Prompts need a text model such as emoji "
                f"(python recipes/build.py emoji trains it)"
            )
    slug = re.sub(r"[^a-z0-9]+", "-", (prompts[0] if prompts else model).lower()).strip("-")[:40] or "image"
    return GenerationPlan(
        checkpoint=path,
        prompts=[p for p in prompts for _ in range(n)] if prompts else None,
        n=n * len(prompts) if prompts else n,
        out=Path(out) if out else Path("generated") / f"{slug}.png",
    )


def export_half(src: str | Path, dst: str | Path) -> Path:
    """Copy an "ldm" checkpoint with its floating-point tensors in float16 (loading casts them back to float32).

    The autoencoder is decoded in float32 at run time, so half-precision storage does not bring fp16 overflow.
    """
    f = LdmFile.read(src)

    def half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}

    return replace(
        f,
        unet=half(f.unet),
        autoencoder=half(f.autoencoder),
        text=half(f.text),
        extra={**f.extra, "stored_dtype": "float16"},
    ).write(dst)
