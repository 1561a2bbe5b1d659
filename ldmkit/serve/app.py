"""The HTTP application: the routers (routers/: OpenAI's images and videos APIs, AUTOMATIC1111's API, native jobs,
keys, audit and metrics for admins, health and the web page), the middleware around them, and the error map. Routes
parse, authorize (a typed dependency, deps.py) and answer; service.py runs the work, pipelines make images."""

import logging

from ..config import ServeRun
from ..errors import LdmkitError
from ..governance.policy import PolicyRefusal
from .audit import Audit
from .auth import AuthError, Keys
from .deps import parse_body, typed
from .health import scrub
from .metrics import Metrics
from .middleware import BodyTooLarge, ServeMiddleware, error_body
from .prompt_routes import add_prompt_routes
from .prompts import Templates
from .routers import a1111, admin, health, native, openai, videos
from .scheduler import QueueFull, ShuttingDown
from .schemas import FieldError
from .service import RequestFailed, Service


def create_app(run: ServeRun, models: dict, store, no_auth: bool = False):
    """The FastAPI application serving `models` (name -> ServedModel) with keys and audit in `store`, wrapped in
    its middleware; and its Service."""
    from fastapi import FastAPI

    metrics = Metrics()
    keys, audit, templates = Keys(store), Audit(store), Templates(store)
    svc = Service(run, models, keys, audit, metrics, no_auth, templates=templates)
    JSON = typed().JSON

    app = FastAPI(title="ldmkit", docs_url=None, redoc_url=None, openapi_url=None, default_response_class=JSON)
    app.state.service = svc

    def fail(request, status: int, message: str, param=None, code=None, headers=None, reason=None):
        """An error answer in the APIs' shape; the audit row keeps the whole message, the client gets no server
        path."""
        svc.refund(request)  # a request that fails after its work gives its images back
        request.state.audit.setdefault("reason", reason or message[:300])
        message = scrub(message, models)
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSON(error_body(message, param, code, kind), status_code=status, headers=headers)

    add_error_handlers(app, fail, run)
    for api in (health, openai, a1111, native, videos, admin):
        app.include_router(api.router())
    add_prompt_routes(app, svc, templates, parse_body, fail)
    return ServeMiddleware(app, audit, metrics, run.limits.max_upload_bytes), svc


def add_error_handlers(app, fail, run: ServeRun) -> None:
    """The error map: each exception a route may raise, as its HTTP status, error code and audit decision."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

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
