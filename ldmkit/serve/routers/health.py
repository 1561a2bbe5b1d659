"""The public routes, open without a key: the probes (/healthz: the process answers; /readyz: it can take work and
audit it) and the web page with its own files."""

import logging
from pathlib import Path

from ..deps import typed
from ..health import database_problem

WEB = Path(__file__).resolve().parent.parent / "web"
STATIC = {"app.js": "text/javascript", "app.css": "text/css"}  # the page's own files, served from /static/


def router():
    """The APIRouter of the probes and the page."""
    import anyio
    from fastapi import APIRouter
    from fastapi.responses import FileResponse
    from pydantic import BaseModel
    from starlette.exceptions import HTTPException

    t = typed()

    class Health(BaseModel):
        status: str

    class Ready(BaseModel):
        status: str
        models: list[str]
        batch_invariant: dict  # holds, devices, and why not where it does not

    r = APIRouter(tags=["health"], default_response_class=t.JSON)

    @r.get("/healthz", response_model=Health)
    async def healthz():
        return {"status": "ok"}

    @r.get("/readyz", response_model=Ready)
    async def readyz(svc: t.ServiceDep):
        if svc.scheduler.draining:
            return t.JSON({"status": "draining"}, status_code=503)
        problem = await anyio.to_thread.run_sync(database_problem, svc.keys.store)
        if problem is not None:  # no answer could be audited: fail closed
            logging.getLogger("ldmkit.serve").error("not ready: %s", problem)
            return t.JSON({"status": "database not writable", "reason": problem}, status_code=503)
        return {"status": "ready", "models": list(svc.models), "batch_invariant": svc.invariance}

    @r.api_route("/", methods=["GET", "HEAD"], response_class=FileResponse)
    async def page():
        return FileResponse(WEB / "index.html", media_type="text/html")

    @r.api_route("/static/{name}", methods=["GET", "HEAD"], response_class=FileResponse)
    async def static(name: str):
        if name not in STATIC:
            raise HTTPException(404, "no such file; the page's files are " + ", ".join(STATIC))
        return FileResponse(WEB / name, media_type=STATIC[name])

    return r
