"""ControlNets on served requests, in the shape AUTOMATIC1111's ControlNet extension takes them:
`alwayson_scripts: {"controlnet": {"args": [{"image": BASE64, "module": "canny", "model": NAME, "weight": 1.0,
"guidance_start": 0.0, "guidance_end": 1.0}, ...]}}` on /sdapi/v1/txt2img and img2img, listed by
/controlnet/model_list and /controlnet/module_list; and in the native jobs' `controls` list, with --control's names:
`[{"image": BASE64, "kind": "canny", "model": NAME, "scale": 1.0, "start": 0.0, "end": 1.0}, ...]`. Both are read by
one parser (UnitFields says what each API calls a unit's fields). ControlNets come only from the server's folder
(serve.controlnets), each read once and checked against the model a request names; a refusal is a 400 naming the
unit's field as the client sent it. No model maths here: the condition images are made by data/conditions.py; a
generation's controls go with its job, which the scheduler batches with other generations (pipelines/control.py:
per_sample_controls steers each image by its own request's controls only), and an edit's are hooked around the
denoiser for the edit's run alone (`steered_edit`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import file_sha256
from ..config import ServeLimits
from ..data.conditions import KINDS, condition_of
from ..data.images import to_pil
from ..denoisers.controlnet import Control, ControlNet, check_control, check_fits, is_low_rank, load_controlnet
from ..errors import ConfigError, InputError
from ..pipelines.control import condition_settings, controlled
from ..pipelines.images import pad_to_multiple
from ..pipelines.plan import resolution
from .edits import Edit
from .schemas import FieldError, decode_image

# A1111's preprocessor ("module") names -> ldmkit's condition kinds; "none": the image is the condition already
MODULES = {"none": "raw", "canny": "canny", "mask": "mask", "colour": "colour", "color": "colour"}
SUFFIX = ".safetensors"


@dataclass(frozen=True)
class UnitFields:
    """What one API calls the fields of a control unit, and the values its `kind` field takes."""

    at: str  # the list's field: "alwayson_scripts.controlnet.args", "controls"
    kind: str  # the field naming how the image becomes the condition
    kinds: dict[str, str]  # its values -> ldmkit's condition kinds ("" = the detector the ControlNet was trained with)
    default_kind: str  # the value when the field is left out
    weight: str  # the scale of the ControlNet's residuals
    start: str  # the fractions of the steps the unit acts on
    end: str
    images: tuple[str, ...]  # the fields holding the base64 condition image, in the order they are looked for
    known: tuple[str, ...] | None = None  # the fields a unit may have (None: others are ignored, as A1111 does)


A1111_UNIT = UnitFields(
    "alwayson_scripts.controlnet.args", "module", MODULES, "none", "weight", "guidance_start", "guidance_end",
    ("image", "input_image"),
)  # fmt: skip
NATIVE_UNIT = UnitFields(
    "controls", "kind", {k: k for k in KINDS}, "", "scale", "start", "end", ("image",),
    known=("image", "kind", "model", "scale", "start", "end"),
)  # fmt: skip


@dataclass(frozen=True)
class ControlUnit:
    """One enabled unit of a request: its ControlNet, condition image, weight and window, and what the audit row
    records of it (the ControlNet's name and SHA-256, never the server's path)."""

    control: Control
    record: dict[str, Any]


class ServedControlNets:
    """A server's ControlNet folder: the .safetensors ControlNet files under it, named by their path inside it
    without the suffix, each loaded once."""

    def __init__(self, folder: str):
        """folder: serve.controlnets ("" = no ControlNets)."""
        self.root = Path(folder).expanduser().resolve() if folder else None
        if self.root is not None and not self.root.is_dir():
            raise ConfigError(f"serve.controlnets = {folder!r} is not a folder; create it or leave the setting empty")
        # (name, None) -> a full ControlNet; (name, id of the U-Net) -> a low-rank one, rebuilt on that model's U-Net
        self._loaded: dict[tuple[str, int | None], tuple[ControlNet, dict, str]] = {}
        self._files: dict[str, tuple[str, bool]] = {}  # name -> (SHA-256, low-rank), read once

    def files(self) -> dict[str, Path]:
        """name -> file, every ControlNet of the folder (links leaving it are left out)."""
        if self.root is None:
            return {}
        found = (p for p in sorted(self.root.rglob(f"*{SUFFIX}")) if p.is_file())
        return {
            p.relative_to(self.root).as_posix()[: -len(SUFFIX)]: p
            for p in found
            if p.resolve().is_relative_to(self.root)
        }

    def model_list(self) -> list[str]:
        """The folder's ControlNets as the extension lists them: "name [first 8 hex digits of the SHA-256]"."""
        return [f"{name} [{self._file(name, path)[0][:8]}]" for name, path in self.files().items()]

    def _file(self, name: str, path: Path) -> tuple[str, bool]:
        if name not in self._files:
            self._files[name] = (file_sha256(path), is_low_rank(path))
        return self._files[name]

    def _load(self, name: str, path: Path, unet) -> tuple[ControlNet, dict, str]:
        sha, low_rank = self._file(name, path)
        key = (name, id(unet) if low_rank else None)
        if key not in self._loaded:
            net, meta = load_controlnet(path, unet=unet if low_rank else None)
            self._loaded[key] = (net, meta, sha)
        return self._loaded[key]

    def get(self, model: str, field: str, unet=None) -> tuple[str, ControlNet, dict, str]:
        """(name, ControlNet, its file's metadata, SHA-256) of `model` ("name" or "name [hash]"), a low-rank one
        rebuilt on `unet` (the U-Net of the model it steers); FieldError naming `field` when the folder holds no such
        ControlNet, the hash names another version of it, or it does not fit `unet`."""
        name, _, tail = model.strip().partition(" [")
        files = self.files()
        if self.root is None:
            raise FieldError(field, f"{field}: this server has no ControlNets (no serve.controlnets folder)")
        if name not in files:
            raise FieldError(
                field, f"{field}: ControlNet {model[:80]!r} is not in this server's folder; GET /controlnet/model_list"
            )
        want = tail.removesuffix("]").strip().lower()
        sha, _ = self._file(name, files[name])
        if want and not sha.startswith(want):
            raise FieldError(
                field, f"{field}: {model[:80]!r} names another version of {name!r}, whose hash is {sha[:8]}"
            )
        try:
            net, meta, sha = self._load(name, files[name], unet)
        except InputError as err:
            raise FieldError(field, f"{field}: {err}") from None
        return name, net, meta, sha

    def units(
        self, ldm, args: list, size: tuple[int, int], limits: ServeLimits, f: UnitFields = A1111_UNIT
    ) -> list[ControlUnit]:
        """The enabled units of `args` (an A1111 body's alwayson_scripts.controlnet.args, or with NATIVE_UNIT a
        native body's controls), each checked before any work: its model in the folder and made for `ldm`, its kind
        known, its image within the upload limits and of the output's shape (H, W), its weight and window valid."""
        units = []
        for i, unit in enumerate(args):
            at = f"{f.at}[{i}]"
            if not isinstance(unit, dict):
                raise FieldError(at, f"{at} must be an object with image, {f.kind}, model, {f.weight} ...")
            if f.known is not None and set(unit) - set(f.known):
                extra = ", ".join(sorted(map(str, set(unit) - set(f.known))))[:80]
                raise FieldError(at, f"{at} takes {', '.join(f.known)}, not {extra}")
            if unit.get("enabled", True) is False:
                continue
            units.append(self._unit(ldm, unit, at, size, limits, f))
        return units

    def _unit(self, ldm, unit: dict, at: str, size: tuple[int, int], limits: ServeLimits, f: UnitFields) -> ControlUnit:
        model = unit.get("model")
        if not isinstance(model, str) or not model or model.lower() == "none":
            raise FieldError(f"{at}.model", f"{at}.model must name a ControlNet; GET /controlnet/model_list lists them")
        name, net, meta, sha = self.get(model, f"{at}.model", ldm.unet)
        try:
            check_fits(net, ldm.unet, ldm.factor, name)
        except InputError as err:
            raise FieldError(f"{at}.model", f"{at}.model: {err}") from None
        module = unit.get(f.kind, f.default_kind)
        if not isinstance(module, str) or (module not in f.kinds and module != f.default_kind):
            choices = ", ".join(f.kinds)
            raise FieldError(
                f"{at}.{f.kind}", f"{at}.{f.kind} {str(module)[:40]!r} is not available; use one of: {choices}"
            )
        weight, start, end = (_number(unit, k, d, at) for k, d in ((f.weight, 1.0), (f.start, 0.0), (f.end, 1.0)))
        try:
            check_control(weight, start, end, at)
        except InputError as err:
            field = f.weight if "scale" in str(err) else f.start
            raise FieldError(f"{at}.{field}", str(err).replace("the scale", f"the {f.weight}")) from None
        data, field = _image_of(unit, at, f.images)
        image = decode_image(field, data, 3, limits.max_upload_bytes)  # (1, 3, H, W) in [-1, 1]
        h, w = image.shape[-2:]
        if max(h, w) > limits.max_side:
            raise FieldError(field, f"{field} is {w}x{h}; the limit is {limits.max_side} pixels a side")
        kind, cfg = condition_settings(meta, f.kinds.get(module, ""))
        try:
            cond = condition_of(kind, to_pil(image[0]), size, cfg, field, note=False)  # (1, 3, H, W) in [0, 1]
        except InputError as err:
            raise FieldError(field, str(err)) from None
        cond, _ = pad_to_multiple(cond, ldm.factor * ldm.run.backbone.factor)
        record = {  # with the API's own names, as the client sent them
            "model": name,
            "sha256": sha,
            f.kind: module,
            f.weight: weight,
            f.start: start,
            f.end: end,
            "image_sha256": hashlib.sha256(_bytes(data)).hexdigest(),
        }
        return ControlUnit(Control(net, cond, weight, start, end), record)


