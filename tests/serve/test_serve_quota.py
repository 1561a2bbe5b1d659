"""Daily image quotas reserved and settled in the database: a served request keeps its charge, a failed one gives it
back once, and the reservations of a process that died unanswered (kill -9) are given back at the next start. On
SQLite and, where its server programs are installed, PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from ldmkit.serve import quota
from ldmkit.serve.auth import Keys, Reservation
from ldmkit.serve.store import open_store
from tests.serve.test_serve_postgres import postgres, url  # noqa: F401 (fixtures)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> str:
    return str(tmp_path / "k.db") if request.param == "sqlite" else request.getfixturevalue("url")


def used(keys: Keys) -> dict[str, int]:
    return {k["name"]: k["images_today"] for k in keys.list()}


def reserve_and_die(database: str, name: str, n: int) -> None:
    """A process that reserves `n` images of key `name` and is killed (SIGKILL) before it settles them."""
    code = textwrap.dedent(
        f"""
        import os, signal
        from ldmkit.serve.auth import Keys
        from ldmkit.serve.store import open_store
        keys = Keys(open_store({database!r}))
        who = [k for k in keys.list() if k["name"] == {name!r}][0]
        from ldmkit.serve.auth import Principal
        keys.reserve_images(Principal(who["id"], {name!r}, "user", who["images_per_day"], None), {n})
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr


def test_settled_images_stay_charged_and_released_ones_come_back_once(database):
    with open_store(database) as store:
        keys = Keys(store)
        _, who = keys.create("alice", "user", images_per_day=5)
        served = keys.reserve_images(who, 2)
        failed = keys.reserve_images(who, 3)
        assert isinstance(served, Reservation) and used(keys) == {"alice": 5}
        keys.settle(served)
        assert keys.release(failed) and not keys.release(failed)  # a second release gives nothing back
        assert used(keys) == {"alice": 2}
        assert keys.reconcile() == 0 and used(keys) == {"alice": 2}  # nothing is open
        keys.settle(served)  # settling twice charges nothing more
        assert used(keys) == {"alice": 2}


def test_reservations_of_a_killed_process_are_given_back_at_start(database):
    with open_store(database) as store:
        keys = Keys(store)
        _, who = keys.create("alice", "user", images_per_day=10)
        mine = keys.reserve_images(who, 1)  # a live request of this process
        reserve_and_die(database, "alice", 3)
        assert used(keys) == {"alice": 4}  # charged, never answered
        with open_store(database) as fresh:  # a server starting on the same database
            assert Keys(fresh).reconcile() == 1
        assert used(keys) == {"alice": 1}  # this process's open reservation was left alone
        keys.settle(mine)
        assert used(keys) == {"alice": 1}


def test_an_expired_reservation_of_another_machine_is_given_back(database, monkeypatch):
    with open_store(database) as store:
        keys = Keys(store)
        _, who = keys.create("alice", "user")
        monkeypatch.setattr(quota, "HOST", "replica-b")  # reserved by a process of another machine
        fresh = keys.reserve_images(who, 2, hold_s=600)
        stale = keys.reserve_images(who, 3, hold_s=-1)
        monkeypatch.setattr(quota, "HOST", "replica-a")
        assert keys.reconcile() == 1 and used(keys) == {"alice": 2}  # its liveness is unknown: only the expired
        assert not keys.release(stale)
        keys.settle(fresh)
        assert used(keys) == {"alice": 2}


def test_settling_a_reservation_given_back_by_mistake_charges_it_again(database):
    with open_store(database) as store:
        keys = Keys(store)
        _, who = keys.create("alice", "user")
        res = keys.reserve_images(who, 3, hold_s=-1)  # expired while its request still ran
        assert Keys(store).reconcile() == 1 and used(keys) == {"alice": 0}
        keys.settle(res)  # the images were served after all
        assert used(keys) == {"alice": 3}


def test_the_server_gives_back_dead_reservations_when_it_starts(tmp_path):
    from ldmkit.config import ServeConfig, ServeRun
    from ldmkit.serve.app import create_app

    db = str(tmp_path / "ldmkit.db")
    with open_store(db) as store:
        keys = Keys(store)
        keys.create("alice", "user", images_per_day=10)
        reserve_and_die(db, "alice", 4)
        assert used(keys) == {"alice": 4}
        run = ServeRun(serve=ServeConfig(database=db, monitor_window=0))
        _, svc = create_app(run, {}, store)
        svc.close(timeout=5)
        assert used(keys) == {"alice": 0}


