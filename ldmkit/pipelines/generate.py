"""Generation from labels or prompts: conditioning, guided sampling in batches, decoding, image files with parameters.

Everything that can be checked is checked before the first sampling step: the request's numbers where it is built
(SampleRequest, declared with the parameter table in pipelines/request.py), labels, prompts and size against the
model (plan), and the output path (check_output). After the expensive work only writing remains.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..checkpoint import check_output_path
from ..conditioning.types import Conditioning
from ..config import check_multiple
from ..data.images import BOX_KEYS, Sign, check_writable, grid_layout, save_grid, to_pil, to_tensor, write_image
from ..denoisers import backbone_name
from ..diffusion.sample import sample_latents, start_index
from ..distributed import World
from ..errors import InputError, NonFiniteError, OutputWriteError
from ..ldm import LatentDiffusion
from ..noise import Generators, generators_from_seed
from ..runtime import resolve_device
from .control import ControlSpec, apply_controls, control_record
from .lora import LoRASpec, apply_loras, check_loras, lora_record
from .output import Target, as_target, claim
from .record import model_record
from .request import ETA_SAMPLERS, MAX_STEPS, SEED_END, SampleRequest, whole_number  # noqa: F401 (re-exported)

UNCONDITIONAL = "unconditional"  # the caption of an image drawn without a label (label -1)
WITHHELD_GREY = 128  # the tile a grid shows where an image was withheld

# What happens to images between sampling and their file (the commands' governance screen): finish(images, index of
# the first) -> for each image what to write (None: nothing, it was withheld) and facts to embed with its parameters.
Finish = Callable[[list[Image.Image], int], list[tuple[Image.Image | None, dict]]]


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
class _Plan:
    labels: list[int] | None  # one per image
    prompts: list[str] | None  # one per image
    height: int
    width: int


def plan(ldm: LatentDiffusion, req: SampleRequest) -> _Plan:
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
    return _Plan(labels, prompts, *resolution(ldm, req))


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
    p: _Plan,
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
        try:
            z = sample_latents(
                ldm.denoiser,
                (b.size, *shape),
                b.cond,
                b.uncond,
                generator=b.generators,
                device=ldm.device,
                callback=b.tick,
                **start,
                **req.sampling(),
            )
        except NonFiniteError as err:
            raise blame_options(ldm, req, err) from None
        yield z, b.captions


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
    p: _Plan,
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
    those images of one process."""
    share = share if share is not None else range(req.n)
    n = len(share)
    bar = _progress_bar(desc, n, steps, tiles, quiet or not progress or (not steps and n <= req.batch_size))
    with bar:
        for s in range(share.start, share.stop, req.batch_size):
            e = min(share.stop, s + req.batch_size)
            lab = p.labels[s:e] if p.labels is not None else None
            pr = p.prompts[s:e] if p.prompts is not None else None
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


def generate_batches(
    ldm: LatentDiffusion, req: SampleRequest, progress: bool = False, share: range | None = None
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """(images (b, C, H, W) in [-1, 1] on the CPU, a caption per image) for each batch of req.batch_size images.
    The request is checked against the model before the first batch; image i always uses seed + i. progress: a
    progress bar on stderr over images x sampler steps, with the time left (off by default: library callers have
    their own; the command line turns it on). share: only these images (see request_batches)."""
    for z, captions in latent_batches(ldm, req, plan(ldm, req), progress, share=share):
        yield ldm.decode(z).cpu(), captions


def collect(batches: Iterable[tuple[torch.Tensor, list[str]]]) -> tuple[torch.Tensor, list[str]]:
    """All batches of (images, captions) as one tensor (n, C, H, W) and one list of captions."""
    images, captions = [], []
    for x, caps in batches:
        images.append(x)
        captions += caps
    return torch.cat(images), captions


def generate(ldm: LatentDiffusion, req: SampleRequest, progress: bool = False) -> tuple[torch.Tensor, list[str]]:
    """Images (n, C, H, W) in [-1, 1] and a caption per image (see generate_batches)."""
    return collect(generate_batches(ldm, req, progress))


def check_output(out: str | Path, folder: bool, metadata: dict[str, str] | None = None, signed: bool = False) -> Path:
    """Refuse, before any work, an output the writing would fail on: a file name without an extension or with one
    ldmkit does not write (or parameters a JPEG cannot hold, or a signature a format other than PNG cannot), a
    folder where a file is expected or the reverse, a parent folder that cannot be created or written. folder:
    `out` is a folder of PNGs (--separate) rather than one image file."""
    out = Path(out)
    if not folder:
        if not out.suffix:
            raise InputError(
                f"--out {out} has no extension, so it names no image format; write {out}.png, or end it in one of "
                f".png, .jpg, .jpeg, .webp"
            )
        check_writable(out, metadata, signed)
    return check_output_path(out, "--out", folder=folder)


def write_or_rescue(write, out: Path) -> Path:
    """write(out); when that fails (a full disk, a folder removed meanwhile) write to a temporary file instead and
    raise the error naming it, so sampled images are never lost."""
    try:
        return write(out)
    except OSError as e:
        fd, rescue = tempfile.mkstemp(prefix="ldmkit-rescued-", suffix=out.suffix)
        os.close(fd)
        try:
            write(Path(rescue))
        except OSError:
            os.unlink(rescue)
            raise e from None
        raise OutputWriteError(
            e.errno, f"could not write {out} ({e.strerror or e}); the images were saved to {rescue} instead"
        ) from e


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
) -> list[Path]:
    """Generate and write a labelled grid image (.png, .jpg, .jpeg or .webp, as `out` names it; a single image is
    written as itself) or, with grid=False, one PNG per image into the folder `out`, with the parameters embedded.
    `out` may be a pipelines.output.Target, which says whether an existing file is replaced. The output, the model
    and the request are all checked before sampling; progress: a bar over images x sampler steps.
    sign: content
    credentials for every file written (PNG only). world: under torchrun, the ranks share the images (see
    write_batches); every rank calls this with the same arguments, its own device in req.device. controls:
    ControlNets that steer the model (pipelines/control.py), each recorded in the images' parameters. loras: LoRAs
    on the model (pipelines/lora.py), unmerged, or merged into its weights with lora_merge."""
    check_loras(loras or [])

    def batches(ldm: LatentDiffusion, share: range):
        if loras:
            apply_loras(ldm, loras, lora_merge)
        if controls:
            p = plan(ldm, req)
            apply_controls(ldm, controls, (p.height, p.width), req.steps)
        return generate_batches(ldm, req, progress, share)

    extra = {"controls": control_record(controls)} if controls else None
    if loras:
        extra = (extra or {}) | {"loras": lora_record(loras, lora_merge)}
    return write_batches(checkpoint, req, out, batches, grid, extra, finish=finish, sign=sign, world=world)


