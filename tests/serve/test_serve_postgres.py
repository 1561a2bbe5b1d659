"""Keys and audit on PostgreSQL, the store of several replicas: a throw-away server (initdb + pg_ctl) reachable
only through a Unix socket in a private temporary folder; two processes append to one chain; two stores share keys
and quotas. Skipped when the PostgreSQL server programs are not installed (Debian: apt-get install postgresql)."""

from __future__ import annotations

import concurrent.futures
import glob
import io
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from ldmkit.errors import InputError
from ldmkit.serve.audit import Audit
from ldmkit.serve.auth import AuthError, Keys
from ldmkit.serve.prompts import Templates
from ldmkit.serve.store import open_store
from tests.serve.test_serve_audit import append_in_processes, assert_one_chain


def _server_programs() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: on PATH, else Debian's newest /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def _unprivileged_user() -> pwd.struct_passwd | None:
    """The account to run the server as when the tests run as root (PostgreSQL refuses root): postgres or nobody."""
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres():
    """A running PostgreSQL server: (programs folder, its socket folder, port). Only the account running it (and
    root) can enter its socket folder; it listens on no TCP address."""
    bin_dir = _server_programs()
    if bin_dir is None:
        pytest.skip("PostgreSQL server programs (initdb, pg_ctl) are not installed; apt-get install postgresql")
    run_as = {}
    folder = Path(tempfile.mkdtemp(prefix="ldmkit-pg-"))  # short: a socket path has at most 107 bytes
    if os.geteuid() == 0:
        user = _unprivileged_user()
        if user is None:
            pytest.skip("running as root, and there is no postgres or nobody account to run PostgreSQL as")
        os.chown(folder, user.pw_uid, user.pw_gid)
        run_as = dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
    data, port = folder / "data", _free_port()
    env = {**os.environ, "HOME": str(folder), "LC_ALL": "C"}

    def run(*argv: str) -> None:
        done = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=120, **run_as)
        if done.returncode != 0:
            log = (folder / "server.log").read_text() if (folder / "server.log").exists() else ""
            pytest.fail(f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}\n{log}")

    run(str(bin_dir / "initdb"), "-D", str(data), "-U", "ldmkit", "--auth=trust", "--no-sync", "-E", "UTF8")
    settings = dict(listen_addresses="''", unix_socket_directories=f"'{folder}'", port=port, fsync="off")
    settings.update(synchronous_commit="off", full_page_writes="off", shared_buffers="'32MB'", max_connections=40)
    with open(data / "postgresql.conf", "a") as conf:
        conf.write("".join(f"{k} = {v}\n" for k, v in settings.items()))
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w", "-t", "60", "start")
    try:
        yield folder, port
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def url(postgres) -> str:
    """The URL of a new, empty database on the test server."""
    import psycopg

    folder, port = postgres
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"postgresql://ldmkit@/postgres?host={folder}&port={port}", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"postgresql://ldmkit@/{name}?host={folder}&port={port}"


def test_an_unreachable_server_is_named_without_its_password():
    port = _free_port()  # nothing listens there
    with pytest.raises(InputError) as info:
        open_store(f"postgresql://alice:s3cret@127.0.0.1:{port}/ldmkit")
    message = str(info.value)
    assert f"--database postgresql://alice:***@127.0.0.1:{port}/ldmkit" in message and "s3cret" not in message


def test_appends_from_two_processes_form_one_chain(url):
    with open_store(url) as store:  # tables created once before the writers start
        audit = Audit(store)
        append_in_processes(url, processes=2, rows=30)
        assert_one_chain(audit, 60)
        assert {r["request_id"][:2] for r in audit.tail(60)} == {"p0", "p1"}