def _unit_args(body) -> list:
    scripts = (body.model_extra or {}).get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        raise FieldError("alwayson_scripts", 'alwayson_scripts must be an object, e.g. {"controlnet": {"args": [...]}}')
    cn = scripts.get("controlnet") or scripts.get("ControlNet") or {}
    args = cn.get("args", []) if isinstance(cn, dict) else None
    if not isinstance(args, list):
        raise FieldError("alwayson_scripts.controlnet.args", "alwayson_scripts.controlnet.args must be a list of units")
    return args


def _number(unit: dict, key: str, default: float, at: str) -> float:
    value = unit.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FieldError(f"{at}.{key}", f"{at}.{key} must be a finite number, not {str(value)[:40]!r}")
    return float(value)


def _image_of(unit: dict, at: str, keys: tuple[str, ...]) -> tuple[str, str]:
    """(the base64 image, its field) of a unit: the first of `keys` it has (A1111's: `image`, or the older
    `input_image`), a string or {"image": ...} as newer clients send it."""
    for key in keys:
        value = unit.get(key)
        if isinstance(value, dict):
            value, key = value.get("image"), f"{key}.image"
        if isinstance(value, str) and value:
            return value, f"{at}.{key}"
    raise FieldError(f"{at}.image", f"{at}.image must be a base64-encoded condition image")


