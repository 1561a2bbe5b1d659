"""Models that ship with ldmkit: where their weights live, how a name resolves, and the half-precision export.

Shipped models are ordinary "ldm" checkpoints stored in half precision under `weights/` at the repository root
(override the folder with the environment variable LDMKIT_WEIGHTS). Each has a model card `weights/NAME.md` and
a sample grid `weights/NAME.png`; the recipe that trains it is `recipes/NAME/`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import checkpoint
from .errors import InputError, MissingFileError
from .ldm import LdmFile
from .tasks import get_task

DEFAULT_MODEL = "emoji"
SHIPPED = {
    "emoji": "text-conditional (MiniLM text encoder), 64x64 emoji, trained on the built-in `emoji` data set",
    "fashion-mnist": "class-conditional (10 classes), 32x32 Fashion-MNIST",
    "fashion-mnist-inpaint": "class-conditional inpainting model (10 classes), 32x32 Fashion-MNIST",
    "emoji-upscale": "4x upscaler, 16x16 -> 64x64 emoji, trained on the built-in `emoji` data set",
}
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
    path = weights_dir() / f"{name_or_path}.safetensors"
    if not path.is_file():
        raise MissingFileError(
            f"the shipped model {name_or_path!r} is missing at {path}; restore it with "
            f"`git checkout -- weights/` or train it with `python recipes/build.py {name_or_path}`"
        )
    return path


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
        meta = checkpoint.read_metadata(path)["config"]
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
