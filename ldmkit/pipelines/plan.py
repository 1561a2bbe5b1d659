"""The plan of a request against a model, and the loop every pipeline shares: check labels, prompts and size before
any sampling (plan), build each batch's conditions and generators (request_batches), draw its latents through the
one sampling driver (draw: diffusion.sample.sample_latents), and name the options to suspect when sampling produces
non-finite values (blame_options, in one place)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from ..conditioning.types import Conditioning
from ..config import check_multiple
from ..denoisers import backbone_name
from ..diffusion.sample import sample_latents, start_index
from ..errors import InputError, NonFiniteError
from ..ldm import LatentDiffusion
from ..noise import Generators, generators_from_seed
from ..runtime import sampling_autocast
from .lora import request_loras
from .openvino import openvino_denoiser
from .request import SampleRequest

UNCONDITIONAL = "unconditional"  # the caption of an image drawn without a label (label -1)


def _labels_for(ldm: LatentDiffusion, req: SampleRequest) -> list[int] | None:
    if not ldm.num_classes:
        if req.labels:
            raise InputError("this model is not class-conditional; drop --label")
        return None
    base = req.labels or list(range(ldm.num_classes))
    return [base[i % len(base)] for i in range(req.n)]


def resolution(ldm: LatentDiffusion, req: SampleRequest) -> tuple[int, int]:
    res = ldm.run.data.resolution
    h, w = req.height or res, req.width or res
    why = f"the autoencoder downsamples by {ldm.factor}, then the {backbone_name(ldm.run)} by {ldm.run.backbone.factor}"
    for name, v in (("--height", h), ("--width", w)):
        check_multiple(name, v, ldm.factor * ldm.run.backbone.factor, why)
    return h, w


@dataclass(frozen=True)
class Plan:
    labels: list[int] | None  # one per image
    prompts: list[str] | None  # one per image
    height: int
    width: int


def plan(ldm: LatentDiffusion, req: SampleRequest) -> Plan:
    """The request checked against the model before any sampling: labels in range and only for class models,
    prompts only for text models, a size the model can sample."""
    labels = _labels_for(ldm, req)
    if labels is not None:
        ldm.conditioning(labels=sorted(set(labels)))  # InputError naming the classes for a label out of range
    prompts = req.prompts
    if prompts is not None:
        prompts = [prompts[i % len(prompts)] for i in range(req.n)]
        if ldm.text_encoder is None:
            ldm.conditioning(prompts=sorted(set(prompts)))  # InputError: this model takes no prompt
    return Plan(labels, prompts, *resolution(ldm, req))


def caption_of(ldm: LatentDiffusion, label: int) -> str:
    return UNCONDITIONAL if label < 0 else ldm.class_names[label] if label < len(ldm.class_names) else str(label)


def blame_options(ldm: LatentDiffusion, req: SampleRequest, err: NonFiniteError) -> NonFiniteError:
    """The sampler's non-finite error with the likely cause named in the options of the command."""
    where = f"step {err.step} of {err.steps}" if hasattr(err, "step") else "some step"
    weights = (
        f"the weights of {ldm.source} are finite (checked when loaded), so the options are the likely cause"
        if ldm.source is not None
        else "check that the model's weights are finite, and the options"
    )
    eta = f", --eta {req.eta}" if req.eta is not None else ""
    return NonFiniteError(
        f"sampling produced NaN or infinite values at {where} with --cfg {req.cfg}, "
        f"--guidance-rescale {req.cfg_rescale}{eta}, --sampler {req.sampler}; {weights}: lower "
        f"--cfg, or try another --sampler"
    )


def draw(
    ldm: LatentDiffusion,
    req: SampleRequest,
    shape: tuple[int, ...],
    cond: Conditioning,
    uncond: Conditioning | None,
    generators: Generators,
    callback: Callable | None = None,
    denoiser=None,
    **options,
) -> torch.Tensor:
    """Latents of `shape` (B, c, h, w) drawn with the request's sampling options (sampler, steps, guidance, eta),
    one generator per image: the call every pipeline makes. options: what the pipeline adds or overrides (a start
    image and its strength, kept latents, a per-image guidance tensor); denoiser: a wrapped denoiser (tiling),
    default the model's. A NonFiniteError comes back naming the command's options to change (blame_options). The
    sampling steps run under the request's precision (runtime.sampling_autocast; fp32: no autocast); decoding
    after them stays float32. The request's LoRAs (req.loras) are hooked into the backbone, unmerged, for these
    steps alone (pipelines/lora.py: request_loras); a caller that hooks per-image LoRAs itself passes none. With
    req.backend "openvino" the backbone runs in OpenVINO (pipelines/openvino.py)."""
    denoiser = denoiser if denoiser is not None else ldm.denoiser
    if req.backend == "openvino":
        denoiser = openvino_denoiser(ldm, denoiser, req.precision)
    try:
        with request_loras(ldm, req.loras), sampling_autocast(req.precision, ldm.device):
            z = sample_latents(
                denoiser,
                shape,
                cond,
                uncond,
                generator=generators,
                device=ldm.device,
                callback=callback,
                **(req.sampling() | options),
            )
        return z.float()
    except NonFiniteError as err:
        raise blame_options(ldm, req, err) from None


def wrong_task(ldm: LatentDiffusion, command: str) -> InputError:
    """The error for a model given to a command that cannot use it, naming the model's task and the commands that
    can (ldmkit/tasks/)."""
    return ldm.task_spec.wrong_command(ldm.source or "this model", command)


