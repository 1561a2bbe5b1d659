"""The audit trail's integrity beyond the chain, and its read-only use: the head (SEQ:HASH) that shows rows cut from
the end and a chain rewritten whole, anchors kept outside the database, read commands that create and write nothing
(an archived copy, a folder only root could write), and CSV cells a spreadsheet would run as formulas."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import pwd
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest

from ldmkit.config import ServeRun
from ldmkit.errors import InputError
from ldmkit.serve import audit as audit_module
from ldmkit.serve.audit import GENESIS, Audit
from ldmkit.serve.auth import Keys
from ldmkit.serve.store import open_store
from tests.serve.test_serve_audit import fill
from tests.serve.test_serve_auth import run_command


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "audit.db")


@pytest.fixture
def audit(db):
    store = open_store(db)
    yield Audit(store)
    store.close()


def verify(capsys, *argv) -> tuple[int, list[str]]:
    """`ldmkit audit verify ARGV`: its exit status and the lines it printed on standard output."""
    capsys.readouterr()
    status = run_command(["audit", "verify", *argv])
    return status, capsys.readouterr().out.splitlines()


def rewrite_whole_chain(db: str) -> None:
    """What an attacker with write access can do unseen by the chain: edit a row and recompute every hash after it."""
    with sqlite3.connect(db) as raw:
        raw.row_factory = sqlite3.Row
        raw.execute("UPDATE audit SET reason = 'nothing to see' WHERE seq = 2")
        prev = GENESIS
        for row in [dict(r) for r in raw.execute("SELECT * FROM audit ORDER BY seq")]:
            decoded = audit_module._decoded(row)
            digest = audit_module.chain_hash(prev, audit_module._content(decoded))
            raw.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, digest, row["seq"]))
            prev = digest


# --- the head -----------------------------------------------------------------------------------------------------
def test_verify_prints_the_head_and_expect_head_names_rows_cut_from_the_end(db, audit, capsys):
    fill(audit, 5)
    rows = audit.tail(5)
    status, lines = verify(capsys, "--database", db)
    assert status == 0 and lines == ["ok: 5 rows", f"head: 5:{rows[-1]['hash']}"]
    head = lines[-1].split()[-1]
    assert run_command(["audit", "verify", "--database", db, "--expect-head", head]) == 0
    assert capsys.readouterr().out.startswith("ok: 5 rows, the expected head\n")

    with sqlite3.connect(db) as raw:
        raw.execute("DELETE FROM audit WHERE seq >= 4")
    status, lines = verify(capsys, "--database", db)
    assert status == 0 and lines[-1] == f"head: 3:{rows[2]['hash']}"  # the chain alone cannot tell
    status, lines = verify(capsys, "--database", db, "--expect-head", head)
    assert status == 1
    assert lines[0] == (
        f"expected head {head}: row 5 is gone: the chain now ends at row 3, so rows were cut from its end "
        f"(or this is another database)"
    )


def test_expect_head_names_rows_added_after_it_and_a_chain_rewritten_whole(db, audit, capsys):
    fill(audit, 3)
    head = f"3:{audit.tail(1)[0]['hash']}"
    fill(audit, 2)
    status, lines = verify(capsys, "--database", db, "--expect-head", head)
    assert status == 1 and lines[0] == f"expected head {head}: the head is row 5, not row 3: 2 rows were added after it"

    rewrite_whole_chain(db)
    assert audit.verify().ok  # every link holds: only a head kept elsewhere shows it
    forged = audit.tail(5)[2]["hash"]
    status, lines = verify(capsys, "--database", db, "--expect-head", head)
    assert status == 1
    assert lines[0] == (
        f"expected head {head}: row 3 has the hash {forged}, not {head[2:]}: the chain was rewritten at or before row 3"
    )
    with pytest.raises(InputError, match="--expect-head: '3:abc' is not a head; give SEQ:HASH"):
        run_command(["audit", "verify", "--database", db, "--expect-head", "3:abc"])


def test_an_empty_chain_has_the_genesis_head(db, audit, capsys):
    status, lines = verify(capsys, "--database", db, "--expect-head", f"0:{GENESIS}")
    assert status == 0 and lines == ["ok: 0 rows, the expected head", f"head: 0:{GENESIS}"]


def test_anchor_appends_the_head_and_verify_checks_every_anchor(db, audit, tmp_path, capsys):
    anchors = tmp_path / "anchors.txt"
    fill(audit, 2)
    capsys.readouterr()
    assert run_command(["audit", "anchor", "--database", db, "--append", str(anchors)]) == 0
    first = capsys.readouterr().out.strip()
    when, head = first.split()
    assert head == f"2:{audit.tail(1)[0]['hash']}" and when.endswith("Z") and len(when) == 20
    fill(audit, 3)
    assert run_command(["audit", "anchor", "--database", db, "--append", str(anchors)]) == 0
    second = capsys.readouterr().out.strip()
    assert anchors.read_text() == f"{first}\n{second}\n"
    assert run_command(["audit", "anchor", "--database", db]) == 0  # printed only
    assert capsys.readouterr().out.split()[1] == second.split()[1] and len(anchors.read_text().splitlines()) == 2

    fill(audit, 1)  # a growing chain keeps its anchors
    status, lines = verify(capsys, "--database", db, "--anchors", str(anchors))
    assert status == 0 and lines[0] == "ok: 6 rows, 2 anchored heads"

    with sqlite3.connect(db) as raw:
        raw.execute("DELETE FROM audit WHERE seq >= 4")
    status, lines = verify(capsys, "--database", db, "--anchors", str(anchors))
    assert status == 1 and lines == [
        f"anchor {second}: row 5 is gone: the chain now ends at row 3, so rows were cut from its end "
        f"(or this is another database)",
        f"head: 3:{audit.tail(1)[0]['hash']}",
    ]
    rewrite_whole_chain(db)
    status, lines = verify(capsys, "--database", db, "--anchors", str(anchors))
    assert status == 1 and lines[0].startswith(f"anchor {first}: row 2 has the hash ") and "rewritten" in lines[0]
    assert lines[1].startswith(f"anchor {second}: row 5 is gone")


def test_anchor_files_that_cannot_be_used_are_named(db, audit, tmp_path):
    with pytest.raises(InputError, match="--anchors .*missing.txt does not exist"):
        run_command(["audit", "verify", "--database", db, "--anchors", str(tmp_path / "missing.txt")])
    bad = tmp_path / "bad.txt"
    bad.write_text(f"# kept by cron\n\n2026-01-01T00:00:00Z 0:{GENESIS}\n2026-01-01T01:00:00Z 7\n")
    with pytest.raises(InputError, match=r"bad.txt line 4: '7' is not a head"):
        run_command(["audit", "verify", "--database", db, "--anchors", str(bad)])
    with pytest.raises(InputError, match="--append .* is a folder"):
        run_command(["audit", "anchor", "--database", db, "--append", str(tmp_path)])


def test_the_verify_route_returns_the_head(db, audit):
    from fastapi.testclient import TestClient

    from ldmkit.serve.app import create_app

    key, _ = Keys(audit.store).create("root", "admin")
    fill(audit, 3)
    app, service = create_app(ServeRun(), {}, audit.store)
    try:
        with TestClient(app) as client:
            body = client.get("/v1/audit/verify", headers={"Authorization": f"Bearer {key}"}).json()
    finally:
        service.close(timeout=10)
    assert body["ok"] and body["head"] == {"seq": 3, "hash": audit.tail(4)[2]["hash"]}


# --- read-only use --------------------------------------------------------------------------------------------------
def fingerprint(*paths: Path) -> list:
    """Each file's SHA-256 and modification time (None for a file that does not exist)."""
    return [(hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) if p.exists() else None for p in paths]


