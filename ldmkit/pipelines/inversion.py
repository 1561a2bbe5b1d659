"""Inversion and prompt editing: an image walked back to the noise DDIM turns into it, then sampled under another
prompt or label.

`invert` encodes the image (padded to the model's factor, as every edit), runs the deterministic DDIM inversion
(samplers/inversion.py) up the model's own sampling grid under the source condition, and keeps the whole walk:
the latent at each sigma. `resample` runs deterministic DDIM down the same grid from the walk's top: under the
source condition it returns the image (up to the autoencoder's round trip and the inversion's residual), under
another it is the edit. `keep_layout` steps at the start of an edit also denoise the source's latent from the walk
and replay its self-attention queries and keys in the edit's pass (nn/attention_replay.py), which keeps the
source's layout while the new condition sets the content.

A condition is a prompt for a text model and a class (its number or name) for a class-conditional one; None or ""
is the unconditional one. Inversion runs without guidance by default (cfg 1), which is what makes it exact:
guidance at inversion amplifies the step error (Mokady et al. 2023, sec. 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import checkpoint
from ..checkpoint import check_output_path
from ..conditioning.types import Conditioning
from ..data.images import Sign
from ..diffusion.guidance import DenoiseFn, guided
from ..diffusion.sample import finite_watch, non_finite_at
from ..errors import CheckpointError, InputError
from ..ldm import LatentDiffusion
from ..nn.attention_replay import SelfAttentionReplay
from ..runtime import resolve_device
from ..samplers import sample_ddim
from ..samplers.inversion import invert_ddim
from ..shipped import load_model
from .images import crop_to, load_edit_image
from .img2img import checkpoint_channels, model_image
from .output import Finish, Target, as_target, reading, write_edits
from .record import input_record, model_record
from .request import SampleRequest

KIND = "inversion"  # the checkpoint kind of a noise file written by `ldmkit invert`
DEFAULT_STEPS = 50
DEFAULT_ITERATIONS = 2  # fixed-point iterations per inversion step (each one model call)


@dataclass(frozen=True)
class Inversion:
    """The DDIM walk of an image: walk[k] is the latent at sigmas[k] (walk[-1] the clean latents, walk[0] the top).

    sigmas: the sampling grid (steps + 1,), decreasing to 0; source: the condition it was inverted under; cfg: its
    guidance scale; size: the input image's (H, W), which the padded latents are cropped back to."""

    walk: torch.Tensor  # (steps + 1, B, c, h, w)
    sigmas: torch.Tensor  # (steps + 1,)
    source: str | None
    cfg: float
    size: tuple[int, int]

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def noise(self) -> torch.Tensor:
        """The unit-variance start noise (B, c, h, w): the walk's top divided by its sigma, as sampling draws it."""
        return self.walk[0] / self.sigmas[0]


def condition(ldm: LatentDiffusion, what: str | None, option: str = "--prompt") -> Conditioning:
    """The Conditioning of one image for `what`: a prompt (text model), a class number or name (class model), or
    None / "" for the unconditional one. InputError naming `option` for a condition the model cannot take."""
    if not what:
        return ldm.null_conditioning(1)
    if ldm.text_encoder is not None:
        return ldm.conditioning(prompts=[what])
    if not ldm.num_classes:
        raise InputError(f"{option} {what!r}: {ldm.source or 'this model'} is unconditional; drop {option}")
    label = int(what) if what.lstrip("-").isdigit() else what
    return ldm.conditioning(labels=[label])


def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise InputError(f"--steps {steps!r} must be a whole number from 1 to 1000; 50 is usual for inversion")
    return steps


@torch.no_grad()
def invert(
    ldm: LatentDiffusion,
    image: torch.Tensor,
    source: str | None = None,
    steps: int = DEFAULT_STEPS,
    cfg: float = 1.0,
    iterations: int = DEFAULT_ITERATIONS,
    progress: bool = False,
) -> Inversion:
    """The DDIM inversion of images (B, C, H, W) in [-1, 1] under the condition `source` (see `condition`), on the
    model's own `steps`-step grid, guided at `cfg` (1: none, the exact inversion)."""
    steps = check_steps(steps)
    ldm.task_spec.check_from_noise(ldm, "invert")
    x, size = model_image(ldm, image)
    cond = condition(ldm, source)
    z0 = torch.cat([ldm.encode(x[j : j + 1]) for j in range(x.shape[0])])  # (B, c, h, w), each encoded alone
    sigmas = ldm.denoiser.sigmas(steps).to(ldm.device)
    denoise = guided(ldm.denoiser, _repeat(cond, len(z0)), ldm.null_conditioning(len(z0)), cfg)
    walk = [z0]
    with _bar("inverting", steps, progress) as bar:

        def keep(i, x, x0, sigma):
            walk.append(x)
            bar.update(1)

        invert_ddim(denoise, z0, sigmas, iterations=iterations, callback=finite_watch(steps, keep))
    return Inversion(torch.stack(walk[::-1]), sigmas, source, float(cfg), size)


