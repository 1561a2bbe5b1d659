"""Request bodies of the APIs (OpenAI images and videos, AUTOMATIC1111, native jobs) and their translation into
ldmkit's SampleRequest, checked against the server's limits and the model. Every refusal names the field."""

from __future__ import annotations

import base64
import binascii
import functools
import io
import re
import secrets
from types import SimpleNamespace

from PIL import Image, UnidentifiedImageError

from ..config import ServeLimits
from ..data.images import to_tensor
from ..errors import InputError
from ..pipelines.request import SPEC, SampleRequest, check_eta_sampler, check_seed_count

A1111_SAMPLERS = {  # AUTOMATIC1111's sampler names -> ldmkit's (the schedules are each model's own)
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "Euler": "euler",
    "Euler a": "euler_ancestral",
    "Heun": "heun",
    "DDIM": "ddim",
    "DDPM": "ddpm",
    "UniPC": "unipc",
    "LCM": "lcm",
}
SEED_MAX = SPEC["seed"].high  # seeds the APIs take (each image uses seed + i, below 2**63)
A1111_DEFAULT_SAMPLER = next(a for a, ours in A1111_SAMPLERS.items() if ours == SPEC["sampler"].default_for("a1111"))


class FieldError(InputError):
    """A request field with a value the server refuses; `.field` names it (the OpenAI error's `param`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@functools.cache
def api_models() -> SimpleNamespace:
    """The request bodies as pydantic models (pydantic comes with the `serve` extra, so they are built on first
    use): OpenAIImageRequest, A1111Request, JobRequest and VideoRequest. The generation parameters' defaults and
    bounds come from the parameter table (spec_field)."""
    from pydantic import BaseModel, ConfigDict, Field

    def spec_field(name: str, surface: str, default=...):
        """The field of the table's parameter `name` (pipelines/request.py): the default `surface` has, the help,
        and the bounds in the JSON schema (sample_request checks them, naming the field as the client sent it and
        lowering the high bounds to the server's limits). The default is validated as the field's type, so the
        table's `()` for loras becomes the list the body declares (a tuple left there warns on every model_dump)."""
        p = SPEC[name]
        bounds = {k: v for k, v in (("minimum", p.low), ("maximum", p.high)) if v is not None}
        value = p.default_for(surface) if default is ... else default
        return Field(value, description=p.help, json_schema_extra=bounds or None, validate_default=True)

    class LoRAItem(BaseModel):
        """One LoRA of a request: a name of the server's LoRA folder (GET /sdapi/v1/loras) and its scale."""

        model_config = ConfigDict(extra="forbid")
        name: str
        scale: float = 1.0

    class OpenAIImageRequest(BaseModel):
        """POST /v1/images/generations: OpenAI's fields, and ldmkit's own as extras."""

        model_config = ConfigDict(extra="forbid")
        prompt: str = ""  # OpenAI requires it; here a template may stand in for it
        template: str | None = None  # "name" or "name@3": a prompt template instead of prompt / negative_prompt
        variables: dict[str, str] | None = None  # the template's variables
        n: int = spec_field("n", "openai")
        size: str | None = None  # "WIDTHxHEIGHT" (the table's width and height); None: the training resolution
        response_format: str | None = "b64_json"
        user: str | None = None
        model: str | None = None
        quality: str | None = None  # accepted for compatibility; ldmkit's quality is steps
        style: str | None = None  # accepted for compatibility; ignored
        negative_prompt: str = spec_field("negative_prompt", "openai")
        steps: int = spec_field("steps", "openai")
        cfg: float = spec_field("cfg", "openai")
        seed: int | None = spec_field("seed", "openai")  # None: a random seed, returned with each image
        sampler: str = spec_field("sampler", "openai")
        loras: list[LoRAItem] = spec_field("loras", "openai")  # LoRAs of the server's folder, applied per image

    class A1111Request(BaseModel):
        """POST /sdapi/v1/txt2img and img2img: AUTOMATIC1111's field names. Fields ldmkit does not use (styles,
        restore_faces, override_settings, ...) are accepted and listed in the answer's info as ignored."""

        model_config = ConfigDict(extra="allow")
        prompt: str = ""
        negative_prompt: str = spec_field("negative_prompt", "a1111")
        steps: int = spec_field("steps", "a1111")
        cfg_scale: float = spec_field("cfg", "a1111")
        seed: int = spec_field("seed", "a1111")  # -1: random
        batch_size: int = spec_field("n", "a1111")  # n = batch_size x n_iter
        n_iter: int = 1
        width: int = spec_field("width", "a1111")  # 0: the model's training resolution
        height: int = spec_field("height", "a1111")
        sampler_name: str = spec_field("sampler", "a1111", A1111_DEFAULT_SAMPLER)  # A1111's name of the sampler
        model: str | None = None
        denoising_strength: float = 0.75  # img2img
        init_images: list[str] = Field(default_factory=list)  # img2img: base64 images
        mask: str | None = None  # img2img: a base64 mask, white where the image is repainted
        mask_blur: int = 4
        template: str | None = None  # "name" or "name@3": a prompt template instead of prompt / negative_prompt
        variables: dict[str, str] | None = None  # the template's variables

        def checkpoint(self) -> str | None:
            """The model A1111 clients name in override_settings.sd_model_checkpoint, if any."""
            settings = (self.model_extra or {}).get("override_settings")
            name = settings.get("sd_model_checkpoint") if isinstance(settings, dict) else None
            return name if isinstance(name, str) else None

    class NativeRequest(BaseModel):
        """What ldmkit's own routes (jobs, videos) take first: the model and the prompt, written or templated."""

        model_config = ConfigDict(extra="forbid")
        model: str | None = None
        prompt: str = ""
        negative_prompt: str = spec_field("negative_prompt", "native")
        template: str | None = None  # "name" or "name@3": a prompt template instead of prompt / negative_prompt
        variables: dict[str, str] | None = None  # the template's variables
        labels: list[int] | None = spec_field("labels", "native")

    class JobRequest(NativeRequest):
        """POST /v1/jobs: a generation to run in the background."""

        n: int = spec_field("n", "native")
        steps: int = spec_field("steps", "native")
        cfg: float = spec_field("cfg", "native")
        seed: int | None = spec_field("seed", "native")
        sampler: str = spec_field("sampler", "native")
        width: int = spec_field("width", "native")
        height: int = spec_field("height", "native")
        loras: list[LoRAItem] = spec_field("loras", "native")
        # ControlNet units: image (base64), kind, model, scale, start, end; read by serve/controls.py
        controls: list[dict] = Field(default_factory=list)

    class VideoRequest(NativeRequest):
        """POST /v1/videos: OpenAI's fields (prompt, model, seconds, size, input_reference) and ldmkit's own."""

        seconds: str | float | None = None  # OpenAI's length ("4"): frames = seconds x fps
        frames: int | None = None  # frames of the clip, instead of seconds; neither: 16, as `ldmkit video`
        fps: float = 8.0  # frames per second of the MP4
        size: str | None = None  # "WIDTHxHEIGHT"; None: the model's training resolution
        input_reference: str | dict | None = None  # the first frame: base64 or {"image_url": "data:image/png;..."}
        steps: int = spec_field("steps", "native")
        cfg: float = spec_field("cfg", "native")
        seed: int | None = spec_field("seed", "native")
        sampler: str = spec_field("sampler", "native")
        loras: list[LoRAItem] = spec_field("loras", "native")

    return SimpleNamespace(
        OpenAIImageRequest=OpenAIImageRequest,
        A1111Request=A1111Request,
        JobRequest=JobRequest,
        VideoRequest=VideoRequest,
    )


def parse_size(size: str | None) -> tuple[int, int]:
    """OpenAI's "WIDTHxHEIGHT" -> (width, height); None -> (0, 0), the model's own resolution."""
    if size is None or size == "auto":
        return 0, 0
    m = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size)
    if not m:
        raise FieldError("size", f"size {size[:40]!r} is not WIDTHxHEIGHT, e.g. 64x64")
    width, height = int(m.group(1)), int(m.group(2))
    if width == 0 or height == 0:
        raise FieldError("size", f"size {size} has a side of 0 pixels; give both sides, e.g. 64x64, or leave size out")
    return width, height


