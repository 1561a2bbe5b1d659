"""The queue between HTTP requests and the models: bounded, batching, cancellable, drained on shutdown.

One worker thread runs the models (on a CPU the cores are better spent inside one forward pass than split between
two). It takes the oldest job of the key whose turn it is, gathers the queued jobs that can share its forward passes
(same model and `share_key`) up to `max_batch` images, waits at most `max_wait_ms` for company, and runs them together
with pipelines.batching. Batching never changes an image: each keeps its own seed, conditioning, guidance scale,
LoRAs and ControlNet controls (a controlled generation batches with plain ones; edits run alone).

Fairness: keys take turns. The next batch starts with the oldest job of the key served longest ago (a key never
served first), and its company is drawn from the compatible jobs one key at a time, in the same order, so a key with
many queued jobs cannot hold the worker while others wait.

Time: a job ends at `created + timeout_s` wherever it is. Queued, it is dropped; running, its sampling stops at the
next step (the batch's other jobs run on and get their own images; the batch stops when none is left alive).
Admission: each model's seconds per step are measured (cost.py: a warm-up at start, then every batch), and a request
that cannot finish within its time limit is refused at once: TooCostly (413) when it is too large alone, QueueFull
(429, Retry-After) when the work queued ahead of it leaves too little time.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import LdmkitError
from ..pipelines.batching import generate_together, share_key
from ..pipelines.request import SampleRequest
from .cost import StepCost, StepTimer, describe, units_per_step

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"


class QueueFull(LdmkitError):
    """The queue holds as many images as it may; the client should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class TooCostly(LdmkitError):
    """The request alone would take longer than its time limit; `estimate_s` is the estimate."""

    def __init__(self, message: str, estimate_s: float):
        super().__init__(message)
        self.estimate_s = estimate_s


class ShuttingDown(LdmkitError):
    """The server is draining for shutdown and takes no new work."""


class Cancelled(Exception):
    """Raised inside a batch whose jobs were all cancelled, to stop its sampling early."""


@dataclass(eq=False)
class Job:
    """One request's work: a generation (batched with others) or an edit (`run`, alone)."""

    model: str
    req: SampleRequest
    owner: str = ""  # the key id that asked
    run: Callable | None = None  # run(ldm) -> images (n, C, H, W), for work that is not plain generation
    controls: tuple = ()  # a generation's ControlNet controls (denoisers/controlnet.py: Control), batched per image
    frames: int = 1  # frames per image: a clip of F frames counts as F images (queue, quota, cost)
    timeout_s: float = 300.0
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: str = QUEUED
    images: torch.Tensor | None = None  # (n, C, H, W) in [-1, 1] when done
    error: Exception | None = None
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    batch_images: int = 0  # how many images shared its forward passes
    units: int = 0  # its work in one sampling step, its ControlNets' included (cost.units_per_step); 0 when unknown
    on_done: list[Callable[["Job"], None]] = field(default_factory=list)
    _event: threading.Event = field(default_factory=threading.Event)

    @property
    def n(self) -> int:
        """Its images: the request's, times the frames of each (a clip)."""
        return self.req.n * self.frames

    @property
    def key(self) -> tuple:
        return (self.model, "edit", self.id) if self.run is not None else (self.model, *share_key(self.req))

    @property
    def deadline(self) -> float:
        """When it times out (time.monotonic()), queued or running."""
        return self.created + self.timeout_s

    @property
    def queue_ms(self) -> float:
        return 1000 * ((self.started or self.finished or time.monotonic()) - self.created)

    @property
    def run_ms(self) -> float:
        return 1000 * (self.finished - self.started) if self.started and self.finished else 0.0

    def finish(self, state: str, images: torch.Tensor | None = None, error: Exception | None = None) -> None:
        if self._event.is_set():
            return
        self.state, self.images, self.error, self.finished = state, images, error, time.monotonic()
        self._event.set()
        for fn in self.on_done:
            fn(self)

    async def wait(self) -> "Job":
        """Wait (without blocking the event loop) until the job is done, failed or cancelled."""
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        self.on_done.append(lambda _: loop.call_soon_threadsafe(done.set))
        if self._event.is_set():
            return self
        await done.wait()
        return self


