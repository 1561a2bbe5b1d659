"""The audit trail: a hash chain that verifies, names edited, deleted and reordered rows, exports with filters,
and stays one unbroken chain under appends from many threads and from several processes."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sqlite3
import subprocess
import sys
import threading

import pytest

from ldmkit.cli import serve as commands
from ldmkit.errors import InputError, OutputExistsError
from ldmkit.serve import audit as audit_module
from ldmkit.serve.audit import GENESIS, Audit
from ldmkit.serve.store import open_store
from tests.serve.test_serve_auth import run_command

APPENDER = """
import sys, time
from ldmkit.serve.audit import Audit
from ldmkit.serve.store import open_store
database, n, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
audit = Audit(open_store(database))
print("ready", flush=True)
sys.stdin.readline()
for i in range(n):
    audit.record(decision="served", request_id=f"{tag}-{i}", params={"i": i}, status=200)
    time.sleep(0.001)
"""


def append_in_processes(database: str, processes: int, rows: int) -> None:
    """Start `processes` Python processes appending `rows` rows each to `database`, all released at once."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", APPENDER, database, str(rows), f"p{i}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    for p in procs:  # release them together
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err


def assert_one_chain(audit: Audit, rows: int) -> None:
    result = audit.verify()
    assert result.ok and result.rows == rows, result.problems
    assert [r["seq"] for r in audit.tail(rows)] == list(range(1, rows + 1))


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "audit.db")


@pytest.fixture
def audit(db):
    store = open_store(db)
    yield Audit(store)
    store.close()


def fill(audit: Audit, n: int = 5) -> None:
    for i in range(n):
        audit.record(decision="served", key_name="alice", params={"prompt": f"p{i}", "seed": i}, status=200)


def test_the_chain_is_sha256_of_the_previous_hash_and_canonical_json(audit):
    fields = dict(
        request_id="r1",
        key_id="k1",
        key_name="alice",
        client="127.0.0.1:5000",
        route="POST /v1/images/generations",
        model="emoji",
        weights_sha256="ab" * 32,
        params={"prompt": "a red apple", "negative_prompt": "", "seed": 7, "cfg": 3.0},
        outputs=["cd" * 32, "ef" * 32],
        decision="served",
        reason=None,
        status=200,
        queue_ms=1,  # an int reads back as the float it is stored as
        run_ms=250.5,
    )
    assert audit.record(**fields) == 1
    assert audit.record(decision="refused-auth", status=401, reason="missing key") == 2
    first, second = audit.tail(2)
    assert {k: first[k] for k in fields} == {**fields, "queue_ms": 1.0}
    assert second["key_id"] is None and second["params"] is None  # missing fields are null
    content = {k: v for k, v in first.items() if k not in ("prev_hash", "hash")}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    assert first["prev_hash"] == GENESIS
    assert first["hash"] == hashlib.sha256((GENESIS + text).encode()).hexdigest()
    assert second["prev_hash"] == first["hash"]
    result = audit.verify()
    assert result.ok and result.rows == 2 and result.last_hash == second["hash"]


def test_record_refuses_unknown_decisions_and_fields(audit):
    with pytest.raises(InputError, match="'approved' is not one of"):
        audit.record(decision="approved")
    with pytest.raises(InputError, match="no field prompt"):
        audit.record(decision="served", prompt="x")
    with pytest.raises(InputError, match="status"):
        audit.record(decision="served", status="200")
    assert audit.verify().rows == 0


@pytest.mark.parametrize(
    "tamper, expected",
    [
        ("UPDATE audit SET reason = 'nothing to see' WHERE seq = 3", ["row 3: its content does not match its hash"]),
        ('UPDATE audit SET params = \'{"prompt":"p2","seed":99}\' WHERE seq = 3', ["row 3: its content"]),
        ("UPDATE audit SET outputs = 'not json' WHERE seq = 1", ["row 1: its content"]),
        ("DELETE FROM audit WHERE seq = 3", ["row 4: row 3 is missing before it (deleted)"]),
        ("DELETE FROM audit WHERE seq IN (1, 2)", ["row 3: rows 1 to 2 are missing before it (deleted)"]),
        (
            "UPDATE audit SET seq = -seq WHERE seq IN (2, 3); UPDATE audit SET seq = 5 + seq WHERE seq IN (-2, -3)",
            [
                "row 2: it was written after row 3, not after row 1 (rows were reordered)",
                "row 3: it was written after row 1, not after row 2 (rows were reordered)",
                "row 4: it was written after row 2, not after row 3 (rows were reordered)",
            ],
        ),
    ],
    ids=["edited", "edited-params", "not-json", "deleted", "deleted-first", "reordered"],
)
def test_tampering_is_found_and_named(db, audit, tamper, expected):
    fill(audit)
    with sqlite3.connect(db) as raw:
        raw.executescript(tamper)
    result = audit.verify()
    assert not result.ok
    assert len(result.problems) == len(expected), result.problems
    for problem, start in zip(result.problems, expected):
        assert problem.startswith(start), result.problems


