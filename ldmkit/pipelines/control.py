"""ControlNets at sampling time: `--control CONTROLNET:IMAGE[:SCALE[:KIND[:START[:END]]]]`, repeatable; START and END
(fractions of the steps) default to --control-start and --control-end, so each control may act on its own steps.

Each control is checked before any sampling (its file, its scale, the window, its image, that it was made for the
model's U-Net), then the model's denoiser calls its U-Net through `Controlled` (denoisers/controlnet.py): the
samplers and guidance see an ordinary backbone. KIND says how IMAGE becomes the condition: a detector (canny, mask,
colour) run on it, or raw when IMAGE is the condition already; by default the detector the ControlNet was trained
with (raw for one trained on paired folders). The edits (img2img, inpaint, outpaint) take controls the same way
(`with_controls`): the condition at the input's size, padded as the image is, and for img2img the window counted over
the steps it runs.

Per image (`per_sample_controls`): a batch of requests with different controls, or none, runs each image with its own
controls only, its numbers those it gets alone, so a server batches controlled requests with any others.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from ..checkpoint import file_sha256
from ..config import ControlConfig, from_dict
from ..data.conditions import DETECTORS, KINDS, condition_image
from ..denoisers.controlnet import Control, Controlled, check_control, check_fits, load_controlnet, step_window
from ..diffusion.sample import start_index
from ..errors import InputError, MissingFileError
from ..ldm import LatentDiffusion
from .images import pad_to_multiple

SPEC = "CONTROLNET:IMAGE[:SCALE[:KIND[:START[:END]]]]"


@dataclass(frozen=True)
class ControlSpec:
    """One --control: the ControlNet file, the image, the scale of its residuals, how the image becomes the
    condition ("" = as the ControlNet was trained), and the fraction of the steps it acts on."""

    model: str
    image: str
    scale: float = 1.0
    kind: str = ""
    start: float = 0.0
    end: float = 1.0


def _fraction(text: str, part: str, what: str, default: float) -> float:
    if not part:
        return default
    try:
        return float(part)
    except ValueError:
        raise InputError(f"--control {text!r}: the {what} {part!r} is not a number") from None


def parse_control(text: str, start: float = 0.0, end: float = 1.0) -> ControlSpec:
    """'CONTROLNET:IMAGE[:SCALE[:KIND[:START[:END]]]]' -> ControlSpec, checked (InputError naming what is wrong);
    `start` and `end` are the defaults for a spec that gives none (--control-start, --control-end)."""
    parts = text.split(":")
    if len(parts) < 2 or len(parts) > 6 or not parts[0] or not parts[1]:
        raise InputError(
            f"--control {text!r}: give {SPEC}, e.g. runs/control/controlnet.safetensors:edges.png:0.8 or "
            f"...:edges.png:0.8:canny:0:0.6"
        )
    parts += [""] * (6 - len(parts))
    scale = _fraction(text, parts[2], "scale", 1.0)
    kind = parts[3]
    if kind and kind not in KINDS:
        raise InputError(f"--control {text!r}: unknown detector {kind!r}; use {' or '.join(KINDS)}")
    start, end = _fraction(text, parts[4], "start", start), _fraction(text, parts[5], "end", end)
    check_control(scale, start, end, f"--control {text}")
    for path, what in ((parts[0], "ControlNet"), (parts[1], "control image")):
        if not Path(path).is_file():
            raise MissingFileError(f"--control {text!r}: the {what} {path} does not exist")
    return ControlSpec(parts[0], parts[1], scale, kind, start, end)


def apply_controls(
    ldm: LatentDiffusion, specs: list[ControlSpec], size: tuple[int, int], steps: int, strength: float = 1.0
) -> None:
    """Make `ldm`'s denoiser call its U-Net through the ControlNets of `specs`, each with its condition image at
    size (H, W) (padded by edge replication to the model's multiple, as edits pad their image) and its window over
    the steps a sampling of `steps` steps runs (img2img at `strength` runs the last of them). InputError, before
    any sampling, for a ControlNet made for another denoiser or an image that does not fit."""
    if not specs:
        return
    controls = []
    multiple = ldm.factor * ldm.run.backbone.factor
    for spec in specs:
        net, meta = load_controlnet(spec.model, ldm.device, ldm.unet)  # a low-rank one is rebuilt on it
        check_fits(net, ldm.unet, ldm.factor, spec.model)
        kind, cfg = condition_settings(meta, spec.kind)
        image, _ = pad_to_multiple(condition_image(kind, spec.image, size, cfg), multiple)  # (1, 3, H', W')
        controls.append(Control(net, image, spec.scale, spec.start, spec.end))
    ldm.denoiser.backbone = _controlled_unet(ldm, controls, steps, strength)


def condition_settings(meta: dict, kind: str = "") -> tuple[str, ControlConfig]:
    """(how an image becomes a ControlNet's condition: `kind`, else the detector it was trained with, raw for one
    trained on paired folders or converted from elsewhere; the detector's settings in its training) from the
    metadata of its file."""
    trained = meta.get("condition", "raw")
    cfg = from_dict(ControlConfig, meta["control"]) if isinstance(meta.get("control"), dict) else ControlConfig()
    return kind or (trained if trained in DETECTORS else "raw"), cfg


@contextmanager
def controlled(
    ldm: LatentDiffusion, controls: list[Control], steps: int, strength: float = 1.0, images: int | None = None
) -> Iterator[None]:
    """`ldm`'s denoiser calling its U-Net through `controls` while the block runs, each control's window set for a
    sampling of `steps` steps at `strength` (its condition image already at the padded output size); the backbone
    it had afterwards, so a model shared between requests (a server's) is left as it was. images: the batch's
    images, for controls that steer some of them (Control.rows)."""
    before = ldm.denoiser.backbone
    ldm.denoiser.backbone = _controlled_unet(ldm, controls, steps, strength, images)
    try:
        yield
    finally:
        ldm.denoiser.backbone = before


@contextmanager
def per_sample_controls(ldm: LatentDiffusion, per_image: Sequence[Sequence[Control]], steps: int) -> Iterator[None]:
    """Within the block, image i of a batch (of len(per_image) images, repeated per guidance branch) is steered by
    the controls per_image[i] (a sampling of `steps` steps from noise) and by no other, bit for bit as `controlled`
    with them alone steers it. The controls are taken slot by slot (each image's first, then each image's second
    ...), so every image sums its residuals in its own order; within a slot, the images that use one ControlNet
    share one pass of it. Nothing is wrapped when no image has a control."""
    if not any(per_image):
        yield
        return
    order = []
    for slot in range(max(len(mine) for mine in per_image)):
        by_net: dict[int, list[tuple[Control, list[int]]]] = {}  # id(net) -> (control, the images it steers)
        for i, mine in enumerate(per_image):
            if slot < len(mine):
                group = by_net.setdefault(id(mine[slot].net), [])
                if group and group[-1][0] is mine[slot]:  # a request's images share its controls
                    group[-1][1].append(i)
                else:
                    group.append((mine[slot], [i]))
        order += [replace(c, rows=tuple(rows)) for group in by_net.values() for c, rows in group]
    with controlled(ldm, order, steps, images=len(per_image)):
        yield


def _controlled_unet(
    ldm: LatentDiffusion, controls: list[Control], steps: int, strength: float, images: int | None = None
) -> Controlled:
    """`ldm`'s U-Net with `controls` on its device, each window over the sigmas walked (img2img: the last of them)."""
    sigmas = ldm.denoiser.sigmas(steps)[start_index(steps, strength) :]
    dev = ldm.device
    on = [
        replace(c, net=c.net.to(dev), image=c.image.to(dev), window=step_window(ldm.denoiser, sigmas, c.start, c.end))
        for c in controls
    ]
    return Controlled(ldm.unet, on, images)


Batches = Callable[[LatentDiffusion], Iterable[tuple[torch.Tensor, list[str]]]]


def with_controls(
    batches: Batches, specs: list[ControlSpec] | None, size: tuple[int, int], steps: int, strength: float = 1.0
) -> tuple[Batches, dict]:
    """(batches that first put the ControlNets of `specs` on the model an edit loaded (apply_controls: conditions at
    the input's size (H, W), windows over the steps an edit of `steps` steps at `strength` runs); what each image's
    record adds). No specs: the batches unchanged and nothing added."""
    if not specs:
        return batches, {}

    def steered(ldm: LatentDiffusion):
        apply_controls(ldm, specs, size, steps, strength)
        return batches(ldm)

    return steered, {"controls": control_record(specs)}


def control_record(specs: list[ControlSpec]) -> list[dict]:
    """What an image's parameters say about its controls: each file's and image's name and SHA-256, the scale,
    the detector and the window."""
    return [
        {
            "controlnet": Path(s.model).name,
            "controlnet_sha256": file_sha256(s.model),
            "image": Path(s.image).name,
            "image_sha256": file_sha256(s.image),
            "scale": s.scale,
            "kind": s.kind or "trained",
            "start": s.start,
            "end": s.end,
        }
        for s in specs
    ]
