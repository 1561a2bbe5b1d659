"""OpenAI's images API: GET /v1/models and POST /v1/images/generations (ldmkit's own fields as extras), answered in
the shapes the official `openai` client reads."""

import time

from ..deps import parse_body, typed
from ..models import GENERATIONS
from ..schemas import FieldError, api_models, parse_size
from .common import checked_request, templated

SIZE = {"width": "size", "height": "size"}  # OpenAI's name of the fields it folds into one


def router():
    """The APIRouter of OpenAI's images API."""
    from fastapi import APIRouter, Request
    from pydantic import BaseModel, ConfigDict

    t = typed()

    class Model(BaseModel):
        model_config = ConfigDict(extra="allow")  # and what the model describes of itself (models.ServedModel)
        id: str
        object: str
        created: int
        owned_by: str

    class Models(BaseModel):
        object: str
        data: list[Model]

    class Image(BaseModel):
        b64_json: str | None  # None where the safety filter withheld it
        revised_prompt: str | None
        seed: int
        withheld: str | None = None  # only where it was withheld or blurred: why

    class Images(BaseModel):
        created: int
        data: list[Image]

    r = APIRouter(tags=["openai"], default_response_class=t.JSON)

    @r.get("/v1/models", response_model=Models, response_model_exclude_unset=True)
    async def list_models(_: t.ViewerKey, svc: t.ServiceDep):
        created = int(time.time())
        data = [
            {"id": n, "object": "model", "created": created, "owned_by": "ldmkit", **m.describe()}
            for n, m in svc.models.items()
        ]
        return {"object": "list", "data": data}

    @r.post("/v1/images/generations", response_model=Images, response_model_exclude_unset=True)
    async def generate(request: Request, principal: t.UserKey, svc: t.ServiceDep):
        body = await parse_body(request, api_models().OpenAIImageRequest)
        if body.response_format not in (None, "b64_json"):
            raise FieldError("response_format", "this server returns images inline only; use response_format b64_json")
        served = svc.model(body.model)
        width, height = parse_size(body.size)
        fields = dict(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt,
            n=body.n,
            steps=body.steps,
            cfg=body.cfg,
            seed=body.seed,
            sampler=body.sampler,
            width=width,
            height=height,
            loras=[lora.model_dump() for lora in body.loras],
        )
        fields, used = templated(svc, served, body, fields, SIZE)
        req = checked_request(svc, served, fields, SIZE, GENERATIONS)
        svc.check(served, req, principal)
        out = await svc.generate(request, principal, served, req, user=body.user, **used)
        data = [
            {"b64_json": b, "revised_prompt": None, "seed": s} | ({"withheld": why} if why else {})
            for b, s, why in zip(out.b64(), out.seeds, out.withheld)
        ]
        return {"created": int(time.time()), "data": data}

    return r
