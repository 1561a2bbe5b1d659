"""The generation parameters, declared once: one table of fields, each with its type, default, bounds, help, the
tasks and commands that take it, and the name every surface calls it by.

Everything else derives from the table: the sampling options of the commands (ldmkit/cli/options.py), SampleRequest's
checks (below), the request bodies of the three HTTP APIs (serve/schemas.py), the parameters a prompt template may
set (serve/prompts.py) and synth's options (synth/export.py). A value is checked by `Param.check`, whose error
names the field as the surface that received it calls it: `--cfg` on the command line, `cfg_scale` in the
AUTOMATIC1111 API, `param cfg` in a template.

Surfaces: "cli" (the commands, and SampleRequest, whose errors name the command-line options), "openai", "a1111",
"native" (the HTTP APIs) and "template" (a prompt template's parameters). Defaults are looked up per command
("sample", "generate", ...) or per API; where one differs from the field's default the table says so and why.
"""

from __future__ import annotations

import inspect
import math
import operator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping

from ..checkpoint import file_sha256
from ..errors import InputError
from ..runtime import BACKENDS, SAMPLING_PRECISIONS
from ..samplers import SAMPLERS

MAX_STEPS = 10_000  # more sampling steps than any schedule resolves; larger values are typing mistakes
SEED_END = 2**63  # torch generators take seeds below this; image i uses seed + i
ETA_SAMPLERS = tuple(name for name, fn in SAMPLERS.items() if "eta" in inspect.signature(fn).parameters)

SURFACES = ("cli", "openai", "a1111", "native", "template")
APIS = ("openai", "a1111", "native")
TASKS = ("generate", "inpaint", "upscale", "video")  # the tasks whose models sample under these parameters
EDITS = ("img2img", "inpaint", "outpaint", "upscale")
DRAWING = ("sample", "generate", *EDITS, "video")  # the commands that write images (or clips) from a SampleRequest
SAMPLING = (*DRAWING, "evaluate")  # ... and evaluate, which takes their sampling options too
RANDOM_SEED = {"openai": None, "native": None, "a1111": -1}  # the APIs draw a random seed, returned with the images


