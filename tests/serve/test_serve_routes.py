"""Every route of the server checks the caller's key, except the few that are public by design: each carries the
dependency `require(role)` (deps.py), with the role it needs; and, asked without a key, each answers 401 before
looking at anything else."""

from __future__ import annotations

import re

import pytest

from ldmkit.config import ServeConfig, ServeRun
from ldmkit.serve.auth import Keys
from ldmkit.serve.deps import role_of
from ldmkit.serve.store import open_store

PUBLIC = {"/healthz", "/readyz", "/", "/static/{name}"}  # probes, the page and its files: no data behind them
# prompt_routes.py checks the key inside each of its routes (svc.authorize) until it becomes a router with the
# dependency; the live test below holds that these answer 401 without a key like every other route
CHECKED_INSIDE = {"/v1/prompts", "/v1/prompts/{ref}", "/v1/prompts/{name}/retire"}
ROLE = {
    ("GET", "/v1/models"): "viewer",
    ("POST", "/v1/images/generations"): "user",
    ("POST", "/sdapi/v1/txt2img"): "user",
    ("POST", "/sdapi/v1/img2img"): "user",
    ("GET", "/sdapi/v1/sd-models"): "viewer",
    ("GET", "/sdapi/v1/samplers"): "viewer",
    ("POST", "/v1/jobs"): "user",
    ("GET", "/v1/jobs"): "viewer",
    ("GET", "/v1/jobs/{job_id}"): "viewer",
    ("DELETE", "/v1/jobs/{job_id}"): "user",
    ("POST", "/v1/videos"): "user",
    ("GET", "/v1/videos"): "viewer",
    ("GET", "/v1/videos/{video_id}"): "viewer",
    ("GET", "/v1/videos/{video_id}/content"): "viewer",
    ("DELETE", "/v1/videos/{video_id}"): "user",
    ("GET", "/v1/keys"): "admin",
    ("GET", "/v1/audit"): "admin",
    ("GET", "/v1/audit/verify"): "admin",
    ("GET", "/metrics"): "admin",
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app with no model (every route is there all the same), a viewer's key, and the FastAPI app inside."""
    from ldmkit.serve.app import create_app

    db = str(tmp_path_factory.mktemp("routes") / "serve.db")
    store = open_store(db)
    viewer, _ = Keys(store).create("reader", "viewer")
    wrapped, service = create_app(ServeRun(serve=ServeConfig(database=db, monitor_window=0)), {}, store)
    yield wrapped, wrapped.app, viewer
    service.close(timeout=10)
    store.close()


def api_routes(routes) -> list:
    """The APIRoutes among `routes`, those of the routers included in them too (FastAPI may keep a router whole)."""
    from fastapi.routing import APIRoute

    found = []
    for route in routes:
        if isinstance(route, APIRoute):
            found.append(route)
        elif hasattr(route, "original_router"):
            found += api_routes(route.original_router.routes)
    return found


def roles(dependant) -> set[str]:
    """The roles the `require` dependencies of a route (or of its dependencies, at any depth) check."""
    found = {role_of(dependant.call)} - {None}
    for sub in dependant.dependencies:
        found |= roles(sub)
    return found


def unguarded(routes) -> list[str]:
    """The routes neither public nor carrying a `require` dependency."""
    exempt = PUBLIC | CHECKED_INSIDE
    return [
        f"{sorted(r.methods)} {r.path}" for r in api_routes(routes) if r.path not in exempt and not roles(r.dependant)
    ]


def test_every_route_but_the_public_ones_requires_a_key_of_its_role(served):
    _, app, _ = served
    assert unguarded(app.routes) == []
    seen = {}
    for route in api_routes(app.routes):
        for method in route.methods - {"HEAD"}:
            if (method, route.path) in ROLE:
                seen[method, route.path] = roles(route.dependant)
    assert seen == {k: {role} for k, role in ROLE.items()}, "a route lost its dependency or changed its role"


def test_a_route_added_without_the_dependency_is_caught(served):
    from fastapi import FastAPI

    other = FastAPI()

    @other.get("/v1/forgotten")
    async def forgotten():
        return {}

    assert unguarded([*served[1].routes, *other.routes]) == ["['GET'] /v1/forgotten"]


def test_without_a_key_every_guarded_route_answers_401_and_a_viewer_key_gets_403_above_its_role(served):
    from fastapi.testclient import TestClient

    wrapped, app, viewer = served
    checked = 0
    with TestClient(wrapped) as client:
        for route in api_routes(app.routes):
            if route.path in PUBLIC:
                continue
            path = re.sub(r"\{[^}]+\}", "x", route.path)
            for method in sorted(route.methods - {"HEAD"}):
                r = client.request(method, path, content=b"{}")
                assert r.status_code == 401, (method, route.path, r.text)
                assert r.json()["error"]["code"] == "missing_key"
                if ROLE.get((method, route.path), "viewer") != "viewer":
                    r = client.request(method, path, content=b"{}", headers={"Authorization": f"Bearer {viewer}"})
                    assert r.status_code == 403, (method, route.path, r.text)
                checked += 1
    assert checked >= len(ROLE) + 4  # the prompt routes too
