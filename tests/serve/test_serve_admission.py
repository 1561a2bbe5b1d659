"""The serving queue under load: deadlines stop running work, admission refuses what cannot finish in time, and
keys take turns."""

import threading
import time

import pytest
import torch

from ldmkit.denoisers.controlnet import Control, ControlNet
from ldmkit.ldm import LatentDiffusion
from ldmkit.pipelines.generate import generate
from ldmkit.pipelines.request import SampleRequest
from ldmkit.serve import scheduler as scheduler_module
from ldmkit.serve.cost import StepCost, units_per_step
from ldmkit.serve.scheduler import DONE, FAILED, Job, QueueFull, Scheduler, TooCostly


@pytest.fixture(scope="module")
def ldm(tiny_text_ldm):
    return LatentDiffusion.load(tiny_text_ldm)


def wait_all(jobs, timeout=120):
    deadline = time.monotonic() + timeout
    for job in jobs:
        assert job._event.wait(max(0.0, deadline - time.monotonic())), job.state


def counting(monkeypatch, on_step=None):
    """Wrap the scheduler's batch runner: steps[seed] counts the sampling steps run for the request of that seed;
    on_step(reqs, i) runs at every step before the scheduler's own callback."""
    steps: dict[int, int] = {}
    real = scheduler_module.generate_together

    def wrapped(ldm, reqs, batch_size=16, callback=None, controls=None):
        count = [0]

        def step(*args):
            count[0] += 1
            for r in reqs:
                steps[r.seed] = steps.get(r.seed, 0) + 1
            if on_step is not None:
                on_step(reqs, count[0])
            if callback is not None:
                callback(*args)

        return real(ldm, reqs, batch_size, step, controls)

    monkeypatch.setattr(scheduler_module, "generate_together", wrapped)
    return steps


# --- deadlines ------------------------------------------------------------------------------------------------------
def test_a_running_request_past_its_time_limit_stops_at_its_next_step_and_frees_the_worker(ldm, monkeypatch):
    steps = counting(monkeypatch)
    sched = Scheduler({"m": ldm}, max_batch=4, max_wait_ms=0)
    try:
        long = sched.submit(Job("m", SampleRequest(n=2, steps=1000, prompts=["a"], seed=1), timeout_s=0.3))
        after = sched.submit(Job("m", SampleRequest(n=1, steps=2, prompts=["b"], seed=2), timeout_s=600))
        wait_all([long, after])
        assert long.state == FAILED and isinstance(long.error, TimeoutError), (long.state, long.error)
        assert steps.get(1, 0) < 1000  # stopped, not run to the end
        assert after.state == DONE
    finally:
        sched.close()


def test_a_timed_out_request_in_a_batch_leaves_the_others_their_exact_images(ldm, monkeypatch):
    jobs: list[Job] = []

    def expire_first(reqs, i):
        if i == 3 and len(reqs) == 2:
            jobs[0].timeout_s = 0.0  # its deadline passes during the batch's third step

    steps = counting(monkeypatch, expire_first)
    sched = Scheduler({"m": ldm}, max_batch=8, max_wait_ms=2000)
    try:
        for i, cfg in enumerate((2.0, 4.0)):
            req = SampleRequest(n=2, steps=8, prompts=[f"p{i}"], cfg=cfg, seed=10 * i + 1)
            jobs.append(Job("m", req, timeout_s=600))
        for job in jobs:
            sched.submit(job)
        wait_all(jobs)
        dead, alive = jobs
        assert dead.state == FAILED and isinstance(dead.error, TimeoutError)
        assert alive.state == DONE and alive.batch_images == 4  # it shared the batch with the dead one
        assert torch.equal(alive.images, generate(ldm, alive.req)[0])
        assert steps[alive.req.seed] == 8  # the batch ran on for the living request
    finally:
        sched.close()