def test_an_edit_with_its_hash_recomputed_breaks_the_next_link(db, audit):
    fill(audit)
    row = audit.tail(5)[1]  # seq 2
    row["reason"] = "rewritten"
    content = {k: v for k, v in row.items() if k not in ("prev_hash", "hash")}
    forged = audit_module.chain_hash(row["prev_hash"], content)
    with sqlite3.connect(db) as raw:
        raw.execute("UPDATE audit SET reason = 'rewritten', hash = ? WHERE seq = 2", (forged,))
    assert audit.verify().problems == [
        "row 3: its prev_hash matches neither row 2 nor any other row (row 2 was edited and its hash recomputed, "
        "or rows were deleted and the rest renumbered)"
    ]


def test_verify_command_prints_ok_or_each_problem(db, audit, capsys):
    fill(audit, 3)
    assert run_command(["audit", "verify", "--database", db]) == 0
    assert capsys.readouterr().out == f"ok: 3 rows\nhead: 3:{audit.tail(1)[0]['hash']}\n"
    with sqlite3.connect(db) as raw:
        raw.execute("UPDATE audit SET status = 500 WHERE seq = 2")
    assert run_command(["audit", "verify", "--database", db]) == 1
    assert capsys.readouterr().out.startswith("row 2: its content does not match its hash")


def test_export_filters_by_time_and_key(db, audit, tmp_path, monkeypatch, capsys):
    days = iter(f"2025-01-0{d}T12:00:00.000000+00:00" for d in (1, 2, 3))
    monkeypatch.setattr(audit_module, "_now", lambda: next(days))
    for key_id, name in (("k1", "alice"), ("k2", "bob"), ("k1", "alice")):
        audit.record(decision="served", key_id=key_id, key_name=name, params={"prompt": 'x,"y"\n'}, outputs=["a"])
    out = io.StringIO()
    assert audit.export(out) == 3 and len(out.getvalue().splitlines()) == 3
    out = io.StringIO()
    assert audit.export(out, since="2025-01-02T13:00+02:00") == 2  # 11:00 UTC
    assert [json.loads(line)["seq"] for line in out.getvalue().splitlines()] == [2, 3]
    assert audit.export(io.StringIO(), since="2025-01-02", key="alice") == 1
    assert audit.export(io.StringIO(), key="k2") == 1
    with pytest.raises(InputError, match="--since 'yesterday'"):
        audit.export(io.StringIO(), since="yesterday")
    with pytest.raises(InputError, match="--format 'xml'"):
        audit.export(io.StringIO(), fmt="xml")

    target = tmp_path / "alice.csv"
    argv = ["audit", "export", "--database", db, "--format", "csv", "--key", "alice", "--out", str(target)]
    assert run_command(argv) == 0
    rows = list(csv.DictReader(target.open(newline="")))
    assert [r["seq"] for r in rows] == ["1", "3"] and json.loads(rows[0]["params"]) == {"prompt": 'x,"y"\n'}
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_command(argv)
    assert run_command([*argv, "--overwrite", "--since", "2025-01-03"]) == 0
    assert len(list(csv.DictReader(target.open(newline="")))) == 1
    capsys.readouterr()
    assert run_command(["audit", "export", "--database", db, "--key", "bob"]) == 0
    assert json.loads(capsys.readouterr().out)["key_name"] == "bob"


def test_tail_command_and_follow(db, audit, monkeypatch, capsys):
    fill(audit, 4)
    assert run_command(["audit", "tail", "-n", "2", "--database", db]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["3", "4"] and "served" in lines[0]
    naps = []

    def sleep(seconds):  # a new row during the first nap, Ctrl-C during the second
        naps.append(seconds)
        if len(naps) == 1:
            audit.record(decision="failed", status=500, reason="out of memory")
        else:
            raise KeyboardInterrupt

    monkeypatch.setattr(commands.time, "sleep", sleep)
    assert run_command(["audit", "tail", "-n", "1", "--follow", "--database", db]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["4", "5"] and "out of memory" in lines[1]
    assert naps == [1.0, 1.0]


def test_appends_from_many_threads_form_one_chain(db, audit):
    other = open_store(db)  # threads of one store, and a second store on the same file
    start = threading.Barrier(6)

    def append(a: Audit, tag: str):
        start.wait()
        for i in range(20):
            a.record(decision="served", request_id=f"{tag}-{i}")

    threads = [threading.Thread(target=append, args=(audit if t < 4 else Audit(other), f"t{t}")) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other.close()
    assert_one_chain(audit, 120)


def test_appends_from_two_processes_form_one_chain(db, audit):
    audit.record(decision="served")  # the file exists before they start
    append_in_processes(db, processes=2, rows=40)
    assert_one_chain(audit, 81)
    tags = {r["request_id"].split("-")[0] for r in audit.tail(81)[1:]}
    assert tags == {"p0", "p1"}
