"""What the routes share: the models, the scheduler, keys, audit and prompt templates, the life of one generation
request (authorize, reserve quota, queue, wait while watching the client, encode the images, fill the audit row),
and the registry of native jobs with their own audit rows."""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import itertools
import json
import logging
import time
from dataclasses import dataclass, field, replace

import torch

from ..config import ServeRun
from ..data.images import png_bytes, to_pil
from ..errors import ConfigError, InputError, LdmkitError
from ..evaluation.fid import FeatureStats
from ..governance import watermark
from ..governance.credentials import CredentialsError, credentials_from, file_signer
from ..governance.monitor import OutputMonitor, reference_path
from ..governance.policy import PolicyRefusal, load_policy
from ..governance.safety import SafetyFilter
from ..governance.screen import build_screen
from ..nn.invariant import self_check
from ..pipelines.plan import plan, resolution
from ..pipelines.request import SampleRequest
from ..runtime import sampling_autocast
from .auth import AuthError, Principal, Reservation, utc_now
from .controls import ServedControlNets, recorded
from .edits import unmarked
from .health import scrub
from .loras import ServedLoRAs
from .scheduler import CANCELLED, DONE, Cancelled, Job, Scheduler, ShuttingDown, TooCostly
from .schemas import FieldError

log = logging.getLogger("ldmkit.serve")
ANONYMOUS = Principal(key_id="", name="anonymous (--no-auth)", role="admin", images_per_day=None, rate_per_min=None)


class RequestFailed(LdmkitError):
    """A request that ran and failed; `.status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass
class Output:
    """A finished request's images as PNG files, with their hashes and seeds, and what the safety filter let out."""

    pngs: list[bytes]  # every generated image (the audit trail hashes these, withheld ones included)
    seeds: list[int]
    shown: list[bytes | None] | None = None  # what the client gets: the image, a blurred stand-in, or None
    withheld: list[str | None] | None = None  # why image i was withheld or blurred; None where it was not
    sha256: list[str] = field(default_factory=list)
    flags: list[str | None] | None = None  # every screen decision on image i (flags too), for the audit trail

    def __post_init__(self):
        self.sha256 = [hashlib.sha256(p).hexdigest() for p in self.pngs]
        self.shown = self.pngs if self.shown is None else self.shown
        self.withheld = [None] * len(self.pngs) if self.withheld is None else self.withheld
        self.flags = self.withheld if self.flags is None else self.flags

    def b64(self) -> list[str | None]:
        """The client's images in base64; None for one the safety filter withheld."""
        return [None if p is None else base64.b64encode(p).decode() for p in self.shown]


def request_params(req: SampleRequest, **extra) -> dict:
    """The parameters recorded for a request (audit rows, PNG metadata): all of SampleRequest's but the batching,
    each LoRA by its name, SHA-256 and scale (not the server's path of its file)."""
    return req.record() | extra


C2PA_SETTINGS = ("serve.c2pa_cert", "serve.c2pa_key")


def invariance_status(models: dict, precision: str = "fp32") -> dict:
    """Whether the same request gives the same image alone or batched with others, measured at start on this CPU
    (nn/invariant.py: self_check) in the server's sampling `precision` (serve.precision). Where it fails, or on a
    GPU (where it is not promised), the server runs each request in a batch of its own and says so here, at start
    and in /readyz."""
    devices = sorted({str(m.ldm.device) for m in models.values()})
    if any(not d.startswith("cpu") for d in devices):
        return {
            "holds": False,
            "devices": devices,
            "reason": "batch invariance is promised on the CPU only; each request runs in a batch of its own",
        }
    with sampling_autocast(precision, torch.device("cpu"), "--precision"):
        check = self_check()
    status = {"holds": check["holds"], "devices": devices, "threads": check["threads"], "caps": check["caps"]}
    if not check["holds"]:
        status["reason"] = (
            f"this CPU's kernels gave other numbers in a batch ({'; '.join(check['failures'][:3])}); "
            "each request runs in a batch of its own"
        )
        log.warning("batch invariance does not hold here: %s", status["reason"])
    return status