# --- through the server ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from tests.serve_helpers import LiveServer

    db = tmp_path_factory.mktemp("quota") / "ldmkit.db"
    server = LiveServer(db, models=("emoji",), watermark=False, timeout_s=10)
    server.keys = Keys(open_store(str(db)))
    yield server
    server.close()


def ask(live, name: str, **body):
    secret, _ = live.keys.create(name, "user", images_per_day=10)
    body = {"prompt": "red apple", "n": 2, "steps": 2, "size": "64x64", **body}
    with live.client(secret) as c:
        return c.post("/v1/images/generations", json=body)


def still_open(live) -> int:
    return live.keys.store.query("SELECT COUNT(*) AS n FROM reservations WHERE returned IS NULL")[0]["n"]


def test_a_served_request_keeps_its_images_counted(live):
    assert ask(live, "served").status_code == 200
    assert used(live.keys)["served"] == 2 and still_open(live) == 0


def test_a_request_that_fails_after_the_work_gives_its_images_back(live, monkeypatch):
    from ldmkit.governance.credentials import CredentialsError

    def expired(data, meta):
        raise CredentialsError("the signing certificate expired")

    monkeypatch.setattr(live.service, "sign", expired)  # fails while making the PNGs, after the sampling
    r = ask(live, "unsigned")
    assert r.status_code == 503
    assert used(live.keys)["unsigned"] == 0 and still_open(live) == 0


def test_a_request_whose_answer_fails_gives_its_images_back(live, monkeypatch):
    from ldmkit.serve import service

    def broken(self):
        raise RuntimeError("the answer could not be built")

    monkeypatch.setattr(service.Output, "b64", broken)  # the images were made and settled; the answer fails
    r = ask(live, "unanswered")
    assert r.status_code == 500
    assert used(live.keys)["unanswered"] == 0 and still_open(live) == 0


def test_a_request_refused_for_its_cost_counts_no_images(live):
    r = ask(live, "costly", n=8, steps=100, size="512x512")  # far more than the 10 s this server allows
    assert r.status_code in (413, 429, 504), r.text  # refused at once by its estimate (or timed out)
    assert used(live.keys)["costly"] == 0 and still_open(live) == 0


@pytest.mark.slow
def test_a_request_that_times_out_gives_its_images_back(live, monkeypatch):
    if hasattr(live.service.scheduler, "estimate"):  # admit it whatever it is estimated to cost
        monkeypatch.setattr(live.service.scheduler, "estimate", lambda job: None)
    r = ask(live, "late", n=8, steps=100)  # about 12 s of work on two cores; the server allows 10
    assert r.status_code == 504, r.text
    assert used(live.keys)["late"] == 0 and still_open(live) == 0


@pytest.mark.slow
def test_kill_9_under_load_leaves_only_served_images_counted_after_a_restart(tmp_path):
    from ldmkit.config import ServeConfig, ServeRun
    from ldmkit.serve.app import create_app
    from ldmkit.serve.audit import Audit
    from tests.serve_helpers import free_port, kill_under_load, start_process

    db, port = str(tmp_path / "ldmkit.db"), free_port()
    keys = Keys(open_store(db))
    secret, who = keys.create("load", "user")
    proc = start_process(db, port, "--model", "emoji")
    body = lambda c, i: {"prompt": f"p{c}", "steps": 2, "seed": i, "n": 1}  # noqa: E731
    kill_under_load(proc, f"http://127.0.0.1:{port}", secret, 4, body, ready=lambda answered: len(answered) >= 6)
    served = [r for r in Audit(keys.store).tail(10_000) if r["key_id"] == who.key_id and r["decision"] == "served"]
    assert used(keys)["load"] >= len(served) >= 6
    _, svc = create_app(ServeRun(serve=ServeConfig(database=db, monitor_window=0)), {}, keys.store)  # a restart
    svc.close(timeout=5)
    assert used(keys)["load"] == len(served)  # each image counted was served, and each served one counted
