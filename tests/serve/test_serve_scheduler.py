"""The serving queue: batches of compatible requests, bounded size, cancellation, draining, failure isolation."""

import asyncio
import time

import pytest
import torch

from ldmkit.ldm import LatentDiffusion
from ldmkit.pipelines.generate import generate
from ldmkit.pipelines.request import SampleRequest
from ldmkit.serve.scheduler import CANCELLED, DONE, FAILED, Job, QueueFull, Scheduler, ShuttingDown


@pytest.fixture(scope="module")
def ldm(tiny_text_ldm):
    return LatentDiffusion.load(tiny_text_ldm)


def wait_all(jobs, timeout=60):
    deadline = time.monotonic() + timeout
    for job in jobs:
        assert job._event.wait(max(0.0, deadline - time.monotonic())), job.state


def test_compatible_requests_share_batches_and_keep_their_images(ldm):
    sizes = []
    sched = Scheduler({"m": ldm}, max_batch=8, max_wait_ms=300, on_batch=sizes.append)
    try:
        reqs = [SampleRequest(n=2, prompts=[f"p{i}"], cfg=2.0 + i, seed=10 * i, steps=3) for i in range(3)]
        other = SampleRequest(n=1, prompts=["q"], steps=5)  # other steps: its own batch
        jobs = [sched.submit(Job("m", r)) for r in [*reqs, other]]
        wait_all(jobs)
        assert all(j.state == DONE for j in jobs)
        assert sorted(sizes) == [1, 6]
        for job in jobs:
            assert torch.equal(job.images, generate(ldm, job.req)[0])
        assert jobs[0].batch_images == 6 and jobs[3].batch_images == 1
    finally:
        sched.close()


def test_a_full_queue_refuses_with_retry_after_and_cancel_drops_queued_work(ldm):
    sched = Scheduler({"m": ldm}, max_batch=1, max_wait_ms=0, queue_images=3)
    try:
        long = sched.submit(Job("m", SampleRequest(n=1, steps=200, prompts=["a"])))
        while long.state != "running":
            time.sleep(0.01)
        queued = [sched.submit(Job("m", SampleRequest(n=1, steps=2, prompts=["b"], seed=i))) for i in range(3)]
        with pytest.raises(QueueFull) as err:
            sched.submit(Job("m", SampleRequest(n=1, steps=2)))
        assert err.value.retry_after >= 1
        assert sched.cancel(queued[1]) and queued[1].state == CANCELLED
        assert sched.queued_images() == 2
        sched.cancel(long)  # running alone: stopped at its next step
        wait_all([long, queued[0], queued[2]])
        assert long.state == CANCELLED and queued[0].state == DONE and queued[2].state == DONE
    finally:
        sched.close()


def test_one_bad_request_fails_alone(ldm):
    sched = Scheduler({"m": ldm}, max_batch=8, max_wait_ms=300)
    try:
        good = sched.submit(Job("m", SampleRequest(n=1, prompts=["a"], cfg=3.0, steps=3)))
        bad = sched.submit(Job("m", SampleRequest(n=1, prompts=["b"], cfg=1e38, steps=3)))
        wait_all([good, bad])
        assert good.state == DONE and bad.state == FAILED
        assert "NaN" in str(bad.error) or "infinite" in str(bad.error)
        assert torch.equal(good.images, generate(ldm, good.req)[0])
    finally:
        sched.close()


def test_draining_refuses_new_work_and_finishes_accepted_work(ldm):
    sched = Scheduler({"m": ldm}, max_batch=1, max_wait_ms=0)
    jobs = [sched.submit(Job("m", SampleRequest(n=1, steps=3, prompts=["a"], seed=i))) for i in range(3)]
    sched.drain()
    with pytest.raises(ShuttingDown):
        sched.submit(Job("m", SampleRequest(n=1, steps=3)))
    sched.close()
    assert [j.state for j in jobs] == [DONE] * 3


def test_waiting_on_a_job_does_not_block_the_event_loop(ldm):
    sched = Scheduler({"m": ldm}, max_batch=4, max_wait_ms=0)
    try:

        async def main():
            job = sched.submit(Job("m", SampleRequest(n=1, steps=3, prompts=["a"])))
            ticks = 0

            async def tick():
                nonlocal ticks
                while not job._event.is_set():
                    ticks += 1
                    await asyncio.sleep(0.001)

            await asyncio.gather(job.wait(), tick())
            return job, ticks

        job, ticks = asyncio.run(main())
        assert job.state == DONE and ticks > 0
    finally:
        sched.close()
