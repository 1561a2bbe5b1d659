"""OpenAI's video API over ldmkit's video models (tasks/video.py). A clip request is a native job of the service's
registry (route "video"): its run makes the clip with pipelines/video.py, its output is one MP4 whose every frame
passed the model's output screen (content filter, similarity screen, watermark) as the image routes' images do, with
the generation record in the MP4's comment tag and the file's SHA-256 in the job's audit row. A clip of F frames
counts as F images: of the key's daily quota, of the queue and of the admission estimate."""

from __future__ import annotations

import base64
import hashlib
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.clips import write_clip
from ..data.images import to_pil
from ..errors import InputError
from ..governance import watermark
from ..pipelines.plan import resolution
from ..pipelines.request import SampleRequest
from ..pipelines.video import ClipRequest, check_video_model, generate_clips
from .auth import utc_now
from .health import scrub
from .scheduler import QUEUED, Cancelled, Job
from .schemas import FieldError, decode_image, option_field
from .service import RequestFailed

OBJECT = "video"


@dataclass
class VideoOutput:
    """A finished clip: the MP4 made (its SHA-256 is the audit row's output) and what the client may download."""

    mp4: bytes
    seeds: list[int]
    withheld: str | None = None  # why the screen withheld the clip (a frame withheld or blurred); None: shown
    sha256: list[str] | None = None

    def __post_init__(self):
        self.sha256 = [hashlib.sha256(self.mp4).hexdigest()]


class ClipRun:
    """A video job as the scheduler runs it: run(ldm) -> frames (1, F, C, H, W) in [-1, 1]. It counts its sampling
    steps (the job's progress) and stops at the next step once its job is cancelled or past its time limit."""

    def __init__(self, req: SampleRequest, clip: ClipRequest, first_frame: torch.Tensor | None, timeout_s: float):
        """req: one clip (n = 1); first_frame: the image (1, C, H, W) in [-1, 1] it starts from, or None."""
        self.req, self.clip, self.first_frame, self.timeout_s = req, clip, first_frame, timeout_s
        self.job: Job | None = None  # set once queued: its error says it was cancelled
        self.steps = 0  # sampling steps done
        self.deadline = time.monotonic() + timeout_s

    @property
    def progress(self) -> int:
        """Percent of the sampling steps done, 99 at most (the clip still has to be decoded, screened, encoded)."""
        return min(99, 100 * self.steps // max(self.req.steps, 1))

    def __call__(self, ldm) -> torch.Tensor:
        return generate_clips(ldm, self.req, self.clip, callback=self._step, first_frame=self.first_frame)[0]

    def _step(self, *_) -> None:
        self.steps += 1
        if self.job is not None and self.job.error is not None:
            raise Cancelled(str(self.job.error))
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"the request took over {self.timeout_s:g} s; ask for fewer frames, steps or pixels")


def clip_request(body, ldm, max_frames: int) -> tuple[ClipRequest, str]:
    """(the clip's frames and fps, the field that set the frames) from the body's frames, or its seconds x fps
    (OpenAI's `seconds`), or `ldmkit video`'s default; checked against the server's max_frames and the model."""
    fps = body.fps
    if body.frames is not None:
        if body.seconds is not None:
            raise FieldError("seconds", "give frames or seconds (frames = seconds x fps), not both")
        frames, field, said = body.frames, "frames", f"frames {body.frames}"
    elif body.seconds is not None:
        try:
            seconds = float(body.seconds)
        except ValueError:
            raise FieldError("seconds", f'seconds {str(body.seconds)[:20]!r} is not a number, e.g. "2"') from None
        if not math.isfinite(seconds) or seconds <= 0:
            raise FieldError("seconds", f'seconds {body.seconds}: a clip lasts more than 0 seconds, e.g. "2"')
        frames, field = max(1, round(seconds * fps)), "seconds"
        said = f"seconds {body.seconds} at {fps:g} fps ({frames} frames)"
    else:
        frames, field, said = ClipRequest().frames, "frames", f"frames {ClipRequest().frames} (the default)"
    if frames > max_frames:
        raise FieldError(field, f"{said} is more than this server's limit of {max_frames} frames; ask for fewer")
    clip = ClipRequest(frames=frames, fps=fps)
    try:
        check_video_model(ldm, clip)
    except InputError as err:
        name, message = option_field(str(err), {})
        if name == "frames" and field == "seconds":
            message = f"{said}: {message.partition(': ')[2] or message}"
        raise FieldError(field if name == "frames" else name, message) from None
    return clip, field


