"""Prompt templates over HTTP: admins manage them, requests name template@version, the audit row records it."""

from __future__ import annotations

import json

import pytest

from ldmkit.serve.audit import Audit
from ldmkit.serve.auth import Keys
from ldmkit.serve.store import open_store
from tests.serve_helpers import LiveServer

STEPS = 2


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    db = tmp_path_factory.mktemp("templates") / "ldmkit.db"
    server = LiveServer(db, models=("emoji",), max_wait_ms=0, monitor_window=0)
    keys = Keys(open_store(str(db)))
    server.keys = {role: keys.create(f"{role}-key", role)[0] for role in ("viewer", "user", "admin")}
    server.db = db
    yield server
    server.close()


def last_row(live) -> dict:
    return Audit(open_store(str(live.db))).tail(1)[0]


def test_admins_manage_templates_and_others_only_read(live):
    admin, user, viewer = (live.client(live.keys[r]) for r in ("admin", "user", "viewer"))
    body = {"name": "fruit", "text": "a {fruit} emoji", "params": {"steps": STEPS, "cfg": 4}}
    assert user.post("/v1/prompts", json=body).status_code == 403
    r = admin.post("/v1/prompts", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["ref"] == "fruit@1" and r.json()["variables"] == ["fruit"]
    assert last_row(live)["reason"] == "added prompt template fruit@1"
    assert admin.post("/v1/prompts", json=body | {"text": "a {fruit}, flat"}).json()["version"] == 2
    listed = viewer.get("/v1/prompts").json()["data"]
    assert [t["ref"] for t in listed if t["name"] == "fruit"] == ["fruit@2"]
    shown = viewer.get("/v1/prompts/fruit").json()
    assert shown["newest"] == 2 and [v["text"] for v in shown["versions"]] == ["a {fruit} emoji", "a {fruit}, flat"]
    assert viewer.get("/v1/prompts/fruit@1").json()["text"] == "a {fruit} emoji"
    missing = viewer.get("/v1/prompts/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "template_missing"
    bad = admin.post("/v1/prompts", json={"name": "evil", "text": "{0.__class__}"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "template"


def test_a_request_names_a_template_and_the_audit_row_records_it(live):
    admin, user = live.client(live.keys["admin"]), live.client(live.keys["user"])
    admin.post("/v1/prompts", json={"name": "product", "text": "a {thing} on white", "params": {"steps": STEPS}})
    r = user.post(
        "/v1/images/generations", json={"template": "product@1", "variables": {"thing": "red apple"}, "seed": 5}
    )
    assert r.status_code == 200, r.text
    row = last_row(live)
    assert row["params"]["template"] == "product@1" and row["params"]["variables"] == {"thing": "red apple"}
    assert row["params"]["prompts"] == ["a red apple on white"] and row["params"]["steps"] == STEPS
    # the request's own fields win over the template's defaults; a native job takes templates too
    r = user.post("/v1/jobs", json={"template": "product", "variables": {"thing": "pear"}, "steps": 1})
    assert r.status_code == 202, r.text
    params = user.get(f"/v1/jobs/{r.json()['id']}").json()["params"]
    assert params["steps"] == 1 and params["prompts"] == ["a pear on white"] and params["template"] == "product@1"


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"template": "product@1"}, "missing"),  # no variables
        ({"template": "product@1", "variables": {"thing": "x", "other": "y"}}, "other"),
        ({"template": "product@9", "variables": {"thing": "x"}}, "versions"),
        ({"template": "product@1", "variables": {"thing": "x"}, "prompt": "a cat"}, "not both"),
        ({"prompt": "a cat", "variables": {"thing": "x"}}, "give template too"),
        ({"template": "product@1", "variables": {"thing": "a\nb"}}, "control"),
    ],
)
def test_bad_template_requests_get_400(live, body, fragment):
    admin, user = live.client(live.keys["admin"]), live.client(live.keys["user"])
    admin.post("/v1/prompts", json={"name": "product", "text": "a {thing} on white", "params": {"steps": STEPS}})
    r = user.post("/v1/images/generations", json=body)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"]


def test_a_retired_template_serves_no_request_but_stays_readable(live):
    admin, user = live.client(live.keys["admin"]), live.client(live.keys["user"])
    admin.post("/v1/prompts", json={"name": "old", "text": "an {x}"})
    assert user.post("/v1/prompts/old/retire").status_code == 403
    assert admin.post("/v1/prompts/old/retire").json()["retired"]
    r = user.post("/v1/images/generations", json={"template": "old", "variables": {"x": "apple"}, "steps": STEPS})
    assert r.status_code == 400 and "retired" in r.json()["error"]["message"]
    assert user.get("/v1/prompts/old@1").json()["text"] == "an {x}"
    assert "old" not in [t["name"] for t in user.get("/v1/prompts").json()["data"]]
    assert "old" in [t["name"] for t in user.get("/v1/prompts", params={"retired": "true"}).json()["data"]]


def test_the_policy_judges_the_filled_in_prompt(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text('[[rule]]\nid = "no-weapons"\nterms = ["gun"]\nmessage = "no weapons"\n')
    db = tmp_path / "db.sqlite"
    server = LiveServer(db, models=("emoji",), policy=str(policy), monitor_window=0)
    try:
        keys = Keys(open_store(str(db)))
        admin, user = (server.client(keys.create(f"{r}-k", r)[0]) for r in ("admin", "user"))
        admin.post("/v1/prompts", json={"name": "toy", "text": "a toy {thing}"})
        r = user.post("/v1/images/generations", json={"template": "toy", "variables": {"thing": "g u n"}})
        assert r.status_code == 400 and r.json()["error"]["code"] == "policy_violation"
        row = Audit(open_store(str(db))).tail(1)[0]
        assert row["decision"] == "refused-policy" and json.dumps(row["params"]).find("a toy g u n") > 0
    finally:
        server.close()


def test_the_automatic1111_api_takes_a_template_too(live):
    admin, user = live.client(live.keys["admin"]), live.client(live.keys["user"])
    admin.post("/v1/prompts", json={"name": "sticker", "text": "a {thing} sticker", "params": {"steps": STEPS}})
    r = user.post("/sdapi/v1/txt2img", json={"template": "sticker", "variables": {"thing": "pear"}, "seed": 2})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["prompt"] == "a pear sticker" and info["steps"] == STEPS and "template" not in info["ignored"]
    row = last_row(live)
    assert row["params"]["template"] == "sticker@1" and row["params"]["variables"] == {"thing": "pear"}
    both = user.post("/sdapi/v1/txt2img", json={"template": "sticker", "prompt": "x", "variables": {"thing": "y"}})
    assert both.status_code == 400 and both.json()["error"]["param"] == "template"
