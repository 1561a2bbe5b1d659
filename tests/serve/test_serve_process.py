"""`ldmkit serve` as a process: kill -9 under load loses no audit row of an answered request; SIGTERM drains."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import httpx

from ldmkit.serve.audit import Audit
from ldmkit.serve.auth import Keys
from ldmkit.serve.store import open_store
from tests.serve_helpers import ROOT, free_port, kill_under_load, start_process


def test_kill_9_under_load_loses_no_audit_row_of_an_answered_request(tmp_path):
    db, port = tmp_path / "ldmkit.db", free_port()
    key = Keys(open_store(str(db))).create("load", "user")[0]
    proc = start_process(db, port, "--model", "emoji", log=tmp_path / "serve.log")
    answered = kill_under_load(
        proc,
        f"http://127.0.0.1:{port}",
        key,
        4,
        lambda c, i: {"prompt": f"p{c}", "steps": 2, "seed": i},
        ready=lambda answered: len(answered) >= 8,
    )
    audit = Audit(open_store(str(db)))
    rows = {r["request_id"]: r for r in audit.tail(10_000)}
    assert len(answered) >= 8
    assert [a for a in answered if a not in rows] == []
    assert all(rows[a]["decision"] == "served" and rows[a]["outputs"] for a in answered)
    assert audit.verify().ok
    log = (tmp_path / "serve.log").read_text()
    assert "POST /v1/images/generations" in log and key not in log and key.split("_")[-1] not in log


def test_sigterm_finishes_accepted_work_refuses_new_work_and_exits(tmp_path):
    db, port = tmp_path / "ldmkit.db", free_port()
    key = Keys(open_store(str(db))).create("drain", "user")[0]
    proc = start_process(db, port, "--model", "emoji", "--set", "serve.max_batch=1", log=tmp_path / "serve.log")
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    results = {}

    def slow():
        body = {"prompt": "slow", "steps": 40, "n": 2}
        results["slow"] = httpx.post(url + "/v1/images/generations", json=body, headers=headers, timeout=120)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(1.0)  # the slow request is running
    with httpx.Client(base_url=url, headers=headers) as keepalive:  # an open connection: it gets an answer
        assert keepalive.get("/v1/models").status_code == 200
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:
            late = keepalive.post("/v1/images/generations", json={"prompt": "late", "steps": 2}, timeout=10)
            assert late.status_code == 503
        except httpx.TransportError:
            pass  # or the listener is already closed: either way no new work is taken
    t.join(120)
    assert results["slow"].status_code == 200 and len(results["slow"].json()["data"]) == 2
    assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn exits by the signal it caught, after the drain
    assert Audit(open_store(str(db))).verify().ok


def test_no_auth_is_refused_off_loopback(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ldmkit.cli",
            "serve",
            "--no-auth",
            "--host",
            "0.0.0.0",
            "--database",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 2 and "loopback" in out.stderr and "keys create" in out.stderr