def write_batches(
    checkpoint: str | Path,
    req: SampleRequest,
    out: str | Path | Target,
    batches: Callable[[LatentDiffusion, range], Iterable[tuple[torch.Tensor, list[str]]]],
    grid: bool = True,
    extra: dict | None = None,
    finish: Finish | None = None,
    sign: Sign | None = None,
    world: World | None = None,
) -> list[Path]:
    """The writing of generate_to_file for any pipeline: check and claim `out` (see pipelines.output: a Target says
    whether an existing file is replaced), load the model in `checkpoint`, then write the (images, captions) that
    batches(model, share) yields for the images `share` (all of them, or this rank's) as one grid or (grid=False)
    one PNG per image in the folder `out`. A single image is written as itself, never as a grid of one. The
    embedded parameters are the request's plus `extra` (JSON values: an edit's input image, its strength). finish:
    the screen every image passes first (a withheld image is not written; a grid shows a grey tile); sign: content
    credentials for every file written (see data.images.write_image). world: under torchrun each rank draws its
    block of the images (the images of one process: image i keeps seed + i) and writes its own files, or sends its
    tiles to rank 0, which writes the grid; rank 0 returns every path written, the other ranks nothing."""
    world = world or World()
    share = world.shard(req.n)
    target = as_target(out)
    params = model_record(checkpoint) | {k: v for k, v in asdict(req).items() if k not in ("device", "batch_size")}
    params |= extra or {}
    meta = {"ldmkit": json.dumps(params)}
    separate, single = not grid, grid and req.n == 1  # single: one image, written as itself to `out`
    grid = grid and not single
    out = check_output(target.path, folder=separate, metadata=None if separate else meta, signed=sign is not None)
    if grid:
        wanted = {0: out} if world.main else {}
    elif single:
        wanted = {i: out for i in share}
    else:
        wanted = {i: out / f"{i:05d}.png" for i in share}
    claims = claim(wanted.values(), (*target.inputs, checkpoint), target.overwrite)
    paths = dict(zip(wanted, claims.paths))
    written: list[Path] = []
    try:
        ldm = LatentDiffusion.load(checkpoint, resolve_device(req.device, "--device"))
        about = dict(params)
        if grid:
            written += _write_grid(ldm, batches, share, world, finish, sign, paths, about)
            return written if world.main else []
        written += _write_each(ldm, batches, share, finish, sign, paths, about)
    finally:
        claims.release(written)
    if not world.active:
        return written
    every = world.gather(written)
    return [p for part in every for p in part] if world.main else []


