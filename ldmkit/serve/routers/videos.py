"""OpenAI's video API: POST /v1/videos queues a clip of a video model and answers at once with the video object;
GET /v1/videos/{id} polls it, GET /v1/videos/{id}/content downloads its MP4, GET /v1/videos lists the caller's
clips, DELETE /v1/videos/{id} cancels one and forgets it. The jobs are the service's native jobs (route "video")."""

import base64

from ..deps import parse_body, typed, validated
from ..models import VIDEOS
from ..schemas import FieldError, api_models, parse_size
from ..service import RequestFailed, request_params
from ..videos import ClipRun, clip_request, first_frame, mp4_output, video_view
from .common import checked_request, templated


async def video_body(request):
    """The body as api_models().VideoRequest: JSON, or the multipart form OpenAI's client sends (each field a
    string, which the model reads as the number it names; a file input_reference taken as base64)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return await parse_body(request, api_models().VideoRequest)
    form, data = await request.form(), {}
    for key, value in form.multi_items():
        if key in data:
            raise FieldError(key, f"{key} is given twice; give it once")
        data[key] = base64.b64encode(await value.read()).decode() if hasattr(value, "read") else value
    return validated(api_models().VideoRequest, data)


def router():
    """The APIRouter of the videos."""
    from fastapi import APIRouter, Request, Response
    from pydantic import BaseModel
    from starlette.exceptions import HTTPException

    t = typed()

    class VideoError(BaseModel):
        code: str
        message: str

    class Video(BaseModel):
        id: str
        object: str
        status: str  # queued, in_progress, completed or failed
        progress: int  # percent
        created_at: int  # Unix seconds
        completed_at: int | None
        expires_at: int | None
        model: str
        prompt: str | None
        size: str  # "WIDTHxHEIGHT"
        seconds: str
        remixed_from_video_id: str | None
        error: VideoError | None
        frames: int
        fps: float
        seed: int
        sha256: str | None = None  # of the MP4, once made (the job's audit row holds it too)

    class Videos(BaseModel):
        object: str
        data: list[Video]
        first_id: str | None
        last_id: str | None
        has_more: bool

    class Deleted(BaseModel):
        id: str
        object: str
        deleted: bool

    def own(svc, video_id: str, principal):
        found = svc.job(video_id, principal, route="video")
        if found is None:
            kept = svc.run.serve.jobs_kept
            raise HTTPException(404, f"no video {video_id[:40]!r} of this key; the last {kept} jobs are kept")
        return found

    r = APIRouter(tags=["videos"], default_response_class=t.JSON)

    @r.post("/v1/videos", response_model=Video)
    async def create_video(request: Request, principal: t.UserKey, svc: t.ServiceDep):
        body = await video_body(request)
        served = svc.model(body.model)
        width, height = parse_size(body.size)
        fields = body.model_dump(include={"prompt", "negative_prompt", "labels", "steps", "cfg", "seed", "sampler"})
        fields |= {"n": 1, "width": width, "height": height, "loras": [item.model_dump() for item in body.loras]}
        fields, used = templated(svc, served, body, fields, {"width": "size", "height": "size"})
        req = checked_request(svc, served, fields, {"width": "size", "height": "size"}, VIDEOS)
        clip, _ = clip_request(body, served.ldm, svc.limits.max_frames)
        image, about = first_frame(body, served.ldm.ae_config.in_channels, svc.limits)
        svc.check(served, req, principal)
        if svc.sign is not None:
            raise RequestFailed(
                "this server signs its outputs with content credentials, which only PNG files carry here; "
                "ask its operator for a server without serve.c2pa_cert to make videos",
                501,
            )
        params = request_params(req, **used, frames=clip.frames, fps=clip.fps, **about)
        request.state.audit.update(model=served.name, weights_sha256=served.sha256, params=params)
        run = ClipRun(req, clip, image, svc.run.serve.timeout_s)
        job = svc.submit(principal, served, req, params, "video", run, clip.frames, mp4_output(svc, clip))
        run.job = job
        request.state.audit["reason"] = f"queued as video {job.id}"
        return video_view(svc, *svc.jobs[job.id])

    @r.get("/v1/videos", response_model=Videos)
    async def list_videos(principal: t.ViewerKey, svc: t.ServiceDep, limit: int = 20):
        limit = max(1, min(limit, 100))
        kept = svc.jobs_of(principal, limit + 1, "video")  # newest first
        data = [video_view(svc, j, rec) for j, rec in kept[:limit]]
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        return {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": len(kept) > limit}

    @r.get("/v1/videos/{video_id}", response_model=Video)
    async def get_video(video_id: str, principal: t.ViewerKey, svc: t.ServiceDep):
        return video_view(svc, *own(svc, video_id, principal))

    @r.get("/v1/videos/{video_id}/content", response_class=Response, responses={200: {"content": {"video/mp4": {}}}})
    async def get_video_content(video_id: str, principal: t.ViewerKey, svc: t.ServiceDep, variant: str = "video"):
        if variant != "video":
            raise FieldError("variant", f"variant {variant[:20]!r}: only the MP4 (variant video) is made here")
        job, record = own(svc, video_id, principal)
        view = video_view(svc, job, record)
        if view["status"] != "completed":
            why = f": {view['error']['message']}" if view["error"] else f"; poll GET /v1/videos/{job.id}"
            raise HTTPException(409, f"video {job.id} is {view['status']}, so it has no content{why}")
        headers = {"Content-Disposition": f'attachment; filename="{job.id}.mp4"'}
        return Response(record["output"].mp4, media_type="video/mp4", headers=headers)

    @r.delete("/v1/videos/{video_id}", response_model=Deleted)
    async def delete_video(video_id: str, principal: t.UserKey, svc: t.ServiceDep):
        job, _ = own(svc, video_id, principal)
        svc.scheduler.cancel(job, "deleted by its owner")
        svc.jobs.pop(job.id, None)
        return {"id": job.id, "object": "video.deleted", "deleted": True}

    return r
