"""A careless or hostile client: 1,000 malformed requests, oversized bodies, disconnects, timeouts, a full queue."""

from __future__ import annotations

import json
import random
import resource
import time

import httpx
import pytest

from ldmkit.serve.audit import Audit
from ldmkit.serve.auth import Keys
from ldmkit.serve.store import open_store
from tests.serve_helpers import LiveServer, png_size

ROUTES = ["/v1/images/generations", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/jobs"]
NASTY = [
    None,
    True,
    -1,
    0,
    2**64,
    1e309,
    -1e309,
    float("nan"),
    "",
    "0",
    "NaN",
    "∞",
    "x" * 100_000,
    [],
    {},
    [1, 2],
    {"$gt": ""},
    "'; DROP TABLE audit; --",
    "../../../../etc/passwd",
    "..\\..\\weights\\emoji",
    "\x00\x01\x02",
    "\ud800",
    "🙂" * 3000,
    "<script>alert(1)</script>",
    "%s%s%s%n",
    "${jndi:ldap://x}",
    3.5,
    -0.0,
]
FIELDS = [
    "prompt",
    "n",
    "size",
    "steps",
    "cfg",
    "seed",
    "sampler",
    "model",
    "negative_prompt",
    "response_format",
    "cfg_scale",
    "batch_size",
    "n_iter",
    "width",
    "height",
    "sampler_name",
    "init_images",
    "mask",
    "denoising_strength",
    "labels",
    "user",
]


def hostile_bodies(rng: random.Random, count: int):
    """Bodies that are not JSON, not objects, of the wrong types, huge, or full of injection attempts."""
    for i in range(count):
        kind = i % 5
        if kind == 0:
            yield rng.choice([b"{", b"not json", b"\xff\xfe", b"[]", b"null", b'{"prompt": "a",}', b"{}" * 1000])
        elif kind == 1:
            yield json.dumps(rng.choice(NASTY), allow_nan=True).encode("utf-8", "surrogatepass")
        else:
            body = {"prompt": "a", "steps": 2}
            for _ in range(rng.randint(1, 4)):
                body[rng.choice(FIELDS)] = rng.choice(NASTY)
            yield json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    db = tmp_path_factory.mktemp("hostile") / "ldmkit.db"
    server = LiveServer(db, models=("emoji",), limits={"max_n": 2, "max_steps": 6, "max_upload_bytes": 200_000})
    server.key = Keys(open_store(str(db))).create("fuzz", "user")[0]
    server.db = db
    yield server
    server.close()


def test_a_thousand_hostile_requests_then_a_normal_one_succeeds(live):
    rng = random.Random(0)
    counts: dict[int, int] = {}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with live.client(live.key) as c:
        for i, body in enumerate(hostile_bodies(rng, 1000)):
            route = ROUTES[i % len(ROUTES)]
            if i % 97 == 0:
                route = rng.choice(["/v1/../../etc/passwd", "/sdapi/v1/%2e%2e/keys", "/v1/jobs/' OR 1=1 --"])
            r = c.post(route, content=body, headers={"content-type": "application/json"})
            counts[r.status_code] = counts.get(r.status_code, 0) + 1
            assert r.status_code < 500, (route, body[:200], r.status_code, r.text[:300])
            if r.status_code >= 400:
                assert "error" in r.json()
        rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        assert rss_growth_mb < 300, rss_growth_mb  # memory stays bounded
        ok = c.post("/v1/images/generations", json={"prompt": "red apple", "steps": 2, "size": "64x64"})
        assert ok.status_code == 200 and png_size(ok.json()["data"][0]["b64_json"]) == (64, 64)
    assert counts.get(400, 0) > 500 and len([s for s in counts if s >= 400]) >= 2, counts  # refused, in kinds
    audit = Audit(open_store(str(live.db)))
    assert audit.verify().ok
    assert any("DROP TABLE" in json.dumps(r) for r in audit.tail(2000))  # recorded as data, the table still there


def test_an_oversized_body_is_refused_before_it_is_read(live):
    with live.client(live.key) as c:
        r = c.post(
            "/sdapi/v1/img2img", content=b"{" + b" " * 300_000 + b"}", headers={"content-type": "application/json"}
        )
        assert r.status_code == 413 and "200000" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(40):
                yield b" " * 10_000

        r = c.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413


def test_a_client_that_disconnects_has_its_queued_work_dropped(live):
    svc = live.service
    with live.client(live.key) as c:
        blocker = c.post("/v1/jobs", json={"prompt": "slow", "steps": 6, "n": 2}).json()
        try:
            httpx.post(
                live.url + "/v1/images/generations",
                json={"prompt": "gone", "steps": 6, "n": 2, "seed": 123456},
                headers={"Authorization": f"Bearer {live.key}"},
                timeout=0.2,
            )
        except httpx.TimeoutException:
            pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rows = Audit(open_store(str(live.db))).tail(20)
            gone = [r for r in rows if (r["params"] or {}).get("seed") == 123456]
            if gone:
                break
            time.sleep(0.1)
        assert gone and gone[-1]["decision"] == "cancelled" and not gone[-1]["outputs"]
        assert c.get(f"/v1/jobs/{blocker['id']}").status_code == 200
    assert svc.scheduler.queued_images() == 0


def test_a_full_queue_answers_429_with_retry_after(tmp_path):
    server = LiveServer(tmp_path / "db", models=("emoji",), queue_images=2, max_batch=1, max_wait_ms=0)
    try:
        key = Keys(open_store(str(tmp_path / "db"))).create("q", "user")[0]
        with server.client(key) as c:
            codes = [c.post("/v1/jobs", json={"prompt": "a", "steps": 50, "n": 1}).status_code for _ in range(5)]
            assert codes[:3] == [202, 202, 202] and 429 in codes[3:]  # one runs, two wait, the rest are refused
            r = c.post("/v1/images/generations", json={"prompt": "a", "steps": 2})
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    finally:
        server.close()