READ_COMMANDS = (
    ["audit", "verify"],
    ["audit", "export", "--format", "csv"],
    ["audit", "anchor"],
    ["audit", "tail", "-n", "2"],
    ["keys", "list"],
)


def test_read_commands_leave_an_archived_copy_unchanged_and_read_its_log(tmp_path, capsys):
    live = tmp_path / "live" / "ldmkit.db"
    with open_store(str(live)) as store:  # copied while the server runs: rows only in the write-ahead log
        Keys(store).create("alice", "user")
        fill(Audit(store), 4)
        archive = tmp_path / "archive"
        archive.mkdir()
        for name in ("ldmkit.db", "ldmkit.db-wal"):
            shutil.copy2(live.parent / name, archive / name)
    copy, wal = archive / "ldmkit.db", archive / "ldmkit.db-wal"
    assert wal.stat().st_size > 0
    before = fingerprint(copy, wal)
    for argv in READ_COMMANDS:
        assert run_command([*argv, "--database", str(copy)]) == 0, argv
        assert fingerprint(copy, wal) == before, argv
    out = capsys.readouterr().out
    assert (
        "ok: 4 rows" in out
        and "alice" in out
        and sorted(p.name for p in archive.iterdir())
        == [
            "ldmkit.db",
            "ldmkit.db-shm",  # SQLite's index of the log, made to read it; the database and its log are untouched
            "ldmkit.db-wal",
        ]
    )


def test_sqlite_itself_refuses_writes_through_a_read_only_store_even_for_root(db, audit):
    fill(audit, 2)
    with open_store(db, read_only=True) as store:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            store.query("DELETE FROM audit")
        with pytest.raises(RuntimeError, match="opened read-only"):
            Audit(store).record(decision="served")
    assert audit.verify().rows == 2


def test_a_missing_or_foreign_database_is_named_and_nothing_is_created(tmp_path):
    missing = tmp_path / "nowhere" / "ldmkit.db"
    for argv in READ_COMMANDS:
        with pytest.raises(InputError, match="does not exist; give the path of the database"):
            run_command([*argv, "--database", str(missing)])
    assert not missing.parent.exists()
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(InputError, match="has no keys, usage, audit table, so it is not an ldmkit database"):
        run_command(["audit", "verify", "--database", str(empty)])
    assert empty.stat().st_size == 0
    text = tmp_path / "notes.db"
    text.write_text("not a database at all, just some words to fill the first page of the file " * 20)
    with pytest.raises(InputError, match="is not a SQLite database"):
        run_command(["keys", "list", "--database", str(text)])