def _write_grid(ldm, batches, share, world, finish, sign, paths, about) -> list[Path]:
    """write_batches for a grid: rank 0 gathers every rank's images and writes them as one grid to paths[0]."""
    mine = collect(batches(ldm, share)) if len(share) else None
    parts = [p for p in world.gather(mine) if p is not None]
    if not world.main:
        return []
    images, captions = torch.cat([p[0] for p in parts]), [c for p in parts for c in p[1]]
    shared, facts = {}, [{} for _ in captions]
    if finish is not None:
        images, captions, facts = _finished_grid(images, captions, finish)
        shared = {k: v for k, v in facts[0].items() if all(f.get(k) == v for f in facts)}  # the run's id, time
    # where each image lies in the grid, so that `ldmkit provenance` reads each tile's watermark
    layout = grid_layout(len(images), *images.shape[-2:], nrow=8, labels=captions)
    tiles = [
        {"index": i, "seed": about["seed"] + i, "box": dict(zip(BOX_KEYS, layout.box(i)))}
        | {k: v for k, v in f.items() if k not in shared}
        for i, f in enumerate(facts)
    ]
    meta = {"ldmkit": json.dumps(about | shared | {"tiles": tiles})}
    save = lambda p: save_grid(images, p, nrow=layout.nrow, labels=captions, metadata=meta, sign=sign)  # noqa: E731
    return [write_or_rescue(save, paths[0])]


def _write_each(ldm, batches, share, finish, sign, paths, about) -> list[Path]:
    """write_batches for single images: each to paths[i], written batch by batch, so memory stays bounded and
    finished images are kept."""
    written = []
    done = share.start
    for images, captions in batches(ldm, share):
        for (img, facts), cap in zip(_finished(images, finish, done), captions, strict=True):
            i, done = done, done + 1
            m = {"ldmkit": json.dumps(about | {"seed": about["seed"] + i, "n": 1, "index": i, "caption": cap} | facts)}
            if img is not None:
                written.append(write_or_rescue(lambda p, img=img, m=m: write_image(img, p, m, sign), paths[i]))
    return written


def _finished(images: torch.Tensor, finish: Finish | None, first: int) -> list[tuple[Image.Image | None, dict]]:
    """(what to write, facts to embed) for each image (B, C, H, W) of a batch whose first is image `first`."""
    pils = [to_pil(x) for x in images]
    return finish(pils, first) if finish is not None else [(p, {}) for p in pils]


def _finished_grid(images: torch.Tensor, captions: list[str], finish: Finish) -> tuple[torch.Tensor, list[str], list]:
    """A grid's tiles after `finish`: withheld ones grey and captioned so, with each tile's facts."""
    tiles, labels, facts = [], [], []
    for (img, about), cap, x in zip(_finished(images, finish, 0), captions, images, strict=True):
        tiles.append(to_tensor(img) if img is not None else torch.full_like(x, WITHHELD_GREY / 127.5 - 1))
        labels.append(cap if img is not None else "withheld")
        facts.append(about)
    return torch.stack(tiles), labels, facts


def edit_paths(out: str | Path, n: int) -> list[Path]:
    """Where n edited images go: `out` itself for one image, else OUT-0.png, OUT-1.png, ... beside it."""
    out = Path(out)
    return [out] if n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def write_edits(
    checkpoint: str | Path,
    req: SampleRequest,
    out: str | Path | Target,
    batches: Callable[[LatentDiffusion], Iterable[tuple[torch.Tensor, list[str]]]],
    extra: dict,
    finish: Finish | None = None,
    sign: Sign | None = None,
    record: bool = True,
) -> list[Path]:
    """The writing of every edit (img2img, inpaint, outpaint): each edited image on its own, at the input's size, to
    edit_paths(out, req.n), with the request's parameters, its seed and `extra` (the input files, the edit's
    options) embedded; record=False (an edit that changes nothing): the pixels alone, with no record, screen or
    credentials, since nothing in them was generated. The outputs are checked before the model loads; each image
    is written when its batch is done. finish: the screen every image passes first (a withheld image is not
    written); sign: content credentials for every file written (PNG only). `out` is checked and claimed as
    pipelines.output says (a Target: whether an existing file is replaced); the model file and the input image and
    mask are never overwritten."""
    params = {k: v for k, v in asdict(req).items() if k not in ("device", "batch_size", "height", "width")} | extra
    params = model_record(checkpoint) | params
    finish, sign = (finish, sign) if record else (None, None)

    def meta(i: int) -> dict[str, str]:
        about = {**params, "seed": req.seed + i, "n": 1, "index": i}
        return {"ldmkit": json.dumps(about)} if record else {}

    signed = sign is not None
    target = as_target(out)
    wanted = [check_output(p, False, meta(i), signed) for i, p in enumerate(edit_paths(target.path, req.n))]
    claims = claim(wanted, (*target.inputs, checkpoint), target.overwrite)  # the inputs: see output.reading
    paths = claims.paths
    written: list[Path] = []
    try:
        ldm = LatentDiffusion.load(checkpoint, resolve_device(req.device, "--device"))
        done = 0
        for images, _ in batches(ldm):
            for img, facts in _finished(images, finish, done):
                i, done = done, done + 1
                m = {"ldmkit": json.dumps(json.loads(meta(i)["ldmkit"]) | facts)} if record else None
                if img is not None:
                    written.append(write_or_rescue(lambda p, img=img, m=m: write_image(img, p, m, sign), paths[i]))
    finally:
        claims.release(written)
    return written
