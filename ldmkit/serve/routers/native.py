"""ldmkit's native jobs: POST /v1/jobs queues one and answers at once (202); GET /v1/jobs and /v1/jobs/{id} show
the caller's jobs (images once done); DELETE /v1/jobs/{id} cancels one. The registry lives in the service. A job's
`controls` are ControlNet units read as A1111's are (serve/controls.py), with --control's field names."""

from ..controls import native_units, recorded
from ..deps import parse_body, typed
from ..models import JOBS
from ..schemas import api_models
from ..service import request_params
from .common import checked_request, notes, templated


def router():
    """The APIRouter of the native jobs."""
    from fastapi import APIRouter, Request
    from pydantic import BaseModel
    from starlette.exceptions import HTTPException

    t = typed()

    class Queued(BaseModel):
        id: str
        status: str
        notes: list[str] | None = None  # only where the request is allowed but advised against: why

    class Job(BaseModel):
        id: str
        status: str
        model: str
        params: dict
        created: float
        seeds: list[int] | None = None  # these once the job is done
        sha256: list[str] | None = None
        images: list[str | None] | None = None  # None where the safety filter withheld the image
        withheld: list[str | None] | None = None  # only where some image was withheld or blurred: why
        error: str | None = None  # only where it failed

    class Jobs(BaseModel):
        data: list[Job]

    def own(svc, job_id: str, principal):
        found = svc.job(job_id, principal)
        if found is None:
            kept = svc.run.serve.jobs_kept
            raise HTTPException(404, f"no job {job_id[:40]!r} of this key; jobs are kept for the last {kept}")
        return found

    r = APIRouter(tags=["jobs"], default_response_class=t.JSON)

    @r.post("/v1/jobs", status_code=202, response_model=Queued, response_model_exclude_unset=True)
    async def create_job(request: Request, principal: t.UserKey, svc: t.ServiceDep):
        body = await parse_body(request, api_models().JobRequest)
        served = svc.model(body.model)
        fields = body.model_dump(exclude={"model", "template", "variables", "controls"})
        fields, used = templated(svc, served, body, fields, {})
        req = checked_request(svc, served, fields, {}, JOBS)
        svc.check(served, req, principal)
        units = native_units(svc, served, body.controls, req)  # ControlNet units: batched with any generation
        req = svc.on_backend(req, served, units=units)  # recorded as it runs
        params = request_params(req, **used, **recorded(units))
        request.state.audit.update(model=served.name, weights_sha256=served.sha256, params=params)
        job = svc.submit(principal, served, req, params, units=units)
        request.state.audit["reason"] = f"queued as job {job.id}"
        said = notes(req)
        return {"id": job.id, "status": job.state} | ({"notes": said} if said else {})

    @r.get("/v1/jobs", response_model=Jobs, response_model_exclude_unset=True)
    async def list_jobs(principal: t.ViewerKey, svc: t.ServiceDep, limit: int = 20):
        return {"data": [svc.job_view(j, rec) for j, rec in svc.jobs_of(principal, max(1, min(limit, 100)))]}

    @r.get("/v1/jobs/{job_id}", response_model=Job, response_model_exclude_unset=True)
    async def get_job(job_id: str, principal: t.ViewerKey, svc: t.ServiceDep):
        return svc.job_view(*own(svc, job_id, principal))

    @r.delete("/v1/jobs/{job_id}", response_model=Job, response_model_exclude_unset=True)
    async def cancel_job(job_id: str, principal: t.UserKey, svc: t.ServiceDep):
        job, record = own(svc, job_id, principal)
        svc.scheduler.cancel(job, "cancelled by its owner")
        return svc.job_view(job, record, images=False)

    return r