def option_field(message: str, names: dict[str, str]) -> tuple[str, str]:
    """(field, message) for a SampleRequest error that names its command-line option ("--seed 5: ..."): the field
    as the client sent it (names: the API's name of each field) and the message in its words."""
    m = re.match(r"--([a-z-]+)", message)
    if m is None:
        return "body", message
    key = {"label": "labels"}.get(m.group(1), m.group(1).replace("-", "_"))
    field = names.get(key, key)
    return field, field + message[m.end() :]


def check_for_model(req: SampleRequest, multiple: int, num_classes: int, names: dict[str, str]) -> None:
    """FieldError naming the field when the model cannot take the request: a side that is not a multiple of the
    model's `multiple`, or labels it does not have."""
    for key in ("width", "height"):
        v = getattr(req, key)
        if v % multiple:
            lower = v // multiple * multiple
            use = f"{lower} or {lower + multiple}" if lower else f"{multiple}"
            field = names.get(key, key)
            said = f"size {req.width}x{req.height}: {key}" if field == "size" else key
            raise FieldError(field, f"{said} {v} is not a multiple of {multiple}, as this model needs; use {use}")
    for label in req.labels or ():
        if not num_classes:
            raise FieldError("labels", "this model is not class-conditional; drop labels")
        if not -1 <= label < num_classes:
            raise FieldError(
                "labels", f"label {label} is out of range: this model has classes 0 to {num_classes - 1} (-1: none)"
            )


