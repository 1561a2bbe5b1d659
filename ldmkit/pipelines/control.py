"""ControlNets at sampling time: `--control CONTROLNET:IMAGE[:SCALE[:KIND]]`, repeatable, with --control-start and
--control-end (fractions of the steps).

Each control is checked before any sampling (its file, its scale, the window, its image, that it was made for the
model's U-Net), then the model's denoiser calls its U-Net through `Controlled` (denoisers/controlnet.py): the
samplers and guidance see an ordinary backbone. KIND says how IMAGE becomes the condition: a detector (canny, mask,
colour) run on it, or raw when IMAGE is the condition already; by default the detector the ControlNet was trained
with (raw for one trained on paired folders).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import file_sha256
from ..config import ControlConfig, from_dict
from ..data.conditions import DETECTORS, KINDS, condition_image
from ..denoisers.controlnet import Control, Controlled, check_control, check_fits, load_controlnet, step_window
from ..errors import InputError, MissingFileError
from ..ldm import LatentDiffusion


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


def parse_control(text: str, start: float = 0.0, end: float = 1.0) -> ControlSpec:
    """'CONTROLNET:IMAGE[:SCALE[:KIND]]' -> ControlSpec, checked (InputError naming what is wrong)."""
    parts = text.split(":")
    if len(parts) < 2 or len(parts) > 4 or not parts[0] or not parts[1]:
        raise InputError(
            f"--control {text!r}: give CONTROLNET:IMAGE[:SCALE[:KIND]], e.g. runs/control/controlnet.safetensors:"
            f"edges.png:0.8"
        )
    scale = 1.0
    if len(parts) > 2 and parts[2]:
        try:
            scale = float(parts[2])
        except ValueError:
            raise InputError(f"--control {text!r}: the scale {parts[2]!r} is not a number") from None
    kind = parts[3] if len(parts) > 3 else ""
    if kind and kind not in KINDS:
        raise InputError(f"--control {text!r}: unknown detector {kind!r}; use {' or '.join(KINDS)}")
    check_control(scale, start, end, f"--control {text}")
    for path, what in ((parts[0], "ControlNet"), (parts[1], "control image")):
        if not Path(path).is_file():
            raise MissingFileError(f"--control {text!r}: the {what} {path} does not exist")
    return ControlSpec(parts[0], parts[1], scale, kind, start, end)


def apply_controls(ldm: LatentDiffusion, specs: list[ControlSpec], size: tuple[int, int], steps: int) -> None:
    """Make `ldm`'s denoiser call its U-Net through the ControlNets of `specs`, each with its condition image at
    the output size (H, W) and its window over a sampling of `steps` steps. InputError, before any sampling, for a
    ControlNet made for another denoiser or an image that does not fit."""
    if not specs:
        return
    controls = []
    sigmas = ldm.denoiser.sigmas(steps)
    for spec in specs:
        net, meta = load_controlnet(spec.model, ldm.device)
        check_fits(net, ldm.unet, ldm.factor, spec.model)
        trained = meta.get("condition", "raw")
        kind = spec.kind or (trained if trained in DETECTORS else "raw")
        cfg = from_dict(ControlConfig, meta["control"]) if isinstance(meta.get("control"), dict) else ControlConfig()
        image = condition_image(kind, spec.image, size, cfg).to(ldm.device)
        window = step_window(ldm.denoiser, sigmas, spec.start, spec.end)
        controls.append(Control(net, image, spec.scale, spec.start, spec.end, window))
    ldm.denoiser.backbone = Controlled(ldm.unet, controls)


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