def _bytes(data: str) -> bytes:
    try:
        return base64.b64decode(data.split(",", 1)[-1] if data.startswith("data:") else data)
    except (binascii.Error, ValueError):
        return data.encode()


def uses_controlnet(body) -> bool:
    """Whether an A1111 body's alwayson_scripts holds ControlNet units (then it is no ignored field)."""
    scripts = (body.model_extra or {}).get("alwayson_scripts")
    return isinstance(scripts, dict) and bool(scripts.get("controlnet") or scripts.get("ControlNet"))


def a1111_units(svc, served, body, req, size: tuple[int, int] | None = None) -> list[ControlUnit]:
    """The enabled ControlNet units of an A1111 body, each checked before any work; [] without any. size: the
    output's (H, W) (default the request's)."""
    if not uses_controlnet(body):
        return []
    return svc.controlnets.units(served.ldm, _unit_args(body), size or resolution(served.ldm, req), svc.limits)


def native_units(svc, served, controls: list, req) -> list[ControlUnit]:
    """The units of a native job's `controls`, read as A1111's are (NATIVE_UNIT's names), the output the request's
    size; [] without any."""
    if not controls:
        return []
    return svc.controlnets.units(served.ldm, controls, resolution(served.ldm, req), svc.limits, NATIVE_UNIT)


def recorded(units: list[ControlUnit]) -> dict:
    """What a request's parameters and audit row record of its units: {"controls": [...]}; {} without units."""
    return {"controls": [u.record for u in units]} if units else {}


def steered_edit(edit, units: list[ControlUnit], steps: int, strength: float = 1.0):
    """`edit` (an Edit, or run(ldm) -> images) with the units' ControlNets around the model's denoiser for its run
    alone (the scheduler runs an edit in a batch of its own), their windows counted over the steps an edit of
    `steps` steps at `strength` runs; `edit` itself without units."""
    if not units:
        return edit

    def steered(ldm):
        with controlled(ldm, [u.control for u in units], steps, strength):
            return edit(ldm)

    return Edit(steered, edit.keep) if isinstance(edit, Edit) else steered