def test_a_batch_whose_requests_all_timed_out_stops(ldm, monkeypatch):
    jobs: list[Job] = []

    def expire_all(reqs, i):
        if i == 2:
            for job in jobs:
                job.timeout_s = 0.0

    steps = counting(monkeypatch, expire_all)
    sched = Scheduler({"m": ldm}, max_batch=8, max_wait_ms=2000)
    try:
        for i in range(2):
            jobs.append(Job("m", SampleRequest(n=1, steps=500, prompts=["a"], seed=i + 1), timeout_s=600))
        for job in jobs:
            sched.submit(job)
        wait_all(jobs)
        assert [j.state for j in jobs] == [FAILED, FAILED]
        assert all(isinstance(j.error, TimeoutError) for j in jobs)
        assert steps[1] == steps[2] == 2  # stopped at the first step that saw the deadline passed
    finally:
        sched.close()


# --- admission ------------------------------------------------------------------------------------------------------
def test_the_step_cost_fit_recovers_a_known_line_and_is_not_skewed_by_small_batches():
    cost = StepCost()
    a, b = 0.02, 1e-7  # a fixed 20 ms a step, plus 0.1 s per million units
    cost.add(1_000, a + b * 1_000, anchor=True)
    cost.add(100_000, a + b * 100_000, anchor=True)
    for _ in range(40):  # many small batches afterwards: their fixed cost must not be charged to every unit
        cost.add(2_000, a + b * 2_000)
    fa, fb = cost.fit()
    assert fa == pytest.approx(a, rel=1e-6) and fb == pytest.approx(b, rel=1e-6)
    big = 10_000_000
    assert cost.seconds(big, steps=10) == pytest.approx(10 * (a + b * big), rel=1e-6)
    assert cost.seconds(big, steps=10, batches=3) > cost.seconds(big, steps=10)
    assert StepCost().seconds(big, steps=10) is None  # nothing measured yet: no estimate


def gate_pipeline(monkeypatch, order: list):
    """A fake batch runner: records each batch's request seeds and waits for `gate` on the first batch."""
    gate = threading.Event()

    def fake(ldm, reqs, batch_size=16, callback=None, controls=None):
        order.append([r.seed for r in reqs])
        if len(order) == 1:
            assert gate.wait(60)
        return [torch.zeros(r.n, 3, 8, 8) for r in reqs]

    monkeypatch.setattr(scheduler_module, "generate_together", fake)
    return gate


def running(job):
    deadline = time.monotonic() + 60
    while job.state != "running":
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_a_request_that_cannot_finish_in_time_is_refused_at_once_with_its_estimate(ldm, monkeypatch):
    order: list = []
    gate = gate_pipeline(monkeypatch, order)
    sched = Scheduler({"m": ldm}, max_batch=4, max_wait_ms=0)
    try:
        small = SampleRequest(n=1, steps=10, prompts=["a"], seed=1)
        units = units_per_step(ldm, small)
        sched.costs["m"].add(units, 0.1, anchor=True)  # measured: 0.1 s a step for one image, 0.4 s for four
        sched.costs["m"].add(4 * units, 0.4, anchor=True)
        with pytest.raises(TooCostly) as err:  # 4 images x 100 steps: about 40 s alone, over its 30 s
            sched.submit(Job("m", SampleRequest(n=4, steps=100, prompts=["a"]), timeout_s=30))
        assert err.value.estimate_s == pytest.approx(40, rel=0.01)
        assert "about 40.0 s" in str(err.value) and "fewer" in str(err.value)
        first = sched.submit(Job("m", small, timeout_s=30))  # 1 s: admitted, and it holds the worker
        running(first)
        queued = [
            sched.submit(Job("m", SampleRequest(n=1, steps=100, prompts=["b"], seed=2 + i), timeout_s=30))
            for i in range(2)
        ]  # 10 s each, 20 s queued
        with pytest.raises(QueueFull) as full:  # 10 s more after about 20 s queued: past 30 s
            sched.submit(Job("m", SampleRequest(n=1, steps=100, prompts=["c"], seed=9, cfg=5.0), timeout_s=30))
        assert 18 <= full.value.retry_after <= 22 and "ahead" in str(full.value)
        sched.submit(Job("m", SampleRequest(n=1, steps=50, prompts=["c"], seed=7), timeout_s=30))  # 5 s fits
        gate.set()
        wait_all([first, *queued])
    finally:
        gate.set()
        sched.close()


