"""DreamBooth's class images: what the base model draws for the class prompt, kept to preserve that prior while the
model learns the instance (Ruiz et al. 2023). `ldmkit train --dreambooth --class-prompt ...` draws them here, before
the run: training never calls pipelines.

They are cached under $LDMKIT_CACHE/dreambooth/<model SHA-256>-<prompt SHA-256>, so every run on the same model and
prompt shares them. Image i is drawn from seed i (alone or batched, the same image), each written whole (a
temporary file, then renamed), so a run killed while drawing leaves only finished images and the next one draws the
rest. A run that asks for more images than are cached draws the missing ones only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tqdm.auto import tqdm

from ..checkpoint import file_sha256
from ..data.common import cache_home
from ..data.images import to_pil
from ..errors import InputError
from ..runtime import resolve_device
from ..shipped import load_model
from .batching import generate_together
from .request import SampleRequest

BATCH = 8  # images drawn at once


def class_folder(model: str | Path, prompt: str, root: str | Path | None = None) -> Path:
    """The cache folder of the class images of `model` (by its SHA-256) and `prompt`."""
    key = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]
    return Path(root or cache_home() / "dreambooth") / f"{file_sha256(model)[:16]}-{key}"


def class_images(
    model: str | Path,
    prompt: str,
    count: int,
    steps: int = 25,
    cfg: float = 5.0,
    device: str = "auto",
    root: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """The folder holding `count` images `model` draws for `prompt` (00000.png, ...; more may be there), drawing
    those the cache lacks. InputError for an empty prompt or a model that reads no prompts."""
    if not prompt.strip():
        raise InputError("--class-prompt is empty; describe the class, e.g. 'a photo of a toy'")
    folder = class_folder(model, prompt, root)
    missing = [i for i in range(count) if not (folder / f"{i:05d}.png").is_file()]
    if not missing:
        return folder
    ldm = load_model(model, resolve_device(device, "--device"))
    if ldm.text_encoder is None:
        raise InputError(f"{model} reads no prompts; DreamBooth needs a text-to-image model to --init from")
    folder.mkdir(parents=True, exist_ok=True)
    about = {"model": str(model), "model_sha256": file_sha256(model), "prompt": prompt, "steps": steps, "cfg": cfg}
    (folder / "about.json").write_text(json.dumps(about, indent=2))
    with tqdm(total=len(missing), unit="image", desc="class images", disable=not progress) as bar:
        for s in range(0, len(missing), BATCH):
            seeds = missing[s : s + BATCH]
            reqs = [SampleRequest(n=1, prompts=[prompt], seed=i, steps=steps, cfg=cfg) for i in seeds]
            for i, images in zip(seeds, generate_together(ldm, reqs, BATCH)):
                tmp = folder / f".{i:05d}.png.tmp"
                to_pil(images[0]).save(tmp, format="PNG")
                os.replace(tmp, folder / f"{i:05d}.png")  # whole or absent, whenever the run is killed
                bar.update(1)
    return folder
