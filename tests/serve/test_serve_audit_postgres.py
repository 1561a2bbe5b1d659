"""The audit trail's head, anchors and read-only commands on PostgreSQL: a database that refuses every write (as a
hot standby does) is still verified, exported and listed, and a read-only store writes nothing. Skipped, with the
other PostgreSQL tests, when the server programs are not installed."""

from __future__ import annotations

import pytest

from ldmkit.errors import InputError
from ldmkit.serve.audit import Audit
from ldmkit.serve.auth import Keys
from ldmkit.serve.store import open_store
from tests.serve import test_serve_postgres
from tests.serve.test_serve_audit import fill
from tests.serve.test_serve_audit_integrity import READ_COMMANDS
from tests.serve.test_serve_auth import run_command

postgres, url = test_serve_postgres.postgres, test_serve_postgres.url  # its server and databases


def _admin(url: str):
    """A connection to the server's postgres database, and the name of the test database in `url`."""
    import psycopg

    name = url.split("/")[3].split("?")[0]
    return psycopg.connect(url.replace(f"/{name}?", "/postgres?"), autocommit=True), name


def test_read_commands_work_on_a_database_that_refuses_writes(url, tmp_path, capsys):
    with open_store(url) as store:
        Keys(store).create("alice", "user")
        fill(Audit(store), 3)
        head = f"3:{Audit(store).tail(1)[0]['hash']}"
    conn, name = _admin(url)
    with conn:
        conn.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
    capsys.readouterr()
    for argv in READ_COMMANDS:
        assert run_command([*argv, "--database", url]) == 0, argv
    out = capsys.readouterr().out
    assert "ok: 3 rows" in out and f"head: {head}" in out and "alice" in out
    anchors = tmp_path / "anchors.txt"
    assert run_command(["audit", "anchor", "--database", url, "--append", str(anchors)]) == 0
    assert anchors.read_text().split()[1] == head


def test_a_read_only_store_writes_nothing_and_creates_no_table(url):
    import psycopg

    with pytest.raises(InputError, match="has no keys, usage, audit table, so it is not an ldmkit database"):
        open_store(url, read_only=True)
    with psycopg.connect(url) as raw:
        tables = raw.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        assert tables.fetchall() == []
    with open_store(url) as store:
        fill(Audit(store), 2)
    with open_store(url, read_only=True) as store:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            store.query("DELETE FROM audit")
        assert Audit(store).verify().rows == 2


def test_rows_cut_from_the_end_are_found_by_the_expected_head(url, capsys):
    with open_store(url) as store:
        fill(Audit(store), 4)
        head = f"4:{Audit(store).tail(1)[0]['hash']}"
        with store.write() as db:
            db.execute("DELETE FROM audit WHERE seq >= 3")
    capsys.readouterr()
    assert run_command(["audit", "verify", "--database", url, "--expect-head", head]) == 1
    assert capsys.readouterr().out.startswith(f"expected head {head}: row 4 is gone: the chain now ends at row 2")
