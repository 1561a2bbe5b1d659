"""The HTTP surface of `ldmkit serve` under a hostile or careless client: every number finite before any work,
fields named as sent, one error shape with the request id for every failure (an unwritable database included),
models listed with their routes, and the page's security headers."""

from __future__ import annotations

import json

import pytest

from ldmkit.serve.audit import Audit
from ldmkit.serve.auth import Keys
from ldmkit.serve.store import open_store
from tests.serve_helpers import LiveServer


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    db = tmp_path_factory.mktemp("surface") / "ldmkit.db"
    server = LiveServer(db, models=("emoji", "fashion-mnist-inpaint"), limits={"max_n": 2, "max_steps": 4})
    keys = Keys(open_store(str(db)))
    server.key = keys.create("surface-user", "user")[0]
    server.admin = keys.create("surface-admin", "admin")[0]
    server.db = db
    yield server
    server.close()


def rows(live) -> list[dict]:
    return Audit(open_store(str(live.db))).tail(1000)


def error_of(r) -> dict:
    body = r.json()
    assert r.headers["x-request-id"] and body["detail"] == body["error"]["message"], r.text
    return body["error"]


BIG = b"1e309"  # reads as infinity in Python's JSON parser


@pytest.mark.parametrize(
    "route, body, field",
    [
        ("/sdapi/v1/txt2img", b'{"prompt": "a", "steps": 2, "foo": ' + BIG + b"}", "foo"),
        (
            "/sdapi/v1/txt2img",
            b'{"prompt": "a", "steps": 2, "denoising_strength": -' + BIG + b"}",
            "denoising_strength",
        ),
        (
            "/sdapi/v1/txt2img",
            b'{"prompt": "a", "steps": 2, "override_settings": {"x": [1, ' + BIG + b"]}}",
            "override_settings.x.1",
        ),
        ("/v1/images/generations", b'{"prompt": "a", "steps": 2, "cfg": ' + BIG + b"}", "cfg"),
    ],
)
def test_a_non_finite_number_anywhere_is_refused_before_any_work(live, route, body, field):
    images_before = live.service.metrics.images.labels("emoji")._value.get()
    with live.client(live.key) as c:
        r = c.post(route, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["param"] == field and "finite" in err["message"]
    assert live.service.metrics.images.labels("emoji")._value.get() == images_before  # nothing was generated
    row = next(x for x in rows(live) if x["request_id"] == r.headers["x-request-id"])
    assert row["decision"] == "refused-validation"


def test_a_deeply_nested_extra_is_refused_before_any_work(live):
    nested = "[" * 200 + "]" * 200
    with live.client(live.key) as c:
        r = c.post(
            "/sdapi/v1/txt2img",
            content=f'{{"prompt": "a", "steps": 2, "deep": {nested}}}'.encode(),
            headers={"content-type": "application/json"},
        )
    assert r.status_code == 400 and error_of(r)["param"].startswith("deep")


@pytest.mark.parametrize(
    "route, body, field",
    [
        ("/sdapi/v1/txt2img", {"prompt": "a", "steps": 2, "width": 33}, "width"),
        ("/v1/jobs", {"prompt": "a", "steps": 2, "height": 60}, "height"),
        ("/v1/images/generations", {"prompt": "a", "steps": 2, "size": "64x33"}, "size"),
        ("/v1/images/generations", {"prompt": "a", "steps": 2, "size": "0x0"}, "size"),
    ],
)
def test_a_refused_value_is_named_as_the_client_sent_it(live, route, body, field):
    with live.client(live.key) as c:
        r = c.post(route, json=body)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["param"] == field, err
    assert "--" not in err["message"], err  # no command-line option names


def test_invalid_utf8_is_named_as_such(live):
    with live.client(live.key) as c:
        r = c.post("/v1/jobs", content=b'{"prompt": "\xff"}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "UTF-8" in error_of(r)["message"]


def test_a_413_has_the_same_shape_with_or_without_content_length(live):
    with live.client(live.key) as c:
        sized = c.post("/v1/jobs", content=b" " * 9_000_000, headers={"content-type": "application/json"})
        chunked = c.post("/v1/jobs", content=iter([b" " * 1_000_000] * 9), headers={"content-type": "application/json"})
    for r in (sized, chunked):
        assert r.status_code == 413
        assert error_of(r)["code"] == "body_too_large"


def test_two_authorization_headers_are_refused(live):
    import httpx

    with httpx.Client(base_url=live.url) as c:
        r = c.get(
            "/v1/models",
            headers=[("Authorization", f"Bearer {live.key}"), ("Authorization", "Bearer ldk_x_y")],
        )
    assert r.status_code == 400 and error_of(r)["param"] == "authorization"
    assert any(x["request_id"] == r.headers["x-request-id"] for x in rows(live))


def test_models_list_their_routes_and_an_inpainting_model_is_refused_for_generation(live):
    with live.client(live.key) as c:
        listed = {m["id"]: m["routes"] for m in c.get("/v1/models").json()["data"]}
        assert "/v1/images/generations" in listed["emoji"] and "/v1/jobs" in listed["emoji"]
        assert listed["fashion-mnist-inpaint"] == ["/sdapi/v1/img2img"]
        for route, body in [
            ("/v1/jobs", {"model": "fashion-mnist-inpaint", "steps": 2}),
            ("/v1/images/generations", {"model": "fashion-mnist-inpaint", "steps": 2}),
            ("/sdapi/v1/txt2img", {"model": "fashion-mnist-inpaint", "steps": 2}),
        ]:
            r = c.post(route, json=body)
            assert r.status_code == 400, (route, r.text)
            err = error_of(r)
            message = err["message"]
            assert err["param"] == "model" and "emoji" in message and "/sdapi/v1/img2img" in message
            assert "ldmkit " not in message and str(live.service.models["fashion-mnist-inpaint"].path) not in message
            assert "/weights" not in message and ".safetensors" not in message


def test_the_page_and_its_files_carry_security_headers(live):
    with live.client() as c:
        for path in ("/", "/static/app.js", "/static/app.css"):
            r = c.get(path)
            assert r.status_code == 200, path
            csp = r.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
            assert "unsafe-inline" not in csp
            assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["referrer-policy"] == "no-referrer"
        page = c.get("/").text
        assert "<script>" not in page and "<style>" not in page and "unsafe-inline" not in page
        head = c.head("/")
        assert head.status_code == 200 and head.headers["content-type"].startswith("text/html") and not head.content
        assert c.get("/static/../app.py").status_code == 404


def test_an_unwritable_database_answers_in_the_error_shape_and_readyz_fails(live):
    with live.client(live.key) as c:
        assert c.get("/readyz").status_code == 200
        saved = _read_only(live)
        try:
            r = c.get("/v1/models")
            assert r.status_code == 500, r.text
            err = error_of(r)
            assert err["code"] == "audit_unavailable" and r.headers["x-request-id"] in err["message"]
            ready = c.get("/readyz")
            assert ready.status_code == 503 and "database" in ready.json()["status"]
            assert str(live.db) not in ready.text
        finally:
            _restore(saved)
        assert c.get("/readyz").status_code == 200
        assert c.get("/v1/models").status_code == 200
    assert live.service.metrics.audit_failures._value.get() >= 1


def _read_only(live):
    """Every connection of the server's store made read-only (as an unwritable WAL makes it), and new ones too."""
    stores = {id(s): s for s in (live.service.audit.store, live.service.keys.store)}
    saved = []
    for s in stores.values():
        saved.append((s, s._connect))
        original = s._connect

        def connect(original=original):
            conn = original()
            conn.execute("PRAGMA query_only = ON")
            return conn

        s._connect = connect
        for conn in list(s._conns.values()):
            conn.execute("PRAGMA query_only = ON")
    return saved


def _restore(saved):
    for s, connect in saved:
        s._connect = connect
        for conn in list(s._conns.values()):
            conn.execute("PRAGMA query_only = OFF")


def test_a_huge_whole_number_in_an_ignored_field_is_still_answered(live):
    # the answer echoes its parameters: a whole number past 64 bits is valid JSON both ways
    with live.client(live.key) as c:
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 1, "width": 32, "height": 32, "foo": 2**70})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["ignored"] == ["foo"] and r.json()["parameters"]["foo"] == 2**70


def test_an_error_shown_over_http_names_no_server_path_and_no_command():
    from pathlib import Path
    from types import SimpleNamespace

    from ldmkit.serve.health import scrub

    models = {"inpaint": SimpleNamespace(path=Path("/srv/weights/inpaint.safetensors"))}
    wrong = (
        "/srv/weights/inpaint.safetensors is an inpainting model (task inpaint: it needs an image and a mask), so "
        "`ldmkit generate` cannot use it; use `ldmkit inpaint` or `ldmkit outpaint`"
    )
    assert scrub(wrong, models) == "inpaint is an inpainting model (task inpaint: it needs an image and a mask)"
    retired = "template 't' was retired; no request may use it; `ldmkit prompts list` (GET /v1/prompts) shows more"
    assert scrub(retired, models) == "template 't' was retired; no request may use it"
    assert scrub("width 33 is not a multiple of 16; use 32 or 48", models).endswith("use 32 or 48")