def as_unprivileged(fn) -> str:
    """Run fn() in a forked child that cannot write what its owner cannot (as nobody where the tests run as root)
    and return what it printed, or 'InputError: message'."""
    account = pwd.getpwnam("nobody") if os.geteuid() == 0 else None
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no new imports, no threads, leaves by os._exit
        out = io.StringIO()
        try:
            if account:
                os.setgroups([])
                os.setgid(account.pw_gid)
                os.setuid(account.pw_uid)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                fn()
            text = out.getvalue()
        except InputError as e:
            text = f"InputError: {e}"
        except BaseException as e:
            text = f"{type(e).__name__}: {e}"
        os.write(write, text.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(pid, 0)
    return text


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder its reader cannot write: made here, filled by the test, then set read-only (r-x) with its files."""
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root, and there is no nobody account to read a read-only folder as")
    folder = Path(tempfile.mkdtemp(prefix="ldmkit-ro-"))  # outside root's private pytest folder
    folder.chmod(0o755)

    def seal() -> None:
        for f in folder.iterdir():
            f.chmod(0o444)
        folder.chmod(0o555)

    yield folder, seal
    folder.chmod(0o755)
    shutil.rmtree(folder)


def test_a_copy_in_a_folder_nobody_may_write_is_verified_and_listed(read_only_folder, tmp_path):
    folder, seal = read_only_folder
    source = tmp_path / "ldmkit.db"
    with open_store(str(source)) as store:
        Keys(store).create("alice", "user")
        fill(Audit(store), 3)
    shutil.copy2(source, folder / "ldmkit.db")  # closed cleanly: no log beside it
    seal()
    copy = folder / "ldmkit.db"
    before = fingerprint(copy)
    out = as_unprivileged(lambda: run_command(["audit", "verify", "--database", str(copy)]))
    assert out.startswith("ok: 3 rows\nhead: 3:"), out
    assert "alice" in as_unprivileged(lambda: run_command(["keys", "list", "--database", str(copy)]))
    assert fingerprint(copy) == before and sorted(p.name for p in folder.iterdir()) == ["ldmkit.db"]


def test_an_empty_log_beside_a_copy_nobody_may_write_holds_no_rows_to_miss(read_only_folder, tmp_path):
    folder, seal = read_only_folder
    with open_store(str(tmp_path / "ldmkit.db")) as store:
        fill(Audit(store), 2)
    shutil.copy2(tmp_path / "ldmkit.db", folder / "ldmkit.db")
    (folder / "ldmkit.db-wal").touch()  # left by a copy taken right after a checkpoint
    seal()
    out = as_unprivileged(lambda: run_command(["audit", "verify", "--database", str(folder / "ldmkit.db")]))
    assert out.startswith("ok: 2 rows\nhead: 2:"), out


def test_a_copy_whose_log_cannot_be_read_there_says_to_copy_both_files(read_only_folder, tmp_path):
    folder, seal = read_only_folder
    live = tmp_path / "ldmkit.db"
    with open_store(str(live)) as store:
        fill(Audit(store), 3)
        for name in ("ldmkit.db", "ldmkit.db-wal"):  # rows only in the log, and no -shm can be made beside it
            shutil.copy2(tmp_path / name, folder / name)
    seal()
    out = as_unprivileged(lambda: run_command(["audit", "verify", "--database", str(folder / "ldmkit.db")]))
    assert out.startswith("InputError: --database") and "has a write-ahead log (ldmkit.db-wal" in out, out
    assert "copy ldmkit.db and ldmkit.db-wal together to a writable folder" in out


# --- CSV ----------------------------------------------------------------------------------------------------------
def test_csv_cells_a_spreadsheet_would_run_are_led_by_a_quote(db, audit, tmp_path):
    risky = ['=HYPERLINK("http://x","y")', "+1+1", "-2+3", "@SUM(A1)", "\tlead", "\rlead"]
    for text in risky:
        audit.record(decision="refused-auth", key_name=text, reason=text, status=401)
    audit.record(decision="served", key_name="alice", reason="a = b", status=200, queue_ms=-0.5)
    target = tmp_path / "audit.csv"
    assert run_command(["audit", "export", "--database", db, "--format", "csv", "--out", str(target)]) == 0
    rows = list(csv.DictReader(target.open(newline="")))
    assert [r["key_name"] for r in rows] == [f"'{t}" for t in risky] + ["alice"]
    assert [r["reason"] for r in rows] == [f"'{t}" for t in risky] + ["a = b"]
    assert rows[-1]["queue_ms"] == "-0.5" and rows[0]["time"][0].isdigit()  # numbers stay numbers
    out = io.StringIO()
    audit.export(out)  # JSON lines keep every value exactly
    assert [json.loads(line)["key_name"] for line in out.getvalue().splitlines()] == [*risky, "alice"]