class Scheduler:
    """A bounded queue of jobs and the worker thread that runs them in batches."""

    def __init__(
        self,
        models: dict,
        max_batch: int = 16,
        max_wait_ms: float = 25,
        queue_images: int = 64,
        on_batch=None,
        warmup: bool = False,
        precision: str = "fp32",
        backend: str = "torch",
    ):
        """models: name -> LatentDiffusion; max_batch: images per forward pass; max_wait_ms: how long the oldest job
        waits for company; queue_images: images that may wait (more: QueueFull); on_batch(images): a metrics hook;
        warmup: time a few tiny batches of each model here, before the worker starts, so admission has an estimate
        from the first request on (without it, requests are admitted until the first batches were measured);
        precision, backend: what the warm-up batches run in, the server's (serve.precision, serve.backend: an
        OpenVINO export is made or read then, not at the first request)."""
        self.models, self.max_batch, self.max_wait = models, max_batch, max_wait_ms / 1000
        self.queue_images, self.on_batch, self.warmup = queue_images, on_batch, warmup
        self.precision, self.backend = precision, backend
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._draining = False
        self._running: list[Job] = []
        self._running_until = 0.0  # when the running batch should end, by its estimate
        self._seconds_per_image = 1.0  # measured as batches finish; sizes Retry-After until the costs are known
        self.costs = {name: StepCost() for name in models}  # each model's measured seconds per step
        self._turn = 0  # batches started
        self._served: dict[str, int] = {}  # key id -> the turn its jobs last ran in
        if warmup:
            self._warm_up()
        self._thread = threading.Thread(target=self._work, name="ldmkit-scheduler", daemon=True)
        self._thread.start()

    # --- the HTTP side ----------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Queue `job`, or refuse it at once: ShuttingDown, QueueFull (no room, or too much work ahead of it to
        finish in time), TooCostly (it cannot finish in time even alone)."""
        job.units = self._units(job)
        with self._cv:
            if self._draining:
                raise ShuttingDown("the server is shutting down and takes no new work; retry on another replica")
            waiting = self.queued_images()
            if waiting + job.n > self.queue_images:
                ahead = self._work_ahead()
                seconds = ahead if ahead is not None else (waiting + job.n) * self._seconds_per_image
                retry = max(1, math.ceil(seconds))
                raise QueueFull(f"the queue is full ({waiting} images waiting); retry in {retry} s", retry)
            self._admit(job)
            self._queue.append(job)
            self._cv.notify_all()
        return job

    def estimate(self, job: Job) -> float | None:
        """Seconds `job` would take alone on the worker, by its model's measured cost; None before any measurement."""
        if not job.units or job.model not in self.costs:
            return None
        return self.costs[job.model].seconds(job.units, job.req.steps)

    def _units(self, job: Job) -> int:
        try:
            return units_per_step(self.models[job.model], job.req, job.controls) * job.frames
        except (LdmkitError, KeyError):  # a size the model cannot sample: the run reports it
            return 0

    def _admit(self, job: Job) -> None:
        """TooCostly or QueueFull when `job` cannot finish within its time limit (alone, or after the queued work)."""
        own = self.estimate(job)
        if own is None:
            return
        what = describe(self.models[job.model], job.req, job.frames, job.controls)
        if own > job.timeout_s:
            raise TooCostly(
                f"this request ({what}) would take about {own:.1f} s on this server, over its {job.timeout_s:g} s "
                f"limit; ask for fewer images, fewer steps or fewer pixels",
                own,
            )
        ahead = self._work_ahead() or 0.0
        if ahead + own > job.timeout_s:
            retry = max(1, math.ceil(ahead))
            raise QueueFull(
                f"the server has about {ahead:.1f} s of work ahead of this request ({what}), which would take about "
                f"{own:.1f} s more, past its {job.timeout_s:g} s limit; retry in {retry} s or ask for less",
                retry,
            )

    def _work_ahead(self) -> float | None:
        """Seconds of work queued and running (queued jobs that can share passes counted as batches); call with the
        lock held. None when no model's cost is known yet."""
        if not any(c.fit() is not None for c in self.costs.values()):
            return None
        groups: dict[tuple, list[Job]] = {}
        for job in self._queue:
            groups.setdefault(job.key, []).append(job)
        total = max(0.0, self._running_until - time.monotonic()) if self._running else 0.0
        for jobs in groups.values():
            cost = self.costs.get(jobs[0].model)
            units = sum(j.units for j in jobs)
            batches = math.ceil(sum(j.n for j in jobs) / self.max_batch)
            seconds = cost.seconds(units, jobs[0].req.steps, batches) if cost is not None and units else None
            total += seconds or 0.0
        return total

    def cancel(self, job: Job, why: str = "cancelled") -> bool:
        """Drop a queued job at once; a running one is dropped when its batch ends (or stopped early when every job
        of its batch is cancelled). False when it had already finished."""
        with self._cv:
            if job.state in (DONE, FAILED, CANCELLED):
                return False
            if job in self._queue:
                self._queue.remove(job)
            job.error = Cancelled(why)
            if job.state == QUEUED:
                job.finish(CANCELLED, error=Cancelled(why))
            return True

    def queued_images(self) -> int:
        return sum(j.n for j in self._queue)

    def busy(self) -> bool:
        """Whether work is queued or running (background work waits while it is)."""
        return bool(self._queue or self._running)

    def drain(self) -> None:
        """Refuse new work (ShuttingDown); what is queued or running still runs."""
        with self._cv:
            self._draining = True
            self._cv.notify_all()

    def close(self, timeout: float = 600) -> None:
        """Drain, wait up to `timeout` seconds for the queued and running work, fail what is left, stop."""
        self.drain()
        self._thread.join(timeout)
        with self._cv:
            for job in list(self._queue):
                job.finish(FAILED, error=ShuttingDown("the server shut down before this request ran; retry it"))
            self._queue.clear()

    @property
    def draining(self) -> bool:
        return self._draining

    # --- the worker -------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _warm_up(self) -> None:
        """Time each model's sampling steps on one image and on a small batch. Models that cannot sample from noise
        (inpainting, upscaling) are measured by their first batches instead."""
        for name, ldm in self.models.items():
            for n in sorted({1, min(4, self.max_batch)}):
                req = SampleRequest(n=n, steps=3, precision=self.precision, backend=self.backend)
                timer = StepTimer()
                try:
                    generate_together(ldm, [req], self.max_batch, timer)
                except LdmkitError:
                    break
                self.costs[name].add(units_per_step(ldm, req), timer.seconds_per_step(), anchor=True)

    def _next_batch(self) -> list[Job] | None:
        """The next batch (see the module's note on fairness), after waiting for company; None when drained."""
        with self._cv:
            while True:
                while not self._queue and not self._draining:
                    self._cv.wait()
                if self._draining and not self._queue:
                    return None
                self._expire_queued()
                if not self._queue:
                    continue
                head = self._head()
                batch = self._gather(head)
                waited = time.monotonic() - head.created
                if sum(j.n for j in batch) >= self.max_batch or waited >= self.max_wait or head.run is not None:
                    break
                self._cv.wait(self.max_wait - waited)
            self._turn += 1
            for job in batch:
                self._queue.remove(job)
                job.state, job.started = RUNNING, time.monotonic()
                self._served[job.owner] = self._turn
            estimate = sum(self.estimate(j) or 0.0 for j in batch)
            self._running, self._running_until = batch, time.monotonic() + estimate
            return batch

    def _expire_queued(self) -> None:
        """Fail every queued job past its deadline (with the lock held)."""
        now = time.monotonic()
        for job in [j for j in self._queue if now > j.deadline]:
            self._queue.remove(job)
            job.finish(FAILED, error=TimeoutError(f"the request waited over {job.timeout_s:g} s in the queue"))

    def _turn_of(self, job: Job) -> tuple:
        """Sort order of keys: the one served longest ago first (never served: first of all), then the oldest job."""
        return self._served.get(job.owner, -1), job.created

    def _head(self) -> Job:
        """The oldest job of the key whose turn it is."""
        oldest: dict[str, Job] = {}
        for job in self._queue:
            oldest.setdefault(job.owner, job)
        return min(oldest.values(), key=self._turn_of)

    def _gather(self, head: Job) -> list[Job]:
        """`head` and the queued jobs that can share its passes, taken one key at a time in turn, up to max_batch."""
        by_key: dict[str, list[Job]] = {head.owner: []}
        for job in self._queue:
            if job is not head and job.key == head.key:
                by_key.setdefault(job.owner, []).append(job)
        others = sorted((k for k in by_key if k != head.owner and by_key[k]), key=lambda k: self._turn_of(by_key[k][0]))
        order = [*others, head.owner]  # head was the head key's pick of the first round
        batch, images = [head], head.n
        while any(by_key[k] for k in order):
            for owner in order:
                fits = [j for j in by_key[owner] if images + j.n <= self.max_batch]
                by_key[owner] = fits[1:]  # what does not fit now never will in this batch
                if fits:
                    batch.append(fits[0])
                    images += fits[0].n
        return batch

    def _run(self, batch: list[Job]) -> None:
        ldm = self.models[batch[0].model]
        timer = StepTimer()

        def stop_when_abandoned(*_):
            """Called at every step: times out the jobs past their deadline, and stops the batch when none is alive."""
            now = timer()
            with self._cv:
                for job in batch:
                    if job.error is None and now > job.deadline:
                        job.error = TimeoutError(
                            f"the request took over {job.timeout_s:g} s; ask for fewer images, steps or pixels"
                        )
                if all(j.error is not None for j in batch):
                    raise Cancelled("every request of this batch was cancelled or timed out")

        t0 = time.monotonic()
        measured = True
        try:
            if batch[0].run is not None:  # an edit runs alone; its pipeline applies its request's LoRAs (plan.draw)
                results = [batch[0].run(ldm)]
            else:
                results = self._generate(ldm, batch, stop_when_abandoned)
        except Cancelled:
            results = [None] * len(batch)
        except Exception as err:  # a defect or an environment failure: every job of the batch reports it
            for job in batch:
                job.finish(FAILED, error=err)
            results, measured = None, False
        elapsed = time.monotonic() - t0
        images = sum(j.n for j in batch)
        if results is not None:
            for job, out in zip(batch, results):
                if isinstance(out, Exception):
                    job.finish(FAILED, error=out)
                    measured = False
                elif isinstance(job.error, TimeoutError):
                    job.finish(FAILED, error=job.error)
                elif job.error is not None or out is None:
                    job.finish(CANCELLED, error=job.error or Cancelled("cancelled"))
                else:
                    job.batch_images = images
                    job.finish(DONE, images=out)
        seconds = timer.seconds_per_step()  # between the steps the callback saw
        if seconds is None and batch[0].run is not None:  # an edit reports no steps: over all it asked for
            seconds = elapsed / max(batch[0].req.steps, 1)
        if measured and seconds is not None:
            self.costs[batch[0].model].add(sum(j.units for j in batch), seconds)
        self._seconds_per_image = 0.5 * self._seconds_per_image + 0.5 * elapsed / max(images, 1)
        with self._cv:
            self._running = []
        if self.on_batch is not None:
            self.on_batch(images)

    def _generate(self, ldm, batch: list[Job], callback) -> list:
        """Each job's images; when sampling fails for the batch, each job alone, so only the one whose options
        cause non-finite values fails."""
        try:
            return generate_together(ldm, [j.req for j in batch], self.max_batch, callback, [j.controls for j in batch])
        except LdmkitError:  # NonFiniteError among them
            if len(batch) == 1:
                raise
        out: list = []
        for job in batch:
            try:
                out.append(generate_together(ldm, [job.req], self.max_batch, callback, [job.controls])[0])
            except LdmkitError as err:
                out.append(err)
        return out
