"""The server's promise, the same request gives the same image alone or batched: measured at start, reported at
start and in /readyz, and kept by batches of one where this CPU breaks it."""

import pytest

import ldmkit.serve.service as service
from tests.serve_helpers import LiveServer


@pytest.fixture
def server_with(tmp_path, monkeypatch):
    started = []

    def start(check=None):
        if check is not None:
            monkeypatch.setattr(service, "self_check", lambda: check)
        live = LiveServer(tmp_path / "s.db", no_auth=True, max_batch=8)
        started.append(live)
        return live

    yield start
    for live in started:
        live.close()


def test_readyz_reports_that_batch_invariance_holds_on_this_cpu(server_with):
    live = server_with()
    with live.client() as c:
        ready = c.get("/readyz").json()
    assert ready["batch_invariant"]["holds"] is True
    assert ready["batch_invariant"]["devices"] == ["cpu"] and ready["batch_invariant"]["threads"] >= 1
    assert live.service.scheduler.max_batch == 8


def test_where_the_self_check_fails_the_server_says_so_and_batches_each_request_alone(server_with):
    failed = {"holds": False, "threads": 2, "caps": {}, "failures": ["image 1 of a batch of 3"]}
    live = server_with(failed)
    with live.client() as c:
        ready = c.get("/readyz")
    assert ready.status_code == 200
    inv = ready.json()["batch_invariant"]
    assert inv["holds"] is False and "image 1 of a batch of 3" in inv["reason"] and "batch of its own" in inv["reason"]
    assert live.service.scheduler.max_batch == 1