class Service:
    def __init__(self, run: ServeRun, models: dict, keys, audit, metrics, no_auth: bool = False, templates=None):
        self.run, self.models, self.keys, self.audit, self.metrics = run, models, keys, audit, metrics
        self.templates = templates  # prompt templates (prompts.Templates) a request may name
        self.limits, self.no_auth = run.limits, no_auth
        self.policy = load_policy(run.serve.policy) if run.serve.policy else None  # a bad file stops the start
        self.loras = ServedLoRAs(run.serve.loras, run.serve.lora_roles)  # so does a missing LoRA folder
        self.controlnets = ServedControlNets(run.serve.controlnets)  # and a missing ControlNet folder
        # so does a bad certificate, or only one of the two settings
        self.sign = file_signer(credentials_from(run.serve.c2pa_cert, run.serve.c2pa_key, C2PA_SETTINGS))
        safety = SafetyFilter(self.policy.safety) if self.policy and self.policy.safety else None
        # one screen a model (its own training-data index), built now: a missing file stops the start
        self.screens = {n: build_screen(self.policy, m.path, run.serve.watermark, safety) for n, m in models.items()}
        cfg = run.serve
        self.invariance = invariance_status(models, cfg.precision)
        self.scheduler = Scheduler(
            {name: m.ldm for name, m in models.items()},
            cfg.max_batch if self.invariance["holds"] else 1,  # batches of one keep the promise where it fails
            cfg.max_wait_ms,
            cfg.queue_images,
            on_batch=metrics.batch.observe,
            warmup=True,  # admission control has an estimate from the first request on
            precision=cfg.precision,
            backend=cfg.backend,
        )
        # native jobs, oldest first: id -> (job, record: model, params, created, output, error, ended)
        self.jobs: collections.OrderedDict[str, tuple[Job, dict]] = collections.OrderedDict()
        self._held: dict[str, Reservation] = {}  # job id -> the images reserved for it, until settled or given back
        returned = keys.reconcile()  # what requests never answered (the server was killed) still hold
        if returned:
            log.info("gave back the images of %d requests that were never answered", returned)
        self.monitor = self._monitor(cfg.monitor_window)

    def _png(self, img, meta: dict[str, str]) -> bytes:
        """An output as a PNG with its generation record, signed with content credentials when configured."""
        data = png_bytes(img, meta)
        if self.sign is None:
            return data
        try:
            return self.sign(data, meta)
        except CredentialsError as e:  # the certificate expired while serving: nothing unsigned goes out
            raise RequestFailed(str(e), 503) from None

    def close(self, timeout: float = 600) -> None:
        """Finish the queued and running work (up to `timeout` seconds), then stop the background monitor."""
        self.scheduler.close(timeout=timeout)
        if self.monitor is not None:
            self.monitor.close()

    def _monitor(self, window: int) -> OutputMonitor | None:
        """The rolling output statistic of /metrics (None when serve.monitor_window is 0)."""
        if window == 0:
            return None
        if window < 2:
            raise ConfigError(f"serve.monitor_window = {window}: give 0 (no monitor) or at least 2 outputs")
        refs = {}
        for name, m in self.models.items():
            path = reference_path(m.path)
            refs[name] = FeatureStats.load(path) if path.is_file() else None

        def report(model: str, distance: float, outputs: int) -> None:
            self.metrics.drift.labels(model).set(distance)

        return OutputMonitor(window, refs, report, busy=lambda: self.scheduler.busy())

    # --- who asks -----------------------------------------------------------------------------------------------
    async def authorize(self, request, role: str) -> Principal:
        """The caller's key checked (its scrypt off the event loop) for `role` and its rate; the audit row learns
        who asked: the presented key's id, and its name once its secret was right, whatever the decision."""
        audit = request.state.audit
        if self.no_auth:
            audit["key_id"], audit["key_name"] = None, ANONYMOUS.name
            return ANONYMOUS
        client = request.client.host if request.client else None
        try:
            principal = await self.keys.authenticate_async(request.headers.get("authorization"), client)
        except AuthError as err:
            audit["key_id"], audit["key_name"] = err.key_id, err.key_name
            raise
        audit["key_id"], audit["key_name"] = principal.key_id, principal.name
        self.keys.require(principal, role)
        self.keys.check_rate(principal)
        return principal

    def refund(self, request) -> None:
        """Give back the images of a request that was served by the worker but then failed to be answered (an
        error while building its answer); called for every error answer, it does nothing for the others."""
        held = getattr(request.state, "quota", None)
        if held is not None:
            request.state.quota = None
            try:
                self.keys.release_images(Principal(held.key_id, "", "user", None, None), held.images, held.day)
            except Exception:  # the answer is an error already; the count stays high by these images
                log.exception("could not give back %d images of key %s", held.images, held.key_id)

    def model(self, name: str | None, field_name: str = "model"):
        """The served model called `name` (None: the first one)."""
        if name is None or name == "":
            return next(iter(self.models.values()))
        if name not in self.models:
            shown = name[:60]
            raise FieldError(field_name, f"model {shown!r} is not served here; use one of: {', '.join(self.models)}")
        return self.models[name]

    def check(self, served, req: SampleRequest, principal: Principal) -> None:
        """The request against the content policy (PolicyRefusal) and the model (size multiples, labels, prompts for
        a class model) before it queues."""
        self.check_policy(req, principal)
        try:
            plan(served.ldm, req)
        except InputError as err:
            raise FieldError("request", str(err).replace("--height", "height").replace("--width", "width")) from None

    def check_policy(self, req: SampleRequest, principal: Principal) -> None:
        """PolicyRefusal (counted by rule in the metrics) when the content policy refuses one of the prompts;
        AuthError (403) when the key's role may not apply one of its LoRAs."""
        self.loras.check_role(req, principal)
        if self.policy is not None:
            try:
                self.policy.enforce(req.prompts or [], principal.role)
            except PolicyRefusal as refusal:
                self.metrics.policy.labels(refusal.rule).inc()
                raise

    # --- one request ----------------------------------------------------------------------------------------------
    async def generate(
        self, request, principal: Principal, served, req: SampleRequest, run=None, units=(), **extra
    ) -> Output:
        """Queue the request (a plain generation, or `run(ldm)` for an edit), wait for it while watching the client,
        and return its images; the audit row gets the parameters, the outputs and the timings. units: a generation's
        ControlNet units (controls.py: ControlUnit), recorded in its parameters and batched with its job."""
        audit = request.state.audit
        req = self.on_backend(req, served, run, units)
        params = request_params(req, **recorded(units), **extra)
        audit.update(model=served.name, weights_sha256=served.sha256, params=params)
        job = self.queue(principal, served, req, run, units=units)
        held = self._held.get(job.id)  # its images, given back by refund() if the answer fails after all
        deadline = time.monotonic() + self.run.serve.timeout_s
        waiter = asyncio.ensure_future(job.wait())  # one completion callback, however long the wait
        while not waiter.done():
            await asyncio.wait({waiter}, timeout=0.25)
            if not waiter.done():
                if await request.is_disconnected():
                    self.scheduler.cancel(job, "the client disconnected")
                    self._release(job)
                    audit.update(decision="cancelled", reason="the client disconnected")
                elif time.monotonic() > deadline:
                    self.scheduler.cancel(job, "timed out")
                    self._release(job)
                    raise RequestFailed(f"the request took over {self.run.serve.timeout_s:g} s; try fewer steps", 504)
        audit.update(queue_ms=round(job.queue_ms, 1), run_ms=round(job.run_ms, 1))
        import anyio

        held = held if job.id in self._held else None  # None: given back already (the client went away)
        out = await anyio.to_thread.run_sync(self.finished, job, served, params, audit, request.state.request_id)
        request.state.quota = held
        return out

    def on_backend(self, req: SampleRequest, served, run=None, units=()) -> SampleRequest:
        """req with the backend it runs on: the server's (serve.backend) for a generation at the model's own size
        with at most one LoRA, torch for an edit (run), a request with ControlNets (units), which OpenVINO's export
        does not hold, one of another size or with several LoRAs (each size and each LoRA combination is an export of
        its own, on disk: clients choosing sizes or combinations would fill it). The choice depends on the request
        alone, and requests on different backends never share a batch (share_key)."""
        res = served.ldm.run.data.resolution
        plain = run is None and not units and len(req.loras) <= 1 and {req.height, req.width} <= {0, res}
        return replace(req, backend=self.run.serve.backend if plain else "torch")

    def queue(
        self, principal: Principal, served, req: SampleRequest, run=None, on_done=None, frames: int = 1, units=()
    ) -> Job:
        """Reserve the images of the key's quota (frames: of each image, a clip's; each frame counts) and queue the
        job (units: a generation's ControlNet units, which steer its images in any batch); on_done(job) is attached
        before the worker can see the job, so it runs however fast the job ends.
        Refused at once (413) when its images are larger than limits.max_pixels or it cannot finish within
        serve.timeout_s, and (429) when the work queued ahead leaves it too little time."""
        self._check_pixels(served, req)
        req = self.on_backend(req, served, run, units)
        job = Job(
            served.name,
            req,
            owner=principal.key_id,
            run=run,
            controls=tuple(u.control for u in units),
            timeout_s=self.run.serve.timeout_s,
            frames=frames,
        )
        held = None if self.no_auth else self.keys.reserve_images(principal, job.n, self._hold_s())
        if held is not None:
            self._held[job.id] = held  # settled or given back exactly once: by finished, generate or _release
        if on_done is not None:
            job.on_done.append(on_done)
        try:
            self.scheduler.submit(job)
        except Exception as err:
            self._release(job)
            if isinstance(err, TooCostly):
                raise RequestFailed(str(err), 413) from None
            raise
        self.metrics.queue.set(self.scheduler.queued_images())
        return job

    # --- native jobs: queued now, asked for later ----------------------------------------------------------------
    def submit(
        self,
        principal: Principal,
        served,
        req: SampleRequest,
        params: dict,
        route: str = "job",
        run=None,
        frames: int = 1,
        output=None,
        units=(),
    ) -> Job:
        """Queue a native job and keep it among the last serve.jobs_kept; its own audit row (of `route`) is written
        when it ends (the POST's row says it was queued). route "job": images, steered by its ControlNet `units`
        (recorded in `params` by the caller); "video": a clip, which the video API makes with its `run` and turns
        into a file with its `output` (as finished takes it)."""
        record = {
            "route": route,
            "model": served.name,
            "params": params,
            "created": time.time(),
            "output": None,
            "ended": False,
        }
        done = lambda j: self._job_done(j, served, record, output)  # noqa: E731
        job = self.queue(principal, served, req, run, done, frames, units)
        self.jobs[job.id] = (job, record)
        while len(self.jobs) > self.run.serve.jobs_kept:
            self.jobs.popitem(last=False)
        return job

    def _job_done(self, job: Job, served, record: dict, output=None) -> None:
        """A native job's audit row, and its output (or its error) in its record."""
        row = dict(
            request_id=job.id,
            key_id=job.owner or None,
            route=record["route"],
            model=served.name,
            weights_sha256=served.sha256,
            params=record["params"],
            queue_ms=round(job.queue_ms, 1),
            run_ms=round(job.run_ms, 1),
        )
        try:
            out = self.finished(job, served, record["params"], row, job.id, output)
            record["output"] = out
            row.update(decision="served", status=200, outputs=out.sha256)
        except RequestFailed as err:
            record["error"] = str(err)
            row.update(
                decision="cancelled" if err.status == 499 else "failed", status=err.status, reason=str(err)[:300]
            )
        self.audit.record(**row)
        record["ended"] = True

    def job(self, job_id: str, principal: Principal, route: str = "job") -> tuple[Job, dict] | None:
        """The kept job `job_id` of `route` with its record, when `principal` owns it or is an admin; else None."""
        found = self.jobs.get(job_id)
        if found is None or found[1]["route"] != route or not self._owns(principal, found[0]):
            return None
        return found

    def jobs_of(self, principal: Principal, limit: int, route: str = "job") -> list[tuple[Job, dict]]:
        """The newest `limit` kept jobs of `route` that `principal` owns (all of them for an admin), newest first."""
        mine = (j for j in reversed(self.jobs.values()) if j[1]["route"] == route and self._owns(principal, j[0]))
        return list(itertools.islice(mine, limit))

    @staticmethod
    def _owns(principal: Principal, job: Job) -> bool:
        return principal.role == "admin" or job.owner == principal.key_id

    def job_view(self, job: Job, record: dict, images: bool = True) -> dict:
        """A job as its owner sees it: status, model, parameters, and once done its seeds, hashes and images."""
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
            view["error"] = scrub(record["error"], self.models)  # shown to the client: no server path or CLI advice
        return view

    def _check_pixels(self, served, req: SampleRequest) -> None:
        """413 when the request's images (at the model's resolution when it names no size) exceed limits.max_pixels."""
        h, w = resolution(served.ldm, req)
        if h * w > self.limits.max_pixels:
            raise RequestFailed(
                f"a {w}x{h} image is {h * w} pixels; this server makes images of at most {self.limits.max_pixels} "
                f"pixels; ask for a smaller width and height",
                413,
            )

    def finished(self, job: Job, served, params: dict, audit: dict, request_id: str, output=None) -> Output:
        """The job's images as PNGs (each with its generation record embedded: model, weights hash, parameters,
        seed, request id, time) after the output screen, or the error the job ended with. Its reserved images are
        settled when this returns, and given back when it raises. output: what makes the answer of a done job
        instead, called as _output is (the video API's MP4)."""
        self.metrics.queue.set(self.scheduler.queued_images())
        try:
            if job.state != DONE:
                raise self._failure(job)
            out = (output or self._output)(job, served, params, audit, request_id)
        except BaseException:
            self._release(job)
            raise
        self._settle(job)
        return out

    def _output(self, job: Job, served, params: dict, audit: dict, request_id: str) -> Output:
        seeds = [job.req.seed + i for i in range(job.req.n)]
        record = {"model": served.name, "weights_sha256": served.sha256, **params}
        made = {"request_id": request_id, "time": utc_now().isoformat(timespec="seconds")}
        keep = getattr(job.run, "keep", None)  # an inpainting's kept pixels: the watermark changes only the others
        screened = self.screens[served.name]([to_pil(img) for img in job.images], watermark.tag_of(request_id), keep)
        notes = unmarked(self.screens[served.name], screened, keep)  # a region too small to carry the mark
        metas = [
            {"ldmkit": json.dumps({**record, "seed": s, "n": 1, "index": i, **made, **notes[i]})}
            for i, s in enumerate(seeds)
        ]
        pngs = [self._png(s.marked, meta) for s, meta in zip(screened, metas)]
        out = Output(pngs, seeds, shown=[None] * len(pngs), withheld=[None] * len(pngs), flags=[None] * len(pngs))
        for i, s in enumerate(screened):
            out.shown[i] = pngs[i] if s.image is s.marked else None if s.image is None else self._png(s.image, metas[i])
            out.flags[i] = notes[i].get("note")
            if s.action is not None:
                out.flags[i] = "; ".join(s.reasons + ([out.flags[i]] if out.flags[i] else []))
                out.withheld[i] = out.flags[i] if s.action in ("withhold", "blur") else None
                self._count(served.name, s)
        audit["outputs"] = out.sha256
        flagged = [f"image {i} ({out.sha256[i][:16]}): {why}" for i, why in enumerate(out.flags) if why]
        if flagged:
            audit["reason"] = "; ".join(flagged)[:1000]
        self.metrics.images.labels(served.name).inc(len(pngs))
        if self.monitor is not None:
            self.monitor.add(served.name, job.images)
        return out

    def _count(self, model: str, s) -> None:
        """The metrics of one screened image's decisions: the safety filter's and the similarity screen's."""
        screen = self.screens[model]
        if screen.safety is not None and s.safety is not None and s.safety >= screen.safety.settings.threshold:
            self.metrics.safety.labels(model, screen.safety.settings.action).inc()
        if s.similarity is not None and s.similarity >= screen.threshold:
            self.metrics.similarity.labels(model, screen.similarity.action).inc()

    def _release(self, job: Job) -> None:
        """Give back the images reserved for `job` (nothing when they were settled or given back already)."""
        held = self._held.pop(job.id, None)
        if held is not None:
            try:
                self.keys.release(held)
            except Exception:  # the database failed: reconcile gives them back once the reservation expires
                log.exception("could not give back the %d images reserved for job %s", held.images, job.id)

    def _settle(self, job: Job):
        """Keep the images reserved for `job` counted (it was served); the Reservation, or None without one."""
        held = self._held.pop(job.id, None)
        if held is not None:
            self.keys.settle(held)
        return held

    def _hold_s(self) -> float:
        """How long a reservation may stay open: longer than any request lives (queue and run, each within
        serve.timeout_s), so that reconcile only gives back the images of requests that can no longer be answered."""
        return 2 * self.run.serve.timeout_s + 60

    @staticmethod
    def _failure(job: Job) -> Exception:
        err = job.error
        if job.state == CANCELLED or isinstance(err, Cancelled):
            return RequestFailed(f"the request was cancelled ({err})", 499)
        if isinstance(err, ShuttingDown):
            return RequestFailed(str(err), 503)
        if isinstance(err, TimeoutError):
            return RequestFailed(str(err), 504)
        if isinstance(err, (LdmkitError, AuthError)):
            return RequestFailed(str(err), 422)
        return RequestFailed("the server failed to run this request; its audit row and the server log say why", 500)