@dataclass(frozen=True)
class Param:
    """One generation parameter: what it is, its bounds, and where it is taken.

    name: SampleRequest's attribute. kind: int, float, str or list (of kind `item`). default: the library's and
    the commands' default. low / high: the closed bounds of a number (None: unbounded on that side). optional: None
    is a value ("the sampler's own"). choices: the values a string may take. help: the command-line help. hint:
    what to change, appended to every refusal. tasks: the tasks whose models take it. commands: the commands that
    declare it as an option. names: surface -> what that surface calls it (a surface not named does not take it).
    flags: more command-line spellings. defaults: command or API -> its own default, where it differs from
    `default`. helps: command -> its own help. hints: surface -> its own hint. aliases: other names a template may
    use for it."""

    name: str
    kind: type
    default: object
    help: str
    hint: str = ""
    low: float | None = None
    high: float | None = None
    optional: bool = False
    choices: tuple[str, ...] | None = None
    item: type | None = None
    tasks: tuple[str, ...] = TASKS
    commands: tuple[str, ...] = SAMPLING
    names: Mapping[str, str] = field(default_factory=dict)
    flags: tuple[str, ...] = ()
    defaults: Mapping[str, object] = field(default_factory=dict)
    helps: Mapping[str, str] = field(default_factory=dict)
    hints: Mapping[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    def __post_init__(self):
        for key in ("names", "defaults", "helps", "hints"):
            object.__setattr__(self, key, MappingProxyType(dict(getattr(self, key))))

    # --- where it is taken ----------------------------------------------------------------------------------------
    def default_for(self, where: str = "cli") -> object:
        """The default of a command ("sample", "synth", ...), an API ("openai", ...) or the library ("cli")."""
        return self.defaults.get(where, self.default)

    def label(self, surface: str = "cli") -> str:
        """The field as `surface` names it in an error: --cfg, cfg_scale, param cfg."""
        name = self.names.get(surface, self.name)
        return f"param {name}" if surface == "template" else name

    def bounds(self, high: float | None = None) -> tuple[float | None, float | None]:
        """(low, high), the high bound lowered to `high` (a server's limit) when that is tighter."""
        top = self.high if high is None or (self.high is not None and self.high < high) else high
        return self.low, top

    def cli(self, command: str) -> tuple[tuple[str, ...], dict]:
        """(flags, argparse keyword arguments) of this parameter's option in `command`: its default, type and a help
        that states the bounds and the default."""
        if command not in self.commands:
            raise KeyError(f"{command} takes no {self.names['cli']}")
        default = self.default_for(command)
        kw: dict = {"default": default, "help": self.helps.get(command, self.help)}
        if self.kind is list:
            kw |= {"type": self.item, "action": "append", "default": None}
        elif self.kind in (int, float):
            kw["type"] = self.kind
        low, high = self.bounds()
        if self.kind in (int, float, list) and (low is not None or high is not None):
            kw["help"] += " (" + _range_words(low, high) + (f"; default {default})" if default is not None else ")")
        elif default not in (None, "") and self.kind is not list:
            kw["help"] += f" (default {default})"
        return (self.names["cli"], *self.flags), kw

    # --- checking ---------------------------------------------------------------------------------------------------
    def check(
        self,
        value,
        surface: str = "cli",
        *,
        label: str | None = None,
        high: float | None = None,
        fail: Callable[[str, str], Exception] | None = None,
    ):
        """`value` of this field's kind and within its bounds (the high one lowered to `high`, a server's limit),
        normalised (an int, a float); else `fail(field, message)` (default: InputError) naming the field as `surface`
        calls it (or as `label`)."""
        name = label or self.label(surface)
        hint = self.hints.get(surface, self.hint)
        tail = f"; {hint}" if hint else ""
        fail = fail or (lambda _field, message: InputError(message))
        field_name = name.removeprefix("param ")
        if value is None and self.optional:
            return None
        if self.kind is int:
            return _whole(name, value, *self.bounds(high), tail, lambda m: fail(field_name, m))
        if self.kind is float:
            return _number(name, value, *self.bounds(high), tail, lambda m: fail(field_name, m))
        if self.kind is str:
            if self.choices is not None and (not isinstance(value, str) or value not in self.choices):
                shown = repr(value[:40] if isinstance(value, str) else value)[:60]
                raise fail(field_name, f"{name} {shown} is not known; choose one of: {', '.join(self.choices)}")
            if not isinstance(value, str):
                raise fail(field_name, f"{name} must be text, not {type(value).__name__}{tail}")
            return value
        if not isinstance(value, (list, tuple)):
            raise fail(field_name, f"{name} must be a list, not {type(value).__name__}{tail}")
        if self.item is LoRASpec:
            return _loras(name, value, tail, lambda m: fail(field_name, m))
        return [_whole(name, v, *self.bounds(high), tail, lambda m: fail(field_name, m)) for v in value]


@dataclass(frozen=True)
class LoRASpec:
    """One LoRA a request applies: its file and scale; name: what the request called it (a served folder's name),
    sha256: the file's, once read (both recorded with the images)."""

    path: str
    scale: float = 1.0
    name: str = ""
    sha256: str = ""


def _loras(name: str, value, tail: str, fail) -> tuple[LoRASpec, ...]:
    """LoRAs as a request gives them (LoRASpec, or {"name": ..., "scale": ...} from an API) checked: a name, a
    finite scale, each LoRA once, a file given by its path present; fail(message) naming `name` otherwise."""
    out, seen = [], set()
    for v in value:
        if isinstance(v, dict):
            unknown = sorted(set(v) - {"name", "scale"})
            if unknown:
                raise fail(f"{name} entries take name and scale, not {', '.join(map(str, unknown))[:60]}{tail}")
            v = LoRASpec("", v.get("scale", 1.0), v.get("name"))  # the server finds the file by its name
        if not isinstance(v, LoRASpec) or not isinstance(v.name or v.path, str) or not (v.name or v.path):
            raise fail(f'{name} entries need a name: a LoRA of the server\'s folder, e.g. {{"name": "toy"}}{tail}')
        label = v.name or v.path
        scale = _number(f"{name} {label[:60]!r} scale", v.scale, None, None, tail, fail)
        if label in seen:
            raise fail(f"{name} names {label[:60]!r} twice; give each LoRA once (scales add: sum them)")
        if v.path and not Path(v.path).is_file():  # a library caller's file (a server's names are found later)
            raise fail(f"{name} {v.path[:200]}: no such file; give the path of a LoRA .safetensors")
        seen.add(label)
        out.append(LoRASpec(v.path, scale, v.name, v.sha256))
    return tuple(out)


def _range_words(low, high) -> str:
    if high is None:
        return f"at least {low}" if low is not None else "any"
    return f"between {low} and {high}" if low is not None else f"at most {high}"


def _whole(name: str, value, low, high, tail: str, fail) -> int:
    """`value` as an int in [low, high]; fail(message) naming `name` otherwise."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise fail(f"{name} {value!r} is not a whole number{tail}") from None
    if (low is not None and v < low) or (high is not None and v > high):
        raise fail(f"{name} {v} is out of range: it must be {_range_words(low, high)}{tail}")
    return v


def _number(name: str, value, low, high, tail: str, fail) -> float:
    """`value` as a finite float in [low, high]; fail(message) naming `name` otherwise."""
    within = f" from {low}" if low is not None else ""
    within += f" to {high}" if high is not None else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shown = repr(value) if not isinstance(value, str) else repr(value[:40])
        raise fail(f"{name} {shown} is not a number; it must be a finite number{within}{tail}")
    v = float(value)
    if not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high):
        raise fail(f"{name} {value!r} must be a finite number{within}{tail}")
    return v


def _names(cli: str | None = None, api: str | None = None, a1111: str | None = None, template: bool = False) -> dict:
    """Surface -> name: `api` for the OpenAI and native APIs, `a1111` (default `api`) for AUTOMATIC1111's."""
    out = {"cli": cli} if cli else {}
    if api:
        out |= {"openai": api, "native": api, "a1111": a1111 or api}
    if template:
        out["template"] = api
    return out


# --- the table ------------------------------------------------------------------------------------------------------
# The order is the order a template's parameters are listed in (n, steps, cfg, sampler, width, height, seed, eta).
FIELDS: tuple[Param, ...] = (
    Param(
        "n",
        int,
        16,
        "number of images",
        "ask for at least one image",
        low=1,
        names=_names("--n", "n", a1111="batch_size", template=True),
        flags=("--images",),  # under torchrun, `--n` is an ambiguous abbreviation of torchrun's own options
        defaults={"generate": 4, "img2img": 4, "inpaint": 1, "outpaint": 1, "upscale": 1, "evaluate": 10000}
        | {"video": 1, "openai": 1, "native": 1, "a1111": 1},
        hints={api: "ask for fewer images per request" for api in APIS},
        helps={
            "generate": "images per prompt",
            "img2img": "variations of the image",
            "inpaint": "edited images (several: OUT-0.png, OUT-1.png, ...)",
            "outpaint": "edited images (several: OUT-0.png, OUT-1.png, ...)",
            "upscale": "upscaled versions (several: OUT-0.png, OUT-1.png, ...)",
            "evaluate": "images to generate / reconstruct",
            "video": "clips (several: OUT-0.gif, OUT-1.gif, ...)",
        },
    ),
    Param(
        "labels",
        list,
        None,
        "class label for class-conditional models, -1 for none (repeat for several; default: all classes in turn)",
        "use a class number, or -1 for no label",
        low=-1,
        item=int,
        commands=DRAWING,
        names={"cli": "--label", "native": "labels"},
    ),
    Param(
        "negative_prompt",
        str,
        "",
        "what to steer away from (text models)",
        commands=DRAWING,
        names=_names("--negative-prompt", "negative_prompt"),
    ),
    Param(
        "steps",
        int,
        25,
        "sampling steps",
        "25 to 50 is usual",
        low=1,
        high=MAX_STEPS,
        names=_names("--steps", "steps", template=True),
        commands=(*SAMPLING, "synth"),
        defaults={"a1111": 20},  # AUTOMATIC1111's own default, which its clients expect
    ),
    Param(
        "cfg",
        float,
        3.0,
        "classifier-free guidance scale, 1 = off",
        "use a guidance scale such as 3 (1 turns guidance off)",
        low=0,
        names=_names("--cfg", "cfg", a1111="cfg_scale", template=True),
        commands=(*SAMPLING, "synth"),
        defaults={"openai": 5.0, "native": 5.0, "a1111": 7.0},  # the served text models' default; A1111's own
        aliases=("cfg_scale", "guidance_scale"),
    ),
    Param(
        "cfg_rescale",
        float,
        0.0,
        "guidance rescale phi",
        "0 turns it off, 0.7 is usual",
        low=0,
        high=1,
        commands=DRAWING,
        names={"cli": "--guidance-rescale"},
    ),
    Param(
        "sampler",
        str,
        "dpmpp_2m",
        f"one of: {', '.join(SAMPLERS)}",
        choices=tuple(SAMPLERS),
        names=_names("--sampler", "sampler", a1111="sampler_name", template=True),
        commands=(*SAMPLING, "synth"),
    ),
    Param(
        "width",
        int,
        0,
        "image width in pixels",
        "use 0 for the training resolution",
        low=0,
        commands=(),
        names=_names("--width", "width", template=True) | {"openai": "size"},
    ),
    Param(
        "height",
        int,
        0,
        "image height in pixels",
        "use 0 for the training resolution",
        low=0,
        commands=(),
        names=_names("--height", "height", template=True) | {"openai": "size"},
    ),
    Param(
        "seed",
        int,
        0,
        "image i uses seed + i, at any batch size",
        "use a seed from 0 upwards",
        low=0,
        high=SEED_END - 1,
        names=_names("--seed", "seed", template=True),
        commands=(*SAMPLING, "synth"),
        defaults=RANDOM_SEED,
        helps={"synth": "image k of label c is drawn from a seed hashed from this, c, k"},
        hints={
            "template": "leave seed out for a random seed",
            **{api: "use a seed from 0 upwards, or -1 / none for a random one" for api in APIS},
        },
    ),
    Param(
        "eta",
        float,
        None,
        "noise amount for ddim / ancestral / sde samplers",
        "use 0 (deterministic) to 1 (ancestral)",
        low=0,
        optional=True,
        commands=DRAWING,
        names={"cli": "--eta", "template": "eta"},
    ),
    Param(
        "loras",
        list,
        (),
        "LoRAs applied to this request's images alone, each with its scale (several requests with different LoRAs "
        "still share a batch)",
        "name LoRAs of the server's folder (GET /sdapi/v1/loras lists them), each with a finite scale",
        item=LoRASpec,
        commands=(),  # the commands take --lora FILE[:SCALE] (pipelines/lora.py)
        names={"openai": "loras", "native": "loras"},  # AUTOMATIC1111's: <lora:name:scale> in the prompt
    ),
    Param(
        "batch_size",
        int,
        16,
        "images per forward pass",
        "use 1 or more images per forward pass",
        low=1,
        names={"cli": "--batch-size"},
        commands=(*SAMPLING, "synth"),
        defaults={"inpaint": 4, "outpaint": 4, "upscale": 4, "evaluate": 50, "synth": 64, "video": 1},
        helps={"video": "clips per forward pass (each of --frames images)"},
    ),
    Param(
        "device",
        str,
        "auto",
        "auto, cpu, cuda, cuda:1 ...",
        names={"cli": "--device"},
        commands=(*SAMPLING, "synth"),
    ),
    Param(
        "precision",
        str,
        "fp32",
        "what the sampling steps compute in: fp32, bf16 (autocast, where the CPU or GPU has native bf16; the "
        "decoder stays fp32) or auto (bf16 where native, else fp32)",
        choices=SAMPLING_PRECISIONS,
        names={"cli": "--precision"},
        commands=DRAWING,
    ),
    Param(
        "backend",
        str,
        "torch",
        "what runs the denoiser's network on the CPU: torch, or openvino (exported once per model and shape, cached "
        "in $LDMKIT_CACHE/openvino; each image one inference, so batch-invariant too; pip install 'ldmkit[openvino]')",
        choices=BACKENDS,
        names={"cli": "--backend"},
        commands=("sample", "generate", "img2img", "inpaint", "outpaint"),
    ),
)
SPEC: Mapping[str, Param] = MappingProxyType({p.name: p for p in FIELDS})


def param(name: str) -> Param:
    return SPEC[name]


def default(name: str, where: str = "cli"):
    """The default of field `name` in a command or API (see Param.default_for)."""
    return SPEC[name].default_for(where)


def taken_by(surface: str) -> tuple[Param, ...]:
    """The fields a surface takes, in table order."""
    return tuple(p for p in FIELDS if surface in p.names)


def api_names(surface: str) -> dict[str, str]:
    """Field -> the name an API uses, where it differs (A1111: cfg -> cfg_scale; OpenAI: width -> size)."""
    return {p.name: p.names[surface] for p in taken_by(surface) if p.names[surface] != p.name}


def _raise(fail, field_name: str, message: str):
    raise (fail or (lambda _f, m: InputError(m)))(field_name, message)


def check_seed_count(seed: int, n: int, surface: str = "cli", fail=None, label: str | None = None) -> None:
    """Image i uses seed + i: every one of the n images needs a seed below SEED_END."""
    if seed + n > SEED_END:
        label = label or SPEC["seed"].label(surface)
        message = (
            f"{label} {seed}: image i uses seed + i, and {n} images need seeds below 2**63 ({SEED_END}); use a seed "
            f"of at most {SEED_END - n}"
        )
        _raise(fail, label.removeprefix("param "), message)


def check_eta_sampler(eta, sampler: str, surface: str = "cli", fail=None, names: Mapping[str, str] | None = None):
    """eta only with the samplers that take it (ddim, ancestral, sde). names: the surface's own names of eta and
    sampler, where the table has none (eta in the APIs, which take it only from a template)."""
    if eta is None or sampler in ETA_SAMPLERS:
        return
    names = names or {}
    eta_name = names.get("eta") or SPEC["eta"].names.get(surface, "eta")
    sampler_name = names.get("sampler") or SPEC["sampler"].names.get(surface, "sampler")
    eta_label = f"param {eta_name}" if surface == "template" else eta_name
    message = (
        f"{eta_label} applies to the {', '.join(ETA_SAMPLERS)} samplers, not {sampler_name} {sampler}; drop "
        f"{eta_name} or choose one of those"
    )
    _raise(fail, eta_name, message)


def whole_number(option: str, value, low: int, high: int | None = None, hint: str = "") -> int:
    """`value` as an int in [low, high]; InputError naming `option` otherwise (for the options outside the table:
    --per-class, --resample, --tile, ...)."""
    return _whole(option, value, low, high, f"; {hint}" if hint else "", InputError)


# --- what a model samples with when a command does not say --------------------------------------------------------
MODEL_CHOSEN = ("sampler", "steps", "cfg")  # the settings a model may choose for a command that leaves them out
LCM_STEPS = 8  # a consistency model's useful steps: more are allowed, with a note


def distilled_sampling(steps: int) -> dict:
    """What a consistency-distilled model (or an LCM-LoRA) samples with unless told otherwise: the LCM sampler, the
    steps it was distilled for, and no guidance (the teacher's is folded in)."""
    return {"sampler": "lcm", "steps": int(steps), "cfg": 1.0}


def model_sampling(config: Mapping | None) -> dict:
    """The settings of MODEL_CHOSEN a model's recorded configuration chooses: a distilled model's; {} for the rest
    (the table's defaults apply)."""
    steps = ((config or {}).get("distill") or {}).get("steps")
    return distilled_sampling(steps) if steps else {}


def lcm_note(sampler: str, steps: int, option: str = "--steps") -> str | None:
    """The note for a consistency model asked for more steps than it was made for (allowed, but slower and no
    better), else None. option: what the surface calls the steps (an API's field: steps)."""
    if sampler == "lcm" and steps > LCM_STEPS:
        return (
            f"note: {steps} LCM steps; a consistency model draws its images in 1 to {LCM_STEPS} steps, so more cost "
            f"time without helping ({option} 4 is usual)"
        )
    return None


# --- the request ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleRequest:
    """What to generate. Each value is checked against the table when the request is built, naming the
    command-line option to change (--cfg, --seed, ...); the defaults are the table's."""

    n: int = SPEC["n"].default  # number of images
    labels: list[int] | None = None  # class labels, cycled over the n images; None: every class in turn; -1: none
    prompts: list[str] | None = None  # one prompt per image (text models), cycled when fewer
    negative_prompt: str = SPEC["negative_prompt"].default  # the guidance's unconditional branch (text models)
    sampler: str = SPEC["sampler"].default
    steps: int = SPEC["steps"].default
    cfg: float = SPEC["cfg"].default  # classifier-free guidance scale; 1 disables guidance
    cfg_rescale: float = SPEC["cfg_rescale"].default  # guidance rescale phi in [0, 1]
    seed: int = SPEC["seed"].default  # image i is drawn with seed + i, whatever the batch size
    height: int = SPEC["height"].default  # pixels; 0: the training resolution
    width: int = SPEC["width"].default
    batch_size: int = SPEC["batch_size"].default  # images per forward pass
    device: str = SPEC["device"].default
    eta: float | None = SPEC["eta"].default  # stochasticity of ddim / ancestral / sde samplers (None: the sampler's)
    loras: tuple[LoRASpec, ...] = SPEC["loras"].default  # applied per image, so requests with others still batch
    precision: str = SPEC["precision"].default  # fp32, bf16 or auto: the sampling steps' autocast (runtime.py)
    backend: str = SPEC["backend"].default  # torch or openvino: what runs the backbone (pipelines/openvino.py)

    def __post_init__(self):
        for p in FIELDS:
            if p.name not in ("device", "loras") and not (p.name == "labels" and self.labels is None):  # device:
                p.check(getattr(self, p.name))  # resolve_device checks it
        object.__setattr__(self, "loras", SPEC["loras"].check(self.loras, label="--lora"))
        check_seed_count(self.seed, self.n)
        check_eta_sampler(self.eta, self.sampler)
        if self.prompts is not None:
            if isinstance(self.prompts, str) or not all(isinstance(p, str) for p in self.prompts):
                raise InputError("prompts must be a list of strings, one per image")
            if not self.prompts:
                raise InputError("the prompt list is empty; give at least one prompt, or none for unconditional")

    def record(self, *drop: str) -> dict:
        """The request as its images and audit rows record it: every field but the device, the batching and `drop`;
        its LoRAs, when it has any, by name, SHA-256 and scale (never a server's path)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("device", "batch_size", "loras", *drop)}
        for name in ("precision", "backend"):  # their defaults record nothing: the same record as before the options
            if out.get(name) == SPEC[name].default:
                out.pop(name, None)
        if self.loras:
            out["loras"] = [
                {"name": s.name or Path(s.path).name, "sha256": s.sha256 or file_sha256(s.path), "scale": s.scale}
                for s in self.loras
            ]
        return out

    def sampling(self) -> dict:
        """The request's options as sample_latents takes them: sampler, steps, guidance, eta."""
        eta = {} if self.eta is None else {"eta": self.eta}
        return dict(sampler=self.sampler, steps=self.steps, cfg_scale=self.cfg, cfg_rescale=self.cfg_rescale, **eta)
