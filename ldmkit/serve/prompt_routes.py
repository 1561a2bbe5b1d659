"""The routes of prompt templates: GET/POST /v1/prompts, GET /v1/prompts/{ref}, POST /v1/prompts/{name}/retire.
Anyone with a key may read templates (viewer); only admins add and retire them."""

from .prompts import TemplateError, Templates

STATUS = {"invalid": 400, "missing": 404, "retired": 410, "conflict": 409}  # TemplateError.reason -> HTTP status


def add_prompt_routes(app, svc, templates: Templates, parse, fail) -> None:
    """Add the routes to `app`. parse(request, model): the body as a pydantic model; fail(request, status, message,
    param, code): an error answer (audited)."""
    from fastapi import Request
    from pydantic import BaseModel, ConfigDict

    class TemplateBody(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str
        text: str
        negative_prompt: str = ""
        params: dict | None = None
        description: str = ""

    @app.exception_handler(TemplateError)
    async def _template(request: Request, err: TemplateError):
        return fail(request, STATUS.get(err.reason, 400), str(err), param="template", code=f"template_{err.reason}")

    @app.get("/v1/prompts")
    async def list_prompts(request: Request, retired: bool = False):
        await svc.authorize(request, "viewer")
        return {"object": "list", "data": [t.as_dict() for t in templates.list(include_retired=retired)]}

    @app.post("/v1/prompts", status_code=201)
    async def add_prompt(request: Request):
        principal = await svc.authorize(request, "admin")
        body = await parse(request, TemplateBody)
        t = templates.add(
            body.name, body.text, body.negative_prompt, body.params, body.description, created_by=principal.name
        )
        request.state.audit["reason"] = f"added prompt template {t.ref}"
        return t.as_dict()

    @app.get("/v1/prompts/{ref}")
    async def show_prompt(request: Request, ref: str):
        await svc.authorize(request, "viewer")
        if "@" in ref:
            return templates.show(ref).as_dict()
        versions = templates.versions(ref)
        return {
            "name": ref,
            "retired": versions[-1].retired,
            "newest": versions[-1].version,
            "versions": [t.as_dict() for t in versions],
        }

    @app.post("/v1/prompts/{name}/retire")
    async def retire_prompt(request: Request, name: str):
        principal = await svc.authorize(request, "admin")
        t = templates.retire(name, by=principal.name)
        request.state.audit["reason"] = f"retired prompt template {name}"
        return t.as_dict()
