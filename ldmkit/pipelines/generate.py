"""Generation from labels or prompts: each batch of a request's plan drawn and decoded (generate_batches), and
written as image files with their parameters (generate_to_file).

Everything that can be checked is checked before the first sampling step: the request's numbers where it is built
(SampleRequest, declared with the parameter table in pipelines/request.py), labels, prompts and size against the
model (pipelines/plan.py), and the output path (pipelines/output.py). After the expensive work only writing
remains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from ..data.images import Sign
from ..distributed import World
from ..ldm import LatentDiffusion
from .control import ControlSpec, apply_controls, control_record
from .lora import LoRASpec, apply_embeddings, apply_loras, check_loras, embedding_record, lora_record
from .output import Finish, Target, write_batches
from .plan import collect, latent_batches, plan
from .request import SampleRequest


def generate_batches(
    ldm: LatentDiffusion, req: SampleRequest, progress: bool = False, share: range | None = None
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """(images (b, C, H, W) in [-1, 1] on the CPU, a caption per image) for each batch of req.batch_size images.
    The request is checked against the model before the first batch; image i always uses seed + i. progress: a
    progress bar on stderr over images x sampler steps, with the time left (off by default: library callers have
    their own; the command line turns it on). share: only these images (see request_batches)."""
    for z, captions in latent_batches(ldm, req, plan(ldm, req), progress, share=share):
        yield ldm.decode(z).cpu(), captions


def generate(ldm: LatentDiffusion, req: SampleRequest, progress: bool = False) -> tuple[torch.Tensor, list[str]]:
    """Images (n, C, H, W) in [-1, 1] and a caption per image (see generate_batches)."""
    return collect(generate_batches(ldm, req, progress))


def generate_to_file(
    checkpoint: str | Path,
    req: SampleRequest,
    out: str | Path | Target,
    grid: bool = True,
    progress: bool = True,
    finish: Finish | None = None,
    sign: Sign | None = None,
    world: World | None = None,
    controls: list[ControlSpec] | None = None,
    loras: list[LoRASpec] | None = None,
    lora_merge: bool = False,
    embeddings: list[tuple[str, str | None]] | None = None,
) -> list[Path]:
    """Generate and write a labelled grid image (.png, .jpg, .jpeg or .webp, as `out` names it; a single image is
    written as itself) or, with grid=False, one PNG per image into the folder `out`, with the parameters embedded.
    `out` may be a pipelines.output.Target, which says whether an existing file is replaced. The output, the model
    and the request are all checked before sampling; progress: a bar over images x sampler steps.
    sign: content
    credentials for every file written (PNG only). world: under torchrun, the ranks share the images (see
    write_batches); every rank calls this with the same arguments, its own device in req.device. controls:
    ControlNets that steer the model (pipelines/control.py), each recorded in the images' parameters. loras: LoRAs
    on the model (pipelines/lora.py), unmerged, or merged into its weights with lora_merge. embeddings: (file,
    token or None) textual-inversion words added to the model's text encoder, each recorded with its SHA-256."""
    check_loras(loras or [])

    def batches(ldm: LatentDiffusion, share: range):
        if embeddings:
            apply_embeddings(ldm, embeddings)
        if loras:
            apply_loras(ldm, loras, lora_merge)
        if controls:
            p = plan(ldm, req)
            apply_controls(ldm, controls, (p.height, p.width), req.steps)
        return generate_batches(ldm, req, progress, share)

    extra = {"controls": control_record(controls)} if controls else None
    if loras:
        extra = (extra or {}) | {"loras": lora_record(loras, lora_merge, req.loras)}
    if embeddings:
        extra = (extra or {}) | {"embeddings": embedding_record(embeddings)}  # a bad file: refused before loading
    return write_batches(checkpoint, req, out, batches, grid, extra, finish=finish, sign=sign, world=world)
