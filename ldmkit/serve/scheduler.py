"""The queue between HTTP requests and the models: bounded, batching, cancellable, drained on shutdown.

One worker thread runs the models (on a CPU the cores are better spent inside one forward pass than split between
two). It takes the oldest job, gathers the queued jobs that can share its forward passes (same model and
`share_key`) up to `max_batch` images, waits at most `max_wait_ms` for company, and runs them together with
pipelines.batching. Batching never changes an image: each keeps its own seed, conditioning and guidance scale.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import LdmkitError
from ..pipelines.batching import generate_together, share_key
from ..pipelines.generate import SampleRequest

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"


class QueueFull(LdmkitError):
    """The queue holds as many images as it may; the client should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


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
    timeout_s: float = 300.0
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: str = QUEUED
    images: torch.Tensor | None = None  # (n, C, H, W) in [-1, 1] when done
    error: Exception | None = None
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    batch_images: int = 0  # how many images shared its forward passes
    on_done: list[Callable[["Job"], None]] = field(default_factory=list)
    _event: threading.Event = field(default_factory=threading.Event)

    @property
    def n(self) -> int:
        return self.req.n

    @property
    def key(self) -> tuple:
        return (self.model, "edit", self.id) if self.run is not None else (self.model, *share_key(self.req))

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
        self, models: dict, max_batch: int = 16, max_wait_ms: float = 25, queue_images: int = 64, on_batch=None
    ):
        """models: name -> LatentDiffusion; max_batch: images per forward pass; max_wait_ms: how long the oldest job
        waits for company; queue_images: images that may wait (more: QueueFull); on_batch(images): a metrics hook."""
        self.models, self.max_batch, self.max_wait = models, max_batch, max_wait_ms / 1000
        self.queue_images, self.on_batch = queue_images, on_batch
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._draining = False
        self._running: list[Job] = []
        self._seconds_per_image = 1.0  # measured as batches finish; sizes Retry-After
        self._thread = threading.Thread(target=self._work, name="ldmkit-scheduler", daemon=True)
        self._thread.start()

    # --- the HTTP side ----------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self._cv:
            if self._draining:
                raise ShuttingDown("the server is shutting down and takes no new work; retry on another replica")
            waiting = self.queued_images()
            if waiting + job.n > self.queue_images:
                retry = max(1, round((waiting + job.n) * self._seconds_per_image))
                raise QueueFull(f"the queue is full ({waiting} images waiting); retry in {retry} s", retry)
            self._queue.append(job)
            self._cv.notify_all()
        return job

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

    def _next_batch(self) -> list[Job] | None:
        """The oldest live job and the queued jobs that can share its passes, after waiting for company."""
        with self._cv:
            while True:
                while not self._queue and not self._draining:
                    self._cv.wait()
                if self._draining and not self._queue:
                    return None
                head = self._queue[0]
                if time.monotonic() - head.created > head.timeout_s:
                    self._queue.popleft()
                    head.finish(
                        FAILED, error=TimeoutError(f"the request waited over {head.timeout_s:g} s in the queue")
                    )
                    continue
                batch = self._gather(head)
                waited = time.monotonic() - head.created
                if sum(j.n for j in batch) >= self.max_batch or waited >= self.max_wait or head.run is not None:
                    break
                self._cv.wait(self.max_wait - waited)
            for job in batch:
                self._queue.remove(job)
                job.state, job.started = RUNNING, time.monotonic()
            self._running = batch
            return batch

    def _gather(self, head: Job) -> list[Job]:
        batch, images = [head], head.n
        for job in list(self._queue)[1:]:
            if job.key == head.key and images + job.n <= self.max_batch:
                batch.append(job)
                images += job.n
        return batch

    def _run(self, batch: list[Job]) -> None:
        ldm = self.models[batch[0].model]

        def stop_when_abandoned(*_):
            if all(j.error is not None for j in batch):
                raise Cancelled("every request of this batch was cancelled")

        t0 = time.monotonic()
        try:
            if batch[0].run is not None:
                results = [batch[0].run(ldm)]
            else:
                results = self._generate(ldm, batch, stop_when_abandoned)
        except Cancelled:
            results = [None] * len(batch)
        except Exception as err:  # a defect or an environment failure: every job of the batch reports it
            for job in batch:
                job.finish(FAILED, error=err)
            results = None
        images = sum(j.n for j in batch)
        if results is not None:
            for job, out in zip(batch, results):
                if isinstance(out, Exception):
                    job.finish(FAILED, error=out)
                elif job.error is not None or out is None:
                    job.finish(CANCELLED, error=job.error or Cancelled("cancelled"))
                else:
                    job.batch_images = images
                    job.finish(DONE, images=out)
        self._seconds_per_image = 0.5 * self._seconds_per_image + 0.5 * (time.monotonic() - t0) / max(images, 1)
        with self._cv:
            self._running = []
        if self.on_batch is not None:
            self.on_batch(images)

    def _generate(self, ldm, batch: list[Job], callback) -> list:
        """Each job's images; when sampling fails for the batch, each job alone, so only the one whose options
        cause non-finite values fails."""
        try:
            return generate_together(ldm, [j.req for j in batch], self.max_batch, callback)
        except LdmkitError:  # NonFiniteError among them
            if len(batch) == 1:
                raise
        out: list = []
        for job in batch:
            try:
                out.append(generate_together(ldm, [job.req], self.max_batch, callback)[0])
            except LdmkitError as err:
                out.append(err)
        return out