def _text(field: str, v: str, limits: ServeLimits) -> str:
    if len(v) > limits.max_prompt_chars:
        raise FieldError(field, f"{field} has {len(v)} characters; the limit is {limits.max_prompt_chars}")
    if "\x00" in v:
        raise FieldError(field, f"{field} contains a NUL character; remove it")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate ("\ud800") that JSON can carry and no text encoder reads
        raise FieldError(
            field, f"{field} holds an unpaired surrogate at character {e.start}; send valid Unicode"
        ) from None
    return v


def sample_request(
    fields: dict,
    limits: ServeLimits,
    *,
    names: dict[str, str] | None = None,
    class_names: list[str] | None = None,
    text: bool = True,
) -> SampleRequest:
    """A SampleRequest from the API's values (keys: prompt, negative_prompt, labels, n, steps, cfg, seed, sampler,
    width, height, eta: the parameter table's names), each checked against the table and the server's `limits`.
    names: the API's name of each key, for the errors (A1111 says cfg_scale; request.api_names(surface) gives
    them). class_names: a class model's labels, which a prompt may name; text: whether the model reads prompts."""
    names = names or {}
    highs = {"n": limits.max_n, "steps": limits.max_steps, "cfg": limits.max_cfg}
    highs |= {"width": limits.max_side, "height": limits.max_side}

    def check(key: str, value):
        return SPEC[key].check(value, "native", label=names.get(key, key), high=highs.get(key), fail=FieldError)

    n, steps, cfg, sampler = (check(k, fields[k]) for k in ("n", "steps", "cfg", "sampler"))
    width, height = check("width", fields["width"]), check("height", fields["height"])
    seed = fields.get("seed")
    seed = check("seed", secrets.randbelow(2**31) if seed is None or seed == -1 else seed)
    check_seed_count(seed, n, fail=FieldError, label=names.get("seed", "seed"))
    eta = check("eta", fields.get("eta"))
    check_eta_sampler(eta, sampler, "native", FieldError, {k: names.get(k, k) for k in ("eta", "sampler")})
    prompt = _text(names.get("prompt", "prompt"), fields.get("prompt", ""), limits)
    negative = _text(names.get("negative_prompt", "negative_prompt"), fields.get("negative_prompt", ""), limits)
    labels = fields.get("labels")
    labels = check("labels", labels) if labels is not None else None
    loras = check("loras", fields.get("loras") or ())  # names of the server's LoRA folder, found by the service
    prompts = [prompt] if prompt else None
    if not text:
        labels, prompts = _labels_from_prompt(prompt, labels, class_names or [], names.get("prompt", "prompt"))
        negative = ""
    return SampleRequest(
        n=n,
        prompts=prompts,
        labels=labels,
        negative_prompt=negative,
        sampler=sampler,
        steps=steps,
        cfg=cfg,
        seed=seed,
        width=width,
        height=height,
        batch_size=limits.max_n,
        eta=eta,
        loras=loras,
    )


def _labels_from_prompt(prompt: str, labels, class_names: list[str], field: str):
    """A class model takes no prompt but may be asked for a class by its name ("Ankle boot")."""
    if not prompt:
        return labels, None
    if not class_names:
        raise FieldError(field, "this model is unconditional and takes no prompt; send an empty prompt")
    lower = [c.lower() for c in class_names]
    if prompt.strip().lower() not in lower:
        raise FieldError(
            field, f"this model draws classes, not prompts; the prompt must be one of: {', '.join(class_names)}"
        )
    return [lower.index(prompt.strip().lower())], None


def decode_image(field: str, data: str, channels: int, max_bytes: int):
    """A base64 image (a data: URL prefix allowed) -> (1, C, H, W) in [-1, 1]; FieldError when it is not one."""
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    if len(data) * 3 // 4 > max_bytes:
        raise FieldError(field, f"{field} is larger than the {max_bytes} bytes an upload may have")
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > 2048 * 2048:
                raise FieldError(field, f"{field} is {img.width}x{img.height}; the limit is 2048x2048 pixels")
            img.load()
            img = img.convert("L" if channels == 1 else "RGB")
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise FieldError(field, f"{field} is not a base64-encoded PNG, JPEG or WebP image") from None
    return to_tensor(img)[None]
