"""Keys under attack: wrong secrets for a known key id are verified off the event loop on a bounded pool, failed
attempts are limited per key id and per client address (429, audited), successes are remembered for a short time,
and refused requests record the key that was presented."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from ldmkit.config import ServeConfig, ServeRun
from ldmkit.serve import auth
from ldmkit.serve.audit import Audit
from ldmkit.serve.auth import AuthError, Keys
from ldmkit.serve.store import open_store
from tests.serve_helpers import free_port


class AuthServer:
    """The app with no model (keys, audit and the key-checked routes only) on uvicorn in a background thread."""

    def __init__(self, db):
        import uvicorn

        from ldmkit.serve.app import create_app

        self.port = free_port()
        run = ServeRun(serve=ServeConfig(database=str(db), port=self.port, monitor_window=0))
        self.store = open_store(str(db))
        self.app, self.service = create_app(run, {}, self.store)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the test server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.service.close(timeout=5)


@pytest.fixture
def server(tmp_path):
    s = AuthServer(tmp_path / "ldmkit.db")
    yield s
    s.close()


def wrong(secret: str) -> str:
    """The key with its last character changed: the right key id, a wrong secret."""
    return secret[:-1] + ("A" if secret[-1] != "A" else "B")


def slow_scrypt(monkeypatch, seconds: float, seen: list | None = None):
    """Make every scrypt verification take `seconds` more (time.sleep holds its thread, as scrypt does)."""
    real = auth._scrypt

    def scrypt(*args):
        if seen is not None:
            seen.append(threading.current_thread().name)
        time.sleep(seconds)
        return real(*args)

    monkeypatch.setattr(auth, "_scrypt", scrypt)


def refused(fn, *args, **kwargs) -> AuthError:
    with pytest.raises(AuthError) as info:
        fn(*args, **kwargs)
    return info.value


# --- the event loop stays free -----------------------------------------------------------------------------------
def test_wrong_secrets_for_a_known_key_do_not_stall_the_event_loop(server, monkeypatch):
    secret, _ = Keys(server.store).create("alice", "viewer")
    slow_scrypt(monkeypatch, 0.6)
    statuses = []

    def attack():
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {wrong(secret)}"}) as c:
            statuses.append(c.get("/v1/models", timeout=60).status_code)

    threads = [threading.Thread(target=attack) for _ in range(3)]
    for t in threads:
        t.start()
    health = []
    with httpx.Client(base_url=server.url) as c:
        while any(t.is_alive() for t in threads):
            started = time.perf_counter()
            assert c.get("/healthz", timeout=60).status_code == 200
            health.append(time.perf_counter() - started)
            time.sleep(0.02)
    for t in threads:
        t.join()
    assert sorted(statuses) == [401, 401, 401]
    assert len(health) >= 5 and max(health) < 0.5, health  # each verification held its thread 0.6 s


def test_verifications_run_on_a_bounded_pool_and_refuse_a_long_wait(tmp_path, monkeypatch):
    with open_store(str(tmp_path / "k.db")) as store:
        keys = Keys(store)
        secret, _ = keys.create("alice", "user")
        threads: list[str] = []
        slow_scrypt(monkeypatch, 0.2, threads)
        monkeypatch.setattr(auth, "VERIFY_WAITING", 4)

        async def attempts():
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)

            tick = asyncio.ensure_future(ticker())
            tries = [keys.authenticate_async(f"Bearer {wrong(secret)}", f"10.0.0.{i}") for i in range(6)]
            results = await asyncio.gather(*tries, return_exceptions=True)
            tick.cancel()
            return results, ticks

        results, ticks = asyncio.run(attempts())
        reasons = sorted(r.reason for r in results)
        assert reasons == ["bad key"] * 4 + ["busy"] * 2  # two found four verifications already waiting
        busy = [r for r in results if r.reason == "busy"]
        assert all(r.status == 429 and r.retry_after >= 1 for r in busy)
        assert len(threads) == 4 and len(set(threads)) <= auth.VERIFY_THREADS
        assert all(name.startswith("ldmkit-verify") for name in threads)
        assert ticks >= 10  # the loop ran while the verifications did
        assert keys.authenticate(f"Bearer {secret}", "10.0.0.9").name == "alice"  # the busy ones were no failures


@pytest.fixture
def counted(monkeypatch):
    """(clock, calls): auth's monotonic clock set by clock[0], and one entry in calls per scrypt verification."""
    clock, calls = [1000.0], []
    monkeypatch.setattr(auth.time, "monotonic", lambda: clock[0])
    real = auth._scrypt
    monkeypatch.setattr(auth, "_scrypt", lambda *a: calls.append(1) or real(*a))
    return clock, calls