@torch.no_grad()
def resample(
    ldm: LatentDiffusion,
    inv: Inversion,
    target: str | None = None,
    cfg: float = 1.0,
    keep_layout: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1], at the inverted image's size: deterministic DDIM down the inversion's grid
    from its top under the condition `target` at guidance `cfg`. With the inversion's own condition and cfg this
    reconstructs the image. keep_layout: the first steps in which the edit attends with the source's self-attention
    maps (0: none)."""
    if not 0 <= keep_layout <= inv.steps:
        raise InputError(f"--keep-layout {keep_layout} must be between 0 and the {inv.steps} steps")
    b = inv.walk.shape[1]
    uncond = ldm.null_conditioning(b)
    walk, sigmas = inv.walk.to(ldm.device), inv.sigmas.to(ldm.device)
    denoise = guided(ldm.denoiser, _repeat(condition(ldm, target, "--to"), b), uncond, cfg)
    with _bar("editing" if keep_layout else "sampling", inv.steps, progress) as bar:
        tick = lambda *_: bar.update(1)  # noqa: E731
        if keep_layout:
            source = guided(ldm.denoiser, _repeat(condition(ldm, inv.source, "--from"), b), uncond, cfg)
            with SelfAttentionReplay(ldm.unet) as replay:
                keeper = LayoutKeeper(denoise, source, walk, sigmas, keep_layout, replay)
                z = sample_ddim(keeper, walk[0], sigmas, callback=finite_watch(inv.steps, tick))
        else:
            z = sample_ddim(denoise, walk[0], sigmas, callback=finite_watch(inv.steps, tick))
    if not bool(torch.isfinite(z).all()):
        raise non_finite_at(inv.steps, inv.steps, float(sigmas[-2]))
    return crop_to(ldm.decode(z).cpu(), inv.size)


class LayoutKeeper:
    """A denoise function for the edit whose first `steps` calls attend with the source's self-attention: before
    each, the source's own denoiser runs on the source's latent at that sigma (from the inversion's walk) while
    `replay` records, then the edit's runs while it replays (Tumanyan et al. 2023, sec. 4)."""

    def __init__(
        self,
        denoise: DenoiseFn,
        source: DenoiseFn,
        walk: torch.Tensor,
        sigmas: torch.Tensor,
        steps: int,
        replay: SelfAttentionReplay,
    ):
        """denoise / source: the edit's and the source's guided denoisers (the same guidance, so that both passes
        have one batch layout); walk, sigmas: the inversion's; steps: how many of the first steps keep the layout;
        replay: the hooks on the model's backbone."""
        self.denoise, self.source, self.replay = denoise, source, replay
        self.at = {float(s): walk[k] for k, s in enumerate(sigmas[:steps])}  # sigma -> the source's latent

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x_src = self.at.get(float(sigma.reshape(-1)[0]))
        if x_src is None:
            self.replay.off()
            return self.denoise(x, sigma)
        self.replay.record()
        self.source(x_src, sigma)
        self.replay.replay()
        try:
            return self.denoise(x, sigma)
        finally:
            self.replay.off()


# --- noise files ----------------------------------------------------------------------------------------------------
def save_inversion(path: str | Path, inv: Inversion, about: dict) -> Path:
    """Write the inversion as a safetensors file of kind "inversion": `noise` (B, c, h, w), unit variance, `walk`
    and `sigmas`, with the source condition, cfg, size and `about` (the model's record, the input image's) in its
    metadata."""
    tensors = {"noise": inv.noise, "walk": inv.walk, "sigmas": inv.sigmas}
    config = {"source": inv.source, "cfg": inv.cfg, "size": list(inv.size), "steps": inv.steps}
    return checkpoint.save(path, tensors, KIND, config, **about)


def load_inversion(path: str | Path) -> tuple[Inversion, dict]:
    """(the Inversion in a file written by save_inversion, its metadata)."""
    tensors, meta = checkpoint.load(path, KIND)
    cfg = meta.get("config") or {}
    if not {"walk", "sigmas"} <= set(tensors) or "size" not in cfg:
        raise CheckpointError(f"{path} holds no inversion walk; write one with `ldmkit invert IMAGE --out {path}`")
    size = tuple(int(v) for v in cfg["size"])
    return Inversion(tensors["walk"], tensors["sigmas"], cfg.get("source"), float(cfg.get("cfg", 1.0)), size), meta


# --- files ----------------------------------------------------------------------------------------------------------
def invert_to_file(
    checkpoint_path: str | Path,
    image: str | Path,
    out: str | Path | Target,
    source: str | None = None,
    steps: int = DEFAULT_STEPS,
    cfg: float = 1.0,
    iterations: int = DEFAULT_ITERATIONS,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Invert the image file `image` under `source` and write the walk to `out` (.safetensors, see save_inversion),
    with the model's name and SHA-256 and the image's name and SHA-256. The output and the image are checked before
    the model loads; an existing `out` is replaced only when `out` is a Target that allows it."""
    target = as_target(out)
    path = check_output_path(target.path, "--out")
    if path.suffix != ".safetensors":
        raise InputError(f"--out {path}: an inversion is written as .safetensors; name it {path.stem}.safetensors")
    if path.exists() and not target.overwrite:
        raise InputError(f"--out {path} exists; give --overwrite to replace it, or name another file")
    if path.resolve() in {Path(p).resolve() for p in (image, checkpoint_path)}:
        raise InputError(f"--out {path} is an input of this run; name another file")
    check_steps(steps)
    x = load_edit_image(image, checkpoint_channels(checkpoint_path))  # (1, C, H, W)
    ldm = load_model(checkpoint_path, resolve_device(device, "--device"))
    inv = invert(ldm, x, source, steps, cfg, iterations, progress)
    about = model_record(checkpoint_path) | {"image": input_record(image), "iterations": iterations}
    return save_inversion(path, inv, about)


def edit_to_file(
    checkpoint_path: str | Path,
    start: str | Path,
    out: str | Path | Target,
    source: str | None,
    target: str | None,
    steps: int = DEFAULT_STEPS,
    cfg: float = 3.0,
    keep_layout: int = 0,
    iterations: int = DEFAULT_ITERATIONS,
    device: str = "auto",
    progress: bool = True,
    finish: Finish | None = None,
    sign: Sign | None = None,
) -> list[Path]:
    """Edit the image file `start` from the condition `source` to `target`: invert it under `source` (no
    guidance), then sample under `target` at guidance `cfg`, keeping the source's layout for the first
    `keep_layout` steps; written as every edit is (pipelines/output.py write_edits) with the edit recorded. `start`
    may instead be an inversion written by `ldmkit invert` (.safetensors) for the same model: its walk, steps and
    source condition are used (`source` must then be None or the same)."""
    start = Path(start)
    inv = None
    if start.suffix == ".safetensors":
        inv, meta = load_inversion(start)
        if source not in (None, inv.source):
            raise InputError(f"--from {source!r}: {start} was inverted under {inv.source!r}; drop --from")
        if meta.get("weights_sha256") not in (None, model_record(checkpoint_path).get("weights_sha256")):
            raise InputError(f"{start} was inverted with another model ({meta.get('model')}); pass --model for it")
        source, steps = inv.source, inv.steps
    else:
        load_edit_image(start, checkpoint_channels(checkpoint_path))  # checked before the model loads
    check_steps(steps)
    if not 0 <= keep_layout <= steps:
        raise InputError(f"--keep-layout {keep_layout} must be between 0 and --steps {steps}")
    req = SampleRequest(n=1, steps=steps, cfg=cfg, sampler="ddim", device=device)

    def batches(ldm: LatentDiffusion):
        walk = inv
        if walk is None:
            x = load_edit_image(start, ldm.ae_config.in_channels)
            walk = invert(ldm, x, source, steps, 1.0, iterations, progress)
        yield resample(ldm, walk, target, cfg, keep_layout, progress), [target or ""]

    extra = {
        "image": input_record(start),
        "edit": {"from": source, "to": target, "keep_layout": keep_layout, "inversion_iterations": iterations},
    }
    return write_edits(checkpoint_path, req, reading(out, start), batches, extra, finish, sign)


# --- pieces -------------------------------------------------------------------------------------------------------
def _repeat(cond: Conditioning, n: int) -> Conditioning:
    """One image's conditioning for n images."""
    return cond if n == 1 else Conditioning.cat([cond] * n)


def _bar(desc: str, steps: int, progress: bool) -> tqdm:
    return tqdm(total=steps, unit="step", desc=f"{desc} ({steps} steps)", disable=not progress)