def check_samples_from_noise(ldm: LatentDiffusion, command: str = "generate") -> None:
    """InputError, naming the model's task, for a model whose denoiser needs more than the latent (an inpainting
    model takes a mask and a masked image, an upscaler a low-resolution image): generate, sample and img2img cannot
    give it those."""
    ldm.task_spec.check_from_noise(ldm, command)


@torch.no_grad()
def latent_batches(
    ldm: LatentDiffusion,
    req: SampleRequest,
    p: Plan,
    progress: bool = False,
    init: Callable[[int, int], torch.Tensor] | None = None,
    strength: float = 1.0,
    command: str = "generate",
    share: range | None = None,
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """(latents (b, c, h, w), a caption per image) for each batch of req.batch_size images of the checked plan `p`;
    image i always uses seed + i. init(s, e): the clean latents (e - s, c, h, w) that images s..e-1 start from at
    `strength` (img2img); None: pure noise. progress: a bar on stderr over images x sampler steps. command:
    the command named when the model cannot sample from noise (an inpainting model, an upscaler). share: the images
    to draw (a block of 0..n-1: a rank's under torchrun), default all."""
    check_samples_from_noise(ldm, command)
    shape = (ldm.latent_channels, p.height // ldm.factor, p.width // ldm.factor)
    steps = req.steps if init is None else req.steps - start_index(req.steps, strength)  # the steps img2img runs
    desc = "sampling" if init is None else "editing"
    for b in request_batches(ldm, req, p, desc, progress, share=share, steps=steps):
        start = {} if init is None else {"init": init(b.start, b.end), "strength": strength}
        yield draw(ldm, req, (b.size, *shape), b.cond, b.uncond, b.generators, b.tick, **start), b.captions


@dataclass(frozen=True)
class Batch:
    """One batch of a request: images start..end-1, their conditions and captions, one generator per image."""

    start: int
    end: int
    cond: Conditioning
    uncond: Conditioning  # the guidance's unconditional branch (the negative prompt, or no label / prompt)
    captions: list[str]
    generators: Generators  # image i's is seeded seed + i, whatever the batch size
    tick: Callable | None = None  # a sampler callback (i, x, x0, sigma) that moves the progress bar one step on

    @property
    def size(self) -> int:
        return self.end - self.start


def request_batches(
    ldm: LatentDiffusion,
    req: SampleRequest,
    p: Plan,
    desc: str,
    progress: bool = False,
    quiet: bool = False,
    share: range | None = None,
    steps: int = 0,
    tiles: int = 1,
) -> Iterator[Batch]:
    """The batches of req.batch_size images of the checked plan `p`, every pipeline's loop: conditions from the
    plan's labels or prompts, and a progress bar `desc` on stderr when `progress` (and not quiet). steps: the
    sampler steps each image takes (RePaint's whole walk, img2img's share of the grid); the bar then counts images
    x tiles x steps, moved on by each batch's `tick` (pass it as the sampler's callback), with an estimate of the
    time left. steps=0: a bar over images, shown when there is more than one batch. share: only these images (a
    block of 0..n-1), numbered as in the whole request: the same seeds, labels and prompts, so a rank's share is
    those images of one process. The conditions are computed under the request's LoRAs (those with text-encoder
    layers change them), as draw() samples under them."""
    share = share if share is not None else range(req.n)
    n = len(share)
    bar = _progress_bar(desc, n, steps, tiles, quiet or not progress or (not steps and n <= req.batch_size))
    with bar:
        for s in range(share.start, share.stop, req.batch_size):
            e = min(share.stop, s + req.batch_size)
            lab = p.labels[s:e] if p.labels is not None else None
            pr = p.prompts[s:e] if p.prompts is not None else None
            with request_loras(ldm, req.loras):  # on the text encoder too
                cond = ldm.conditioning(labels=lab, prompts=pr, n=e - s)
                uncond = ldm.null_conditioning(e - s, [req.negative_prompt] * (e - s) if req.negative_prompt else None)
            captions = [caption_of(ldm, int(label)) for label in lab] if lab is not None else (pr or [""] * (e - s))
            gens = generators_from_seed(req.seed + s, e - s)
            tick = (lambda *_, k=(e - s) * tiles: bar.update(k)) if steps else None
            yield Batch(s, e, cond, uncond, captions, gens, tick)
            if not steps:
                bar.update(e - s)


def _progress_bar(desc: str, n: int, steps: int, tiles: int, disable: bool) -> tqdm:
    """A tqdm bar on stderr over n images, or over n x tiles x steps sampler steps (the work, named in `desc`)."""
    if not steps:
        return tqdm(total=n, unit="image", desc=desc, disable=disable)
    work = f"{n} image{'s' if n != 1 else ''}" + (f" x {tiles} tiles" if tiles > 1 else "") + f" x {steps} steps"
    return tqdm(total=n * tiles * steps, unit="step", desc=f"{desc} ({work})", disable=disable)


def collect(batches: Iterable[tuple[torch.Tensor, list[str]]]) -> tuple[torch.Tensor, list[str]]:
    """All batches of (images, captions) as one tensor (n, C, H, W) and one list of captions."""
    images, captions = [], []
    for x, caps in batches:
        images.append(x)
        captions += caps
    return torch.cat(images), captions