# --- failed attempts are limited ----------------------------------------------------------------------------------
def test_failed_attempts_are_limited_per_key_id(tmp_path, counted):
    clock, calls = counted
    with open_store(str(tmp_path / "k.db")) as store:
        keys = Keys(store)
        secret, _ = keys.create("alice", "user")
        keys.authenticate(f"Bearer {secret}", "10.0.0.1")  # verified once, remembered
        for i in range(auth.FAILURES_PER_KEY):  # each from another address: only the key id's limit applies
            assert refused(keys.authenticate, f"Bearer {wrong(secret)}", f"10.1.0.{i}").status == 401
        scrypts = len(calls)
        err = refused(keys.authenticate, f"Bearer {wrong(secret)}", "10.2.0.1")
        assert (err.status, err.reason) == (429, "too many failures") and len(calls) == scrypts  # no scrypt
        assert 1 <= err.retry_after <= auth.FAILURE_WINDOW_S and secret.split("_")[2] not in str(err)
        assert err.key_id == secret.split("_")[1]
        assert keys.authenticate(f"Bearer {secret}", "10.0.0.1").name == "alice"  # the remembered key still works
        clock[0] += err.retry_after
        assert refused(keys.authenticate, f"Bearer {wrong(secret)}", "10.2.0.1").status == 401  # the window moved


def test_failed_attempts_are_limited_per_client_address(tmp_path, monkeypatch):
    with open_store(str(tmp_path / "k.db")) as store:
        keys = Keys(store)
        secrets_ = [keys.create(f"user{i}", "user")[0] for i in range(3)]
        unknown = [f"Bearer ldk_{i:012x}_{'x' * 43}" for i in range(auth.FAILURES_PER_CLIENT)]
        for header in unknown:  # unknown key ids count as failures of the address too
            assert refused(keys.authenticate, header, "192.0.2.7").status == 401
        err = refused(keys.authenticate, f"Bearer {wrong(secrets_[0])}", "192.0.2.7")
        assert (err.status, err.reason) == (429, "too many failures") and err.retry_after >= 1
        assert refused(keys.authenticate, f"Bearer {wrong(secrets_[0])}", "192.0.2.8").status == 401
        assert refused(keys.authenticate, f"Bearer {secrets_[1]}", "192.0.2.7").status == 429  # until it waits
        assert keys.authenticate(f"Bearer {secrets_[1]}", "192.0.2.9").name == "user1"


def test_a_lockout_is_answered_429_with_retry_after_and_audited(server):
    secret, who = Keys(server.store).create("alice", "viewer")
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {wrong(secret)}"}) as c:
        codes = [c.get("/v1/models").status_code for _ in range(auth.FAILURES_PER_KEY + 2)]
        last = c.get("/v1/models")
    assert codes == [401] * auth.FAILURES_PER_KEY + [429, 429]
    assert last.status_code == 429 and 1 <= int(last.headers["retry-after"]) <= auth.FAILURE_WINDOW_S
    assert last.json()["error"]["code"] == "too_many_failures" and secret.split("_")[2] not in last.text
    rows = Audit(server.store).tail(50)
    locked = [r for r in rows if r["status"] == 429]
    assert len(locked) == 3 and all(r["key_id"] == who.key_id and r["key_name"] is None for r in locked)
    assert all(r["reason"] == "too many failures" for r in locked)


# --- remembered verifications ---------------------------------------------------------------------------------------
def test_a_remembered_verification_expires_and_is_forgotten_on_revocation(tmp_path, counted):
    clock, calls = counted
    with open_store(str(tmp_path / "k.db")) as store:
        keys = Keys(store)
        secret, _ = keys.create("alice", "user")
        calls.clear()  # creating hashed the key once
        for _ in range(3):
            keys.authenticate(f"Bearer {secret}")
        assert len(calls) == 1
        clock[0] += auth.CACHE_TTL_S + 1
        keys.authenticate(f"Bearer {secret}")
        assert len(calls) == 2  # verified again after the time to live
        keys.revoke("alice")
        assert len(keys._verified) == 0  # revoking drops what this process remembered of the key
        err = refused(keys.authenticate, f"Bearer {secret}")
        assert err.reason == "revoked key" and len(keys._verified) == 0


# --- who was refused --------------------------------------------------------------------------------------------------
def test_refused_requests_record_the_presented_key(server):
    keys = Keys(server.store)
    secret, alice = keys.create("alice", "viewer")
    other, bob = keys.create("bob", "viewer")
    keys.revoke("bob")
    unknown = f"ldk_{'0' * 12}_{secret.split('_')[2]}"
    with httpx.Client(base_url=server.url) as c:
        for key in (other, wrong(secret), unknown, secret):
            c.get("/v1/keys", headers={"Authorization": f"Bearer {key}"})
    rows = Audit(server.store).tail(4)
    assert [(r["status"], r["key_id"], r["key_name"]) for r in rows] == [
        (401, bob.key_id, "bob"),  # revoked: the secret was right, so the name is known
        (401, alice.key_id, None),  # wrong secret: only the id is known
        (401, "0" * 12, None),
        (403, alice.key_id, "alice"),
    ]
