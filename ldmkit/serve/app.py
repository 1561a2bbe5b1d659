"""The HTTP routes: OpenAI's images API, AUTOMATIC1111's API, native jobs, keys and audit for admins, health,
metrics and the web page. Routes parse, authorize and answer; service.py runs the work, pipelines make images."""

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from ..config import ServeRun
from ..errors import InputError, LdmkitError
from ..governance.policy import PolicyRefusal
from .audit import Audit
from .auth import AuthError, Keys
from .edits import a1111_edit
from .health import database_problem, find_non_finite, scrub
from .metrics import Metrics
from .middleware import BodyTooLarge, ServeMiddleware, error_body
from .models import GENERATIONS, IMG2IMG, JOBS, TXT2IMG
from .prompt_routes import add_prompt_routes
from .prompts import TemplateError, Templates
from .scheduler import DONE, Job, QueueFull, ShuttingDown
from .schemas import (
    A1111_SAMPLERS,
    FieldError,
    api_models,
    check_for_model,
    option_field,
    parse_size,
    sample_request,
)
from .service import RequestFailed, Service, request_params

WEB = Path(__file__).resolve().parent / "web"
STATIC = {"app.js": "text/javascript", "app.css": "text/css"}  # the page's own files, served from /static/


def create_app(run: ServeRun, models: dict, store, no_auth: bool = False):
    """The FastAPI application serving `models` (name -> ServedModel) with keys and audit in `store`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException

    api = api_models()
    OpenAIImageRequest, A1111Request, JobRequest = api.OpenAIImageRequest, api.A1111Request, api.JobRequest
    metrics = Metrics()
    keys, audit, templates = Keys(store), Audit(store), Templates(store)
    svc = Service(run, models, keys, audit, metrics, no_auth)

    class JSON(JSONResponse):
        """JSON in ASCII: a string the client sent (an unpaired surrogate included) is echoed escaped, never lost."""

        def render(self, content) -> bytes:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()

    app = FastAPI(title="ldmkit", docs_url=None, redoc_url=None, openapi_url=None, default_response_class=JSON)
    app.state.service = svc

    def fail(request: Request, status: int, message: str, param=None, code=None, headers=None, reason=None):
        svc.refund(request)  # a request that fails after its work gives its images back
        request.state.audit.setdefault("reason", reason or message[:300])
        message = scrub(message, models)  # the audit row keeps the whole message; the client gets no server path
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSON(error_body(message, param, code, kind), status_code=status, headers=headers)

    async def parse(request: Request, model):
        """The JSON body as `model`, read after the key was checked (FieldError naming the first bad field)."""
        from pydantic import ValidationError

        def refuse(constant):
            raise FieldError("body", f"the body holds {constant}, which JSON does not allow; send finite numbers")

        raw = await request.body()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FieldError(
                "body", f"the body is not valid UTF-8 (byte {e.start}); send JSON encoded as UTF-8"
            ) from None
        try:
            data = json.loads(text, parse_constant=refuse)
        except (ValueError, RecursionError):
            raise FieldError("body", "the body is not valid JSON; send a JSON object") from None
        if not isinstance(data, dict):
            raise FieldError("body", f"the body is a JSON {type(data).__name__}; send a JSON object") from None
        found = find_non_finite(data)  # 1e309 reads as infinity; refused in any field, ignored extras included
        if found is not None:
            field, why = found
            raise FieldError(field, f"{field}: {why}")
        try:
            return model.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ())) or "body"
            raise FieldError(param, f"{param}: {first.get('msg', 'invalid value')}") from None

    # --- errors ---------------------------------------------------------------------------------------------------
    @app.exception_handler(AuthError)
    async def _auth(request: Request, err: AuthError):
        headers = {"Retry-After": str(err.retry_after)} if err.retry_after else None
        if err.status == 401:
            headers = {**(headers or {}), "WWW-Authenticate": 'Bearer realm="ldmkit"'}
        request.state.audit["decision"] = "refused-quota" if err.status == 429 else "refused-auth"
        return fail(
            request, err.status, str(err), code=err.reason.replace(" ", "_"), headers=headers, reason=err.reason
        )

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, err: BodyTooLarge):
        limit = run.limits.max_upload_bytes
        return fail(
            request,
            413,
            f"the request body is larger than the {limit} bytes this server accepts",
            code="body_too_large",
        )

    @app.exception_handler(PolicyRefusal)
    async def _policy(request: Request, err: PolicyRefusal):
        request.state.audit.update(decision="refused-policy", params={"prompt": err.prompt})
        return fail(request, 400, str(err), param="prompt", code="policy_violation", reason=f"policy rule {err.rule}")

    @app.exception_handler(FieldError)
    async def _field(request: Request, err: FieldError):
        return fail(request, 400, str(err), param=err.field, code="invalid_value")

    @app.exception_handler(QueueFull)
    async def _full(request: Request, err: QueueFull):
        return fail(request, 429, str(err), code="queue_full", headers={"Retry-After": str(err.retry_after)})

    @app.exception_handler(ShuttingDown)
    async def _down(request: Request, err: ShuttingDown):
        return fail(request, 503, str(err), code="shutting_down", headers={"Retry-After": "5"})

    @app.exception_handler(RequestFailed)
    async def _failed(request: Request, err: RequestFailed):
        if err.status == 499:
            request.state.audit["decision"] = "cancelled"
        return fail(request, err.status, str(err), code="request_failed")

    @app.exception_handler(LdmkitError)
    async def _input(request: Request, err: LdmkitError):
        return fail(request, 400, str(err), code="invalid_value")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        first = (err.errors() or [{}])[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        what = first.get("msg", "invalid value")
        return fail(request, 400, f"{param or 'the body'}: {what}", param=param, code="invalid_value")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException):
        return fail(request, err.status_code, str(err.detail), code="http_error")

    @app.exception_handler(Exception)
    async def _defect(request: Request, err: Exception):
        logging.getLogger("ldmkit.serve").exception("request %s failed", request.state.request_id)
        return fail(request, 500, f"internal error; request id {request.state.request_id}", reason=type(err).__name__)

    # --- health, metrics, the page ----------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if svc.scheduler.draining:
            return JSON({"status": "draining"}, status_code=503)
        import anyio

        problem = await anyio.to_thread.run_sync(database_problem, store)
        if problem is not None:  # no answer could be audited: fail closed
            logging.getLogger("ldmkit.serve").error("not ready: %s", problem)
            return JSON({"status": "database not writable", "reason": problem}, status_code=503)
        return {"status": "ready", "models": list(models), "batch_invariant": svc.invariance}

    @app.get("/metrics")
    async def metrics_route(request: Request):
        await svc.authorize(request, "admin")
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.api_route("/", methods=["GET", "HEAD"])
    async def page():
        return FileResponse(WEB / "index.html", media_type="text/html")

    @app.api_route("/static/{name}", methods=["GET", "HEAD"])
    async def static(name: str):
        if name not in STATIC:
            raise HTTPException(404, "no such file; the page's files are " + ", ".join(STATIC))
        return FileResponse(WEB / name, media_type=STATIC[name])

    # --- OpenAI images API ------------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def list_models(request: Request):
        await svc.authorize(request, "viewer")
        created = int(time.time())
        data = [
            {"id": n, "object": "model", "created": created, "owned_by": "ldmkit", **m.describe()}
            for n, m in models.items()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/images/generations")
    async def openai_generate(request: Request):
        principal = await svc.authorize(request, "user")
        body = await parse(request, OpenAIImageRequest)
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
        )
        fields, used = templated(body, fields, {"width": "size", "height": "size"})
        req = _eta(_request(served, fields, run.limits, {"width": "size", "height": "size"}, GENERATIONS), fields)
        svc.check(served, req, principal)
        out = await svc.generate(request, principal, served, req, user=body.user, **used)
        data = [
            {"b64_json": b, "revised_prompt": None, "seed": s} | ({"withheld": why} if why else {})
            for b, s, why in zip(out.b64(), out.seeds, out.withheld)
        ]
        return {"created": int(time.time()), "data": data}

    # --- AUTOMATIC1111 API ------------------------------------------------------------------------------------------
    @app.post("/sdapi/v1/txt2img")
    async def a1111_txt2img(request: Request):
        principal = await svc.authorize(request, "user")
        body = await parse(request, A1111Request)
        served, req, fields, used = _a1111_request(body, TXT2IMG)
        svc.check(served, req, principal)
        out = await svc.generate(request, principal, served, req, **used)
        return _a1111_answer(body, served, req, out, fields)

    @app.post("/sdapi/v1/img2img")
    async def a1111_img2img(request: Request):
        principal = await svc.authorize(request, "user")
        body = await parse(request, A1111Request)
        served, req, fields, used = _a1111_request(body, IMG2IMG)
        svc.check_policy(req, principal)
        if not body.init_images:
            raise FieldError("init_images", "img2img needs init_images: one base64-encoded image")
        at_image_size = replace(req, width=0, height=0)  # an edit works at the init image's own size
        edit, extra = a1111_edit(served.ldm, body, at_image_size, run.limits)
        out = await svc.generate(request, principal, served, at_image_size, run=edit, **extra, **used)
        return _a1111_answer(body, served, req, out, fields)

    @app.get("/sdapi/v1/sd-models")
    async def a1111_models(request: Request):
        await svc.authorize(request, "viewer")
        return [
            {"title": n, "model_name": n, "hash": m.sha256[:10], "sha256": m.sha256, "filename": str(m.path.name)}
            for n, m in models.items()
        ]

    @app.get("/sdapi/v1/samplers")
    async def a1111_samplers(request: Request):
        await svc.authorize(request, "viewer")
        return [{"name": a, "aliases": [ours], "options": {}} for a, ours in A1111_SAMPLERS.items()]

    def _a1111_request(body, route: str):
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
        names = {"n": "batch_size", "cfg": "cfg_scale", "sampler": "sampler_name"}
        fields, used = templated(body, fields, names)
        return served, _eta(_request(served, fields, run.limits, names, route), fields), fields, used

    def _a1111_answer(body, served, req, out, fields: dict):
        info = {
            "prompt": fields["prompt"],  # a template's, filled in, when the request named one
            "all_prompts": [fields["prompt"]] * req.n,
            "negative_prompt": fields["negative_prompt"],
            "seed": req.seed,
            "all_seeds": out.seeds,
            "steps": req.steps,
            "cfg_scale": req.cfg,
            "sampler_name": body.sampler_name,
            "width": req.width or served.ldm.run.data.resolution,
            "height": req.height or served.ldm.run.data.resolution,
            "sd_model_name": served.name,
            "sd_model_hash": served.sha256[:10],
            "ignored": sorted(body.model_extra or {}),
            "withheld": [
                {"index": i, "seed": s, "reason": why} for i, (s, why) in enumerate(zip(out.seeds, out.withheld)) if why
            ],
        }
        params = body.model_dump(exclude={"init_images", "mask"})
        images = [b for b in out.b64() if b is not None]  # A1111 clients expect strings: withheld ones are left out
        return {"images": images, "parameters": params, "info": json.dumps(info)}

    # --- native jobs ------------------------------------------------------------------------------------------------
    @app.post("/v1/jobs", status_code=202)
    async def create_job(request: Request):
        principal = await svc.authorize(request, "user")
        body = await parse(request, JobRequest)
        served = svc.model(body.model)
        fields, used = templated(body, body.model_dump(exclude={"model", "template", "variables"}), {})
        req = _eta(_request(served, fields, run.limits, {}, JOBS), fields)
        svc.check(served, req, principal)
        params = request_params(req, **used)
        request.state.audit.update(model=served.name, weights_sha256=served.sha256, params=params)
        record = {"model": served.name, "params": params, "created": time.time(), "output": None, "ended": False}
        job = svc.queue(principal, served, req, on_done=lambda j: _job_done(j, served, record))
        svc.jobs[job.id] = (job, record)
        while len(svc.jobs) > run.serve.jobs_kept:
            svc.jobs.popitem(last=False)
        request.state.audit["reason"] = f"queued as job {job.id}"
        return {"id": job.id, "status": job.state}

    def _job_done(job: Job, served, record: dict) -> None:
        """A native job's own audit row, written when it ends (the POST's row says it was queued)."""
        row = dict(
            request_id=job.id,
            key_id=job.owner or None,
            route="job",
            model=served.name,
            weights_sha256=served.sha256,
            params=record["params"],
            queue_ms=round(job.queue_ms, 1),
            run_ms=round(job.run_ms, 1),
        )
        try:
            out = svc.finished(job, served, record["params"], row, job.id)
            record["output"] = out
            row.update(decision="served", status=200, outputs=out.sha256)
        except RequestFailed as err:
            record["error"] = str(err)
            row.update(
                decision="cancelled" if err.status == 499 else "failed", status=err.status, reason=str(err)[:300]
            )
        audit.record(**row)
        record["ended"] = True

    def _job_view(job: Job, record: dict, images: bool = True) -> dict:
        out = record.get("output")
        view = {
            "id": job.id,
            "status": job.state if record["ended"] or job.state != DONE else "running",  # done once the PNGs exist
            "model": record["model"],
            "params": record["params"],
            "created": record["created"],
        }
        if out is not None:
            view["seeds"] = out.seeds
            view["sha256"] = out.sha256
            if images:
                view["images"] = out.b64()  # None where the safety filter withheld the image
            if any(out.withheld):
                view["withheld"] = out.withheld
        if record.get("error"):
            view["error"] = scrub(record["error"], models)  # shown to the client: no server path or CLI advice
        return view

    def _own_job(job_id: str, principal) -> tuple[Job, dict]:
        found = svc.jobs.get(job_id)
        if found is None or (principal.role != "admin" and found[0].owner != principal.key_id):
            raise HTTPException(
                404, f"no job {job_id[:40]!r} of this key; jobs are kept for the last {run.serve.jobs_kept}"
            )
        return found

    @app.get("/v1/jobs")
    async def list_jobs(request: Request, limit: int = 20):
        principal = await svc.authorize(request, "viewer")
        mine = [
            (j, r) for j, r in reversed(svc.jobs.values()) if principal.role == "admin" or j.owner == principal.key_id
        ]
        return {"data": [_job_view(j, r) for j, r in mine[: max(1, min(limit, 100))]]}

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, request: Request):
        principal = await svc.authorize(request, "viewer")
        return _job_view(*_own_job(job_id, principal))

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str, request: Request):
        principal = await svc.authorize(request, "user")
        job, record = _own_job(job_id, principal)
        svc.scheduler.cancel(job, "cancelled by its owner")
        return _job_view(job, record, images=False)

    # --- keys and audit (admin) -------------------------------------------------------------------------------------
    @app.get("/v1/keys")
    async def list_keys(request: Request):
        await svc.authorize(request, "admin")
        return {"data": keys.list()}

    @app.get("/v1/audit")
    async def audit_tail(request: Request, n: int = 50):
        await svc.authorize(request, "admin")
        return {"data": audit.tail(max(1, min(n, 1000)))}

    @app.get("/v1/audit/verify")
    async def audit_verify(request: Request):
        await svc.authorize(request, "admin")
        result = audit.verify()
        head = {"seq": result.last_seq, "hash": result.last_hash}  # keep it outside the database: docs/audit.md
        return {"ok": result.ok, "rows": result.rows, "problems": result.problems, "head": head}

    add_prompt_routes(app, svc, templates, parse, fail)

    def templated(body, fields: dict, names: dict) -> tuple[dict, dict]:
        """The request's fields with its prompt template filled in (when it names one): the template's prompt and
        negative prompt, its parameters where the request did not set its own; and what the audit row records of it
        (template "name@version" and the variables). names: the API's name of a field (OpenAI says size)."""
        if body.template is None:
            if body.variables:
                raise FieldError("variables", "variables fill a template: give template too, or drop variables")
            return fields, {}
        if body.prompt or body.negative_prompt:
            raise FieldError("template", "give either a template (with variables) or a prompt, not both")
        try:
            filled = templates.render(body.template, body.variables or {})
        except TemplateError as err:
            raise FieldError("template", str(err)) from None
        own = {names.get(k, k) for k in body.model_fields_set}
        defaults = {k: v for k, v in filled.params.items() if names.get(k, k) not in own}
        fields = fields | defaults | {"prompt": filled.prompt, "negative_prompt": filled.negative_prompt}
        return fields, {"template": f"{filled.template}@{filled.version}", "variables": body.variables or {}}

    def _eta(req, fields: dict):
        """A template's eta (the APIs take none of their own)."""
        return req if fields.get("eta") is None else replace(req, eta=fields["eta"])

    def _request(served, fields: dict, limits, names: dict, route: str):
        """The request checked against the limits and against the model (its routes, sizes and labels) before any
        work, each refusal naming the field as the client sent it."""
        ldm = served.ldm
        if route not in served.routes():
            raise FieldError(names.get("model", "model"), served.refusal(route, models))
        try:
            req = sample_request(
                fields, limits, names=names, class_names=ldm.class_names, text=ldm.text_encoder is not None
            )
        except FieldError:
            raise
        except InputError as err:
            raise FieldError(*option_field(str(err), names)) from None
        check_for_model(req, served.describe()["multiple"], ldm.num_classes, names)
        return req

    return ServeMiddleware(app, audit, metrics, run.limits.max_upload_bytes), svc