def test_a_controlled_request_is_estimated_with_its_controlnet_passes(ldm):
    """Each ControlNet adds a pass over the request's images on the steps of its window, at its share of the U-Net's
    parameters (about the encoder half); one with scale 0 steers nothing and costs nothing."""
    net = ControlNet.from_unet(ldm.unet, ldm.factor)
    share = sum(p.numel() for p in net.parameters()) / sum(p.numel() for p in ldm.unet.parameters())
    assert 0.2 < share < 0.8
    req = SampleRequest(n=2, steps=10, prompts=["a"], cfg=3.0)
    sched = Scheduler({"m": ldm}, max_wait_ms=0)
    try:
        sched.costs["m"].add(1.0, 1.0)  # one second per unit a step: every request below is refused with its estimate

        def refused(*controls):
            with pytest.raises(TooCostly) as err:
                sched.submit(Job("m", req, controls=controls, timeout_s=1.0))
            return err.value

        plain = refused()
        half = refused(Control(net, end=0.5))  # steps 0-4 of 10
        three = refused(Control(net), Control(net, start=0.2, end=0.5), Control(net, scale=0.0))  # 10 + 3 + 0 steps
    finally:
        sched.close()
    assert half.estimate_s == pytest.approx(plain.estimate_s * (1 + share * 0.5), rel=1e-3)
    assert three.estimate_s == pytest.approx(plain.estimate_s * (1 + share * 1.3), rel=1e-3)
    assert "3 ControlNets" in str(three) and "ControlNet" not in str(plain)


def test_the_warm_up_gives_an_estimate_before_the_first_request(ldm):
    sched = Scheduler({"m": ldm}, max_batch=4, max_wait_ms=0, warmup=True)
    try:
        job = sched.submit(Job("m", SampleRequest(n=1, steps=2, prompts=["a"])))
        wait_all([job])
        a, b = sched.costs["m"].fit()
        assert b > 0 and a >= 0
        assert len(sched.costs["m"].anchors) == 2
        assert sched.estimate(Job("m", SampleRequest(n=4, steps=20), units=units_per_step(ldm, SampleRequest(n=4)))) > 0
    finally:
        sched.close()


# --- fairness -------------------------------------------------------------------------------------------------------
def test_keys_take_turns_when_they_queue(ldm, monkeypatch):
    order: list = []
    gate = gate_pipeline(monkeypatch, order)
    sched = Scheduler({"m": ldm}, max_batch=1, max_wait_ms=0)
    try:
        first = sched.submit(Job("m", SampleRequest(n=1, steps=2, seed=1), owner="g"))
        running(first)
        jobs = [sched.submit(Job("m", SampleRequest(n=1, steps=2, seed=s), owner="a")) for s in (11, 12, 13)]
        jobs += [sched.submit(Job("m", SampleRequest(n=1, steps=2, seed=s), owner="b")) for s in (21, 22)]
        gate.set()
        wait_all([first, *jobs])
        assert order == [[1], [11], [21], [12], [22], [13]]
    finally:
        gate.set()
        sched.close()


def test_a_shared_batch_takes_its_company_one_key_at_a_time(ldm, monkeypatch):
    order: list = []
    gate = gate_pipeline(monkeypatch, order)
    sched = Scheduler({"m": ldm}, max_batch=2, max_wait_ms=0)
    try:
        first = sched.submit(Job("m", SampleRequest(n=1, steps=5, seed=1), owner="g"))
        running(first)
        same = dict(n=1, steps=2, prompts=["x"])
        jobs = [sched.submit(Job("m", SampleRequest(**same, seed=s), owner="a")) for s in (11, 12, 13)]
        jobs.append(sched.submit(Job("m", SampleRequest(**same, seed=21), owner="b")))
        gate.set()
        wait_all([first, *jobs])
        assert order == [[1], [11, 21], [12, 13]]  # b's one job shares a's first batch instead of waiting behind
    finally:
        gate.set()
        sched.close()