def test_keys_and_quotas_are_shared_between_stores(url):
    with open_store(url) as a, open_store(url) as b:
        secret, who = Keys(a).create("alice", "user", images_per_day=4)
        with pytest.raises(InputError, match="exists already"):
            Keys(b).create("alice", "viewer")
        keys_a, keys_b = Keys(a), Keys(b)
        assert keys_b.authenticate(f"Bearer {secret}") == who
        keys_a.authenticate(f"Bearer {secret}")  # now remembered by keys_a
        keys_a.reserve_images(who, 3)
        with pytest.raises(AuthError) as info:
            keys_b.reserve_images(who, 2)
        assert info.value.status == 429 and info.value.retry_after > 0
        keys_b.release_images(who, 1)
        keys_b.reserve_images(who, 2)
        assert keys_a.list()[0]["images_today"] == 4
        keys_b.revoke("alice")
        with pytest.raises(AuthError) as info:
            keys_a.authenticate(f"Bearer {secret}")
        assert info.value.reason == "revoked key"


def test_rows_read_back_exactly_so_the_chain_verifies(url):
    """Floats, non-ASCII text, a NUL and odd parameter types survive PostgreSQL, so hashes recompute equal."""
    with open_store(url) as store:
        audit = Audit(store)
        params = {"prompt": 'café 🍎 "quoted"', "cfg": 0.1 + 0.2, "size": (64, 64), "path": Path("/x")}
        audit.record(decision="served", params=params, queue_ms=1 / 3, run_ms=5, reason="nul\x00here", status=200)
        audit.record(decision="failed", outputs=[], params={}, reason="ünïcode")
        assert audit.verify().ok
        row = audit.tail(2)[0]
        assert row["params"]["cfg"] == 0.1 + 0.2 and row["params"]["size"] == [64, 64] and row["queue_ms"] == 1 / 3
        out = io.StringIO()
        assert audit.export(out, key=None, fmt="jsonl") == 2
        assert json.loads(out.getvalue().splitlines()[0])["params"]["prompt"] == params["prompt"]


def test_two_server_replicas_write_one_chain(url, tmp_path):
    """Two `ldmkit serve` processes on one PostgreSQL database: one key works on both, revoked on one it is refused
    by the other at once, and their concurrent requests form one chain that verifies."""
    import threading

    import httpx

    from tests.serve_helpers import free_port, start_process

    secret, _ = Keys(open_store(url)).create("shared", "user")
    ports = [free_port(), free_port()]
    procs = [start_process(url, p, "--model", "emoji", log=tmp_path / f"serve{i}.log") for i, p in enumerate(ports)]
    try:
        answered = []

        def client(port: int, c: int):
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {secret}"}) as h:
                for i in range(3):
                    r = h.post("/v1/images/generations", json={"prompt": f"c{c}", "steps": 2, "seed": i}, timeout=60)
                    assert r.status_code == 200, r.text
                    answered.append(r.headers["x-request-id"])

        threads = [threading.Thread(target=client, args=(p, c)) for c, p in enumerate(ports * 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        Keys(open_store(url)).revoke("shared")
        for port in ports:
            r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {secret}"})
            assert r.status_code == 401
    finally:
        for p in procs:
            p.kill()
            p.wait()
    audit = Audit(open_store(url))
    rows = {r["request_id"]: r for r in audit.tail(1000)}
    assert len(answered) == 12 and all(rows[a]["decision"] == "served" for a in answered)
    assert audit.verify().ok


def test_prompt_templates_on_postgresql_get_distinct_versions_from_two_stores(url):
    with open_store(url) as a, open_store(url) as b:
        stores = [Templates(a), Templates(b)]

        def add(i: int) -> int:
            return stores[i % 2].add("shot", f"a {{thing}} number {i} at 100% size").version

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            versions = sorted(pool.map(add, range(12)))
        assert versions == list(range(1, 13))
        assert stores[1].render("shot@3", {"thing": "50% off {sale}"}).prompt.startswith("a 50% off {sale} number")
        stores[0].retire("shot")
        assert stores[1].show("shot@12").retired is not None
