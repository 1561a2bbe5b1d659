"""AUTOMATIC1111's API: POST /sdapi/v1/txt2img and /sdapi/v1/img2img, GET /sdapi/v1/sd-models, /sdapi/v1/samplers
and /sdapi/v1/loras, with A1111's field names translated to ldmkit's and back (LoRAs: `<lora:name:scale>` in the
prompt); the ControlNet extension's alwayson_scripts.controlnet units, /controlnet/model_list and module_list."""

import json
from dataclasses import replace

from ..controls import MODULES, a1111_units, steered_edit, uses_controlnet
from ..deps import parse_body, typed
from ..edits import a1111_edit
from ..loras import prompt_loras
from ..models import IMG2IMG, TXT2IMG
from ..schemas import A1111_SAMPLERS, FieldError, api_models
from .common import checked_request, notes, templated

NAMES = {"n": "batch_size", "cfg": "cfg_scale", "sampler": "sampler_name", "loras": "prompt"}  # ldmkit's -> A1111's
A1111_NAMES = {ours: theirs for theirs, ours in A1111_SAMPLERS.items()}  # ldmkit's sampler -> A1111's sampler_name


def router():
    """The APIRouter of A1111's API."""
    from fastapi import APIRouter, Request
    from pydantic import BaseModel, ConfigDict

    t = typed()

    class Answer(BaseModel):
        images: list[str]  # base64 PNGs; withheld ones are left out (A1111 clients expect strings)
        parameters: dict  # the request as A1111 echoes it
        info: str  # JSON: the generation's own record

    class SdModel(BaseModel):
        model_config = ConfigDict(protected_namespaces=())
        title: str
        model_name: str
        hash: str
        sha256: str
        filename: str

    class Sampler(BaseModel):
        name: str
        aliases: list[str]
        options: dict

    r = APIRouter(tags=["a1111"], default_response_class=t.JSON)

    @r.post("/sdapi/v1/txt2img", response_model=Answer)
    async def txt2img(request: Request, principal: t.UserKey, svc: t.ServiceDep):
        body = await parse_body(request, api_models().A1111Request)
        served, req, fields, used = a1111_request(svc, body, TXT2IMG)
        svc.check(served, req, principal)
        units = a1111_units(svc, served, body, req)  # ControlNet units: batched with any generation
        out = await svc.generate(request, principal, served, req, units=units, **used)
        return a1111_answer(body, served, req, out, fields)

    @r.post("/sdapi/v1/img2img", response_model=Answer)
    async def img2img(request: Request, principal: t.UserKey, svc: t.ServiceDep):
        body = await parse_body(request, api_models().A1111Request)
        served, req, fields, used = a1111_request(svc, body, IMG2IMG)
        svc.check_policy(req, principal)
        if not body.init_images:
            raise FieldError("init_images", "img2img needs init_images: one base64-encoded image")
        at_image_size = replace(req, width=0, height=0)  # an edit works at the init image's own size
        edit, extra = a1111_edit(served.ldm, body, at_image_size, svc.limits)
        w, h = (int(v) for v in extra["init_image"].split("x"))
        strength = 1.0 if body.mask is not None else body.denoising_strength  # inpainting runs every step
        units = a1111_units(svc, served, body, at_image_size, (h, w))
        edit = steered_edit(edit, units, at_image_size.steps, strength)  # an edit runs alone, its units around it
        # the units ride on the job too, so its cost counts their ControlNet passes (the edit applies them itself)
        out = await svc.generate(request, principal, served, at_image_size, run=edit, units=units, **extra, **used)
        return a1111_answer(body, served, req, out, fields)

    @r.get("/sdapi/v1/sd-models", response_model=list[SdModel])
    async def sd_models(_: t.ViewerKey, svc: t.ServiceDep):
        return [
            {"title": n, "model_name": n, "hash": m.sha256[:10], "sha256": m.sha256, "filename": str(m.path.name)}
            for n, m in svc.models.items()
        ]

    class LoRA(BaseModel):
        name: str
        alias: str
        path: str  # inside the server's LoRA folder
        metadata: dict

    @r.get("/sdapi/v1/loras", response_model=list[LoRA])
    async def loras(principal: t.ViewerKey, svc: t.ServiceDep):
        """The LoRAs of the server's folder that the caller's role may apply, as <lora:NAME:SCALE> names them."""
        names = svc.loras.names(principal.role)
        return [{"name": n, "alias": n, "path": f"{n}.safetensors", "metadata": {}} for n in names]

    class ControlNetModels(BaseModel):
        model_list: list[str]  # "name [first 8 hex digits of its SHA-256]", as the extension lists them

    class ControlNetModules(BaseModel):
        module_list: list[str]

    @r.get("/controlnet/model_list", response_model=ControlNetModels)
    async def controlnet_models(_: t.ViewerKey, svc: t.ServiceDep):
        """The ControlNets of the server's folder (serve.controlnets), as units name them in their model field."""
        return {"model_list": svc.controlnets.model_list()}

    @r.get("/controlnet/module_list", response_model=ControlNetModules)
    async def controlnet_modules(_: t.ViewerKey):
        """The preprocessors a unit's module may name ("none": the image is the condition already)."""
        return {"module_list": list(MODULES)}

    @r.get("/sdapi/v1/samplers", response_model=list[Sampler])
    async def samplers(_: t.ViewerKey):
        return [{"name": a, "aliases": [ours], "options": {}} for a, ours in A1111_SAMPLERS.items()]

    return r