def first_frame(body, channels: int, limits) -> tuple[torch.Tensor | None, dict]:
    """(the image (1, C, H, W) in [-1, 1] the clip starts from, or None; what the record says of it: its size and
    the SHA-256 of its bytes) from input_reference: base64 (a data: URL too) or OpenAI's {"image_url": ...}."""
    ref = body.input_reference
    if ref is None:
        return None, {}
    if isinstance(ref, dict):
        if set(ref) != {"image_url"} or not isinstance(ref["image_url"], str):
            raise FieldError("input_reference", 'give input_reference as base64 or {"image_url": "data:..."} only')
        ref = ref["image_url"]
    image = decode_image("input_reference", ref, channels, limits.max_upload_bytes)  # (1, C, H, W)
    h, w = image.shape[-2:]
    if max(h, w) > limits.max_side:
        raise FieldError("input_reference", f"the image is {w}x{h}; the limit is {limits.max_side} pixels a side")
    raw = base64.b64decode(ref.split(",", 1)[-1] if ref.startswith("data:") else ref)
    return image, {"first_frame": {"size": f"{w}x{h}", "sha256": hashlib.sha256(raw).hexdigest()}}


def mp4_output(svc, clip: ClipRequest):
    """The output of a video job as Service.finished calls it: the clip's frames through the model's screen (each
    watermarked with the job's id when the screen marks), written as an MP4 with its generation record. A clip with
    a frame the screen withholds or blurs is withheld whole; its MP4 is still made, and hashed in the audit row."""

    def output(job: Job, served, params: dict, audit: dict, request_id: str) -> VideoOutput:
        screen = svc.screens[served.name]
        frames = [to_pil(f) for f in job.images[0]]  # (F, C, H, W) -> F images
        screened = screen(frames, watermark.tag_of(request_id))
        made = {"request_id": request_id, "time": utc_now().isoformat(timespec="seconds")}
        record = {"model": served.name, "weights_sha256": served.sha256, **params, "seed": job.req.seed, **made}
        record |= {"frames": clip.frames, "fps": clip.fps, "watermark": screened[0].watermark}
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = write_clip([s.marked for s in screened], Path(tmp) / "clip.mp4", clip.fps, record)
                out = VideoOutput(Path(path).read_bytes(), [job.req.seed])
        except Exception as err:  # no PyAV, a full disk: the job fails, the worker goes on
            raise RequestFailed(f"the clip could not be written as an MP4: {err}", 500) from err
        flagged = [f"frame {i}: {'; '.join(s.reasons)}" for i, s in enumerate(screened) if s.action is not None]
        for s in screened:
            if s.action is not None:
                svc._count(served.name, s)
        if any(s.action in ("withhold", "blur") for s in screened):
            out.withheld = "the output screen withheld this clip (" + "; ".join(flagged)[:300] + ")"
        audit["outputs"] = out.sha256
        if flagged:
            audit["reason"] = f"clip {out.sha256[0][:16]}: " + "; ".join(flagged)[:1000]
        svc.metrics.images.labels(served.name).inc(len(frames))
        return out

    return output


def video_view(svc, job: Job, record: dict) -> dict:
    """A video job in OpenAI's shape (id, object, status, progress, created_at, completed_at, model, prompt, size,
    seconds, error) with ldmkit's frames, fps, seed and the MP4's SHA-256 once made."""
    out, run = record["output"], job.run
    ended = record["ended"]
    if not ended:
        status = "queued" if job.state == QUEUED else "in_progress"
    else:
        status = "completed" if out is not None and out.withheld is None else "failed"
    h, w = resolution(svc.models[record["model"]].ldm, job.req)
    view = {
        "id": job.id,
        "object": OBJECT,
        "status": status,
        "progress": 100 if status == "completed" else run.progress,
        "created_at": int(record["created"]),
        "completed_at": int(record["created"] + job.finished - job.created) if ended and job.finished else None,
        "expires_at": None,  # kept among the server's last serve.jobs_kept jobs, not for a set time
        "model": record["model"],
        "prompt": job.req.prompts[0] if job.req.prompts else None,
        "size": f"{w}x{h}",
        "seconds": f"{run.clip.frames / run.clip.fps:g}",
        "remixed_from_video_id": None,
        "error": None,
        "frames": run.clip.frames,
        "fps": run.clip.fps,
        "seed": job.req.seed,
    }
    if out is not None:
        view["sha256"] = out.sha256[0]
        if out.withheld:
            view["error"] = {"code": "output_withheld", "message": out.withheld}
    if record.get("error"):
        view["error"] = {"code": "generation_failed", "message": scrub(record["error"], svc.models)}
    return view
