"""Admission through HTTP: a request too large for the server's limits is refused at once with 413, naming the
estimate or the pixel limit, instead of running until it times out and holding the worker afterwards."""

import time

import pytest

from tests.serve_helpers import LiveServer


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = LiveServer(tmp_path_factory.mktemp("admission") / "ldmkit.db", no_auth=True, timeout_s=1.0)
    deadline = time.monotonic() + 120
    while server.service.scheduler.costs["emoji"].fit() is None:  # the warm-up measures the model
        assert time.monotonic() < deadline, "the warm-up never measured the model"
        time.sleep(0.05)
    yield server
    server.close()


def test_a_request_that_cannot_finish_in_time_gets_413_with_its_estimate_at_once(live):
    c = live.client()
    r = c.post("/v1/images/generations", json={"prompt": "dog", "n": 8, "steps": 100, "model": "emoji"})
    assert r.status_code == 413, r.text
    message = r.json()["error"]["message"]
    assert "would take about" in message and "1 s limit" in message and "fewer" in message
    r = c.post("/v1/jobs", json={"prompt": "dog", "n": 8, "steps": 100, "model": "emoji"})  # native jobs too
    assert r.status_code == 413, r.text
    assert live.service.scheduler.queued_images() == 0


def test_an_image_over_max_pixels_gets_413_naming_the_limit(live):
    r = live.client().post("/v1/images/generations", json={"prompt": "dog", "size": "1024x1024", "steps": 1})
    assert r.status_code == 413, r.text
    assert "1048576 pixels" in r.json()["error"]["message"] and "262144" in r.json()["error"]["message"]