def a1111_request(svc, body, route: str):
    """(the served model, the SampleRequest, its fields, the template's audit entries) of an A1111 body."""
    served = svc.model(body.model or body.checkpoint(), "model")
    sampler = A1111_SAMPLERS.get(body.sampler_name, body.sampler_name)
    if sampler not in A1111_SAMPLERS.values():
        raise FieldError(
            "sampler_name",
            f"sampler_name {body.sampler_name[:40]!r} is not available; use one of: {', '.join(A1111_SAMPLERS)}",
        )
    if not (1 <= body.batch_size and 1 <= body.n_iter):
        raise FieldError("batch_size", "batch_size and n_iter must be at least 1")
    fields = dict(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        n=body.batch_size * body.n_iter,
        steps=body.steps,
        cfg=body.cfg_scale,
        seed=body.seed,
        sampler=sampler,
        width=body.width,
        height=body.height,
    )
    fields, used = templated(svc, served, body, fields, NAMES)
    fields["prompt"], fields["loras"] = prompt_loras(fields["prompt"])  # <lora:name:scale>, taken out of the prompt
    return served, checked_request(svc, served, fields, NAMES, route), fields, used


def a1111_answer(body, served, req, out, fields: dict) -> dict:
    """A1111's answer: the images, the request's parameters, and `info` (a JSON string) with what was made."""
    info = {
        "prompt": fields["prompt"],  # a template's, filled in, when the request named one
        "all_prompts": [fields["prompt"]] * req.n,
        "negative_prompt": fields["negative_prompt"],
        "seed": req.seed,
        "all_seeds": out.seeds,
        "steps": req.steps,
        "cfg_scale": req.cfg,
        "sampler_name": A1111_NAMES.get(req.sampler, req.sampler),  # the model's own where the body named none
        "width": req.width or served.ldm.run.data.resolution,
        "height": req.height or served.ldm.run.data.resolution,
        "sd_model_name": served.name,
        "sd_model_hash": served.sha256[:10],
        "ignored": sorted(k for k in body.model_extra or {} if k != "alwayson_scripts" or not uses_controlnet(body)),
        "withheld": [
            {"index": i, "seed": s, "reason": why} for i, (s, why) in enumerate(zip(out.seeds, out.withheld)) if why
        ],
        "notes": notes(req),  # what the request was allowed but advised against (more LCM steps than useful)
    }
    params = body.model_dump(exclude={"init_images", "mask"})
    images = [b for b in out.b64() if b is not None]  # A1111 clients expect strings: withheld ones are left out
    return {"images": images, "parameters": params, "info": json.dumps(info)}
