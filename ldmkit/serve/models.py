"""The models a server holds: each loaded once, with the SHA-256 of its weights for the audit trail, and the sampling
settings it chooses for requests that leave them out (a distilled model's)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..checkpoint import file_sha256
from ..errors import InputError
from ..ldm import LatentDiffusion
from ..pipelines.inpaint import concat_channels
from ..pipelines.plan import check_samples_from_noise
from ..pipelines.request import model_sampling
from ..runtime import resolve_device
from ..shipped import SHIPPED, STYLE_LORAS, load_model, resolve_model, weights_dir

GENERATIONS, TXT2IMG, IMG2IMG, JOBS = "/v1/images/generations", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/jobs"
VIDEOS = "/v1/videos"
WHAT = {GENERATIONS: "generation", TXT2IMG: "generation", JOBS: "generation", IMG2IMG: "img2img and inpainting"}
WHAT[VIDEOS] = "video"


@dataclass
class ServedModel:
    name: str
    ldm: LatentDiffusion
    path: Path  # the model file, or a LoRA that names its base (an LCM-LoRA served as a model of its own)
    sha256: str  # of that file, recorded with every request it serves (a LoRA's records its base's SHA-256)

    def describe(self) -> dict:
        """What GET /v1/models says about the model beside its name."""
        ldm = self.ldm
        return {
            "task": ldm.task,
            "resolution": ldm.run.data.resolution,
            "multiple": ldm.factor * ldm.run.backbone.factor,
            "channels": ldm.ae_config.in_channels,
            "text": ldm.text_encoder is not None,
            "classes": ldm.class_names,
            "sha256": self.sha256,
            "routes": self.routes(),
            "sampling": self.own_sampling(),
        }

    def own_sampling(self) -> dict:
        """The sampler, steps and guidance this model samples with where a request leaves them out: a distilled
        model's (lcm, its steps, cfg 1; pipelines/request.py model_sampling); {} for the rest, which take the API's
        defaults."""
        return model_sampling(asdict(self.ldm.run))

    def routes(self) -> list[str]:
        """The POST routes that can use this model: a generation model serves the image routes; a model that needs
        more than noise to start from (an inpainting model: an image and a mask) serves img2img with a mask only; a
        video model (its task's routes name /v1/videos) serves the video route only."""
        if VIDEOS in self.ldm.task_spec.routes:
            return [VIDEOS]
        try:
            check_samples_from_noise(self.ldm)
            return [GENERATIONS, TXT2IMG, IMG2IMG, JOBS]
        except InputError:
            pass
        try:
            concat_channels(self.ldm)  # an upscaler cannot inpaint either
            return [IMG2IMG]
        except InputError:
            return []

    def refusal(self, route: str, models: dict) -> str:
        """Why `route` cannot use this model, naming the routes it serves and the models that serve `route`."""
        own = ", ".join(f"POST {r}" for r in self.routes()) or "no route of this server"
        others = [n for n, m in models.items() if route in m.routes()]
        use = f"use one of: {', '.join(others)}" if others else "this server has no model for it"
        needs = " with a mask" if self.routes() == [IMG2IMG] else ""
        return f"model {self.name!r} cannot be used for {WHAT[route]} (POST {route}); it serves {own}{needs}; {use}"


def default_models() -> list[str]:
    """Every shipped model whose weights are present and that generates or edits from prompts or labels (the
    upscaler is left out: the APIs here generate, and img2img / inpaint work with generation models; so are the
    example style LoRAs, which a server applies from its serve.loras folder)."""
    names = [n for n in SHIPPED if (weights_dir() / f"{n}.safetensors").is_file()]
    return [n for n in names if not n.endswith("-upscale") and n not in STYLE_LORAS]


def load_models(names: list[str] | tuple[str, ...], device: str = "auto") -> dict[str, ServedModel]:
    """name -> ServedModel for shipped names or model files (a file is served under its stem, or its folder's name
    for a run's model.safetensors or lora.safetensors). A LoRA that names its base (an LCM-LoRA) is served as that
    base with the LoRA merged (shipped.load_model). Errors name the model; two models may not share a name."""
    dev = resolve_device(device, "--device")
    out: dict[str, ServedModel] = {}
    for given in names or default_models():
        path = resolve_model(given)
        name = given if given in SHIPPED else (path.parent.name if path.stem in ("model", "lora") else path.stem)
        if name in out:
            raise InputError(f"two --model values are both served as {name!r}; rename one of the files")
        out[name] = ServedModel(name, load_model(path, dev), path, file_sha256(path))
    if not out:
        raise InputError("no model to serve: no shipped weights are present; give --model PATH")
    return out
