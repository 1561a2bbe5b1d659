"""The audit trail of `ldmkit serve`: one row per request, appended durably before the response, hash-chained.

Each row stores prev_hash, the hash of the row before it (64 zeros for the first), and
    hash = sha256(prev_hash + canonical JSON of the row's content, its seq and time included),
canonical meaning sorted keys, no spaces, ASCII only. Editing a row breaks its hash; deleting or moving rows breaks
the prev_hash links after them; `verify` names each broken row and what happened to it. Appends are serialized
across threads and processes (SQLite BEGIN IMMEDIATE, PostgreSQL an advisory lock), so the chain never forks.

The chain cannot show rows cut from its end, nor a chain rewritten whole: its head, SEQ:HASH of the last row, kept
outside the database (`ldmkit audit anchor`) proves those. A head kept earlier must still be in the chain, its row
holding the same hash; `check_heads` says what happened to one that is not. docs/audit.md states the threat model.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterator, TextIO

from ..errors import InputError
from .store import Store

FIELDS = (
    "request_id",  # the server's id of the request (the X-Request-Id header)
    "key_id",
    "key_name",
    "client",  # address:port of the caller
    "route",  # "POST /v1/images/generations"
    "model",
    "weights_sha256",
    "params",  # dict: every parameter, prompt, negative prompt and seed included
    "outputs",  # list: SHA-256 (hex) of each output image
    "decision",
    "reason",
    "status",  # the HTTP status answered
    "queue_ms",
    "run_ms",
)
DECISIONS = ("served", "refused-auth", "refused-quota", "refused-validation", "refused-policy", "failed", "cancelled")
COLUMNS = ("seq", "time", *FIELDS, "prev_hash", "hash")
TEXT_FIELDS = ("request_id", "key_id", "key_name", "client", "route", "model", "weights_sha256", "reason")
GENESIS = "0" * 64  # the prev_hash of the first row
PAGE = 2000  # rows read at a time by verify and export
FORMATS = ("jsonl", "csv")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # a CSV cell starting so is read as a formula by spreadsheets


@dataclass
class VerifyResult:
    """ok: no problem found; rows: rows checked; problems: one line per broken row, naming it by seq;
    last_seq, last_hash: the head (the last row's seq and hash; 0 and GENESIS for an empty chain), to keep elsewhere
    as proof of the chain's length."""

    ok: bool
    rows: int
    problems: list[str] = field(default_factory=list)
    last_hash: str = GENESIS
    last_seq: int = 0

    @property
    def head(self) -> str:
        """SEQ:HASH, as `audit verify` prints it and `--expect-head` and anchors take it."""
        return f"{self.last_seq}:{self.last_hash}"


def parse_head(text: str, where: str) -> tuple[int, str]:
    """(seq, hash) from SEQ:HASH; InputError naming `where` (an option, or a file and line) when malformed."""
    seq, _, digest = text.strip().partition(":")
    if not (seq.isdigit() and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise InputError(
            f"{where}: {text!r} is not a head; give SEQ:HASH as `ldmkit audit verify` prints it, "
            f"a row number, a colon and 64 lowercase hex digits"
        )
    return int(seq), digest


def parse_anchors(text: str, where: str) -> list[tuple[str, tuple[int, str]]]:
    """The heads in the text of an anchor file, as (the line, (seq, hash)); each line is `TIME SEQ:HASH` as
    `ldmkit audit anchor` writes it (the head is the last word); blank lines and # comments are skipped."""
    anchors = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            anchors.append((line, parse_head(line.split()[-1], f"{where} line {n}")))
    return anchors


def head_problem(seq: int, expected: str, found: str | None, last_seq: int) -> str | None:
    """What happened to row `seq`, which held the hash `expected` when its head was kept: None when it still does.
    found: its hash now (None: no such row); last_seq: the seq of the chain's last row now."""
    if found == expected:
        return None
    if found is None and seq > last_seq:
        now = f"now ends at row {last_seq}" if last_seq else "is now empty"
        return f"row {seq} is gone: the chain {now}, so rows were cut from its end (or this is another database)"
    if found is None:
        return f"row {seq} is missing (deleted)"
    return f"row {seq} has the hash {found}, not {expected}: the chain was rewritten at or before row {seq}"


def _now() -> str:
    """The time of a row: now, UTC, ISO 8601 to the microsecond (one format, so text order is time order)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def canonical(content: dict) -> str:
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def chain_hash(prev_hash: str, content: dict) -> str:
    """sha256(prev_hash + canonical JSON of content), hex."""
    return hashlib.sha256((prev_hash + canonical(content)).encode()).hexdigest()


def _text(value) -> str | None:
    """Text as both databases store it unchanged: no NUL (PostgreSQL refuses it), no lone surrogates."""
    if value is None:
        return None
    return str(value).replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def _number(name: str, value, kind):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"audit field {name} must be a number or None, not {value!r}")
    if kind is int:
        if value != int(value) or abs(value) >= 2**31:
            raise InputError(f"audit field {name} must be a whole number below 2**31, not {value!r}")
        return int(value)
    return float(value) if math.isfinite(value) else None  # SQLite would turn NaN into NULL behind the hash


def _normalized(fields: dict) -> dict:
    """The record() fields as they will read back from either database; InputError for a programming mistake."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise InputError(f"audit rows have no field {', '.join(unknown)}; use only: {', '.join(FIELDS)}")
    if fields.get("decision") not in DECISIONS:
        raise InputError(f"audit decision {fields.get('decision')!r} is not one of: {', '.join(DECISIONS)}")
    row = {name: _text(fields.get(name)) for name in TEXT_FIELDS}
    row["decision"] = fields["decision"]
    row["status"] = _number("status", fields.get("status"), int)
    row["queue_ms"] = _number("queue_ms", fields.get("queue_ms"), float)
    row["run_ms"] = _number("run_ms", fields.get("run_ms"), float)
    params, outputs = fields.get("params"), fields.get("outputs")
    if params is not None and not isinstance(params, dict):
        raise InputError(f"audit field params must be a dict of the request's parameters, not {type(params).__name__}")
    if outputs is not None and not isinstance(outputs, (list, tuple)):
        raise InputError(f"audit field outputs must be a list of SHA-256 hex strings, not {type(outputs).__name__}")
    for name, value in (("params", params), ("outputs", outputs)):
        row[name] = None if value is None else json.loads(canonical(_jsonable(value)))
    return row


def _jsonable(value):
    """`value` with anything JSON cannot hold (a Path, a set) written as text, and floats JSON can hold."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return _text(value)


def _content(row: dict) -> dict:
    """The hashed part of a stored row (params and outputs decoded)."""
    return {name: row[name] for name in ("seq", "time", *FIELDS)}


def _decoded(row: dict) -> dict:
    """A stored row as a dict in COLUMNS order, params and outputs decoded from their JSON text."""
    out = {name: row[name] for name in COLUMNS}
    for name in ("params", "outputs"):
        try:
            out[name] = None if out[name] is None else json.loads(out[name])
        except ValueError:
            pass  # no longer JSON: an edited row (verify reports it), shown as stored
    return out


def _row_problem(row: dict, prev_seq: int) -> str | None:
    """What is wrong with one row whose link to the row before it is not in question (the caller checks links):
    rows missing before it (a gap in seq), an edit (its content does not match its hash), or None."""
    seq = row["seq"]
    intact = chain_hash(row["prev_hash"], _content(_decoded(row))) == row["hash"]
    if seq != prev_seq + 1:
        missing = f"row {prev_seq + 1} is" if seq == prev_seq + 2 else f"rows {prev_seq + 1} to {seq - 1} are"
        edited = "" if intact else "; its own content does not match its hash either (edited)"
        return f"row {seq}: {missing} missing before it (deleted){edited}"
    return None if intact else f"row {seq}: its content does not match its hash (the row was edited)"


def _link_problem(seq: int, prev_seq: int, prev_hash: str, found: dict[str, int]) -> str:
    """The line for row `seq`, whose prev_hash is not the hash of row `prev_seq` (0: the 64 zeros that start the
    chain); found: hash -> seq of the rows that broken links name."""
    before = f"row {prev_seq}" if prev_seq else "the start of the chain"
    if prev_hash in found:
        return f"row {seq}: it was written after row {found[prev_hash]}, not after {before} (rows were reordered)"
    return (
        f"row {seq}: its prev_hash matches neither {before} nor any other row ({before} was edited and its hash "
        f"recomputed, or rows were deleted and the rest renumbered)"
    )


def _csv_cells(row: dict) -> list:
    """A decoded row as CSV cells: null as an empty cell, params and outputs as JSON text, and text a spreadsheet
    would run as a formula (a key named =HYPERLINK(...)) led by a single quote, so that it shows as text."""
    json_text = ("params", "outputs")
    cells = [
        "" if row[c] is None else json.dumps(row[c], ensure_ascii=False) if c in json_text else row[c] for c in COLUMNS
    ]
    return [f"'{c}" if isinstance(c, str) and c.startswith(FORMULA_STARTS) else c for c in cells]


def _utc_iso(value: str) -> str:
    """An ISO date or datetime from --since as the stored time format (UTC; a time without zone is UTC)."""
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise InputError(
            f"--since {value!r} is not an ISO date or time; give e.g. 2025-06-01 or 2025-06-01T12:00"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="microseconds")


class Audit:
    """The audit trail in `store`: record, verify, export, tail."""

    def __init__(self, store: Store):
        self.store = store

    def record(self, **fields) -> int:
        """Append one row (fields: see FIELDS; missing ones are null, decision is required) and return its seq,
        after the row is committed. The time is set here, in UTC."""
        row = _normalized(fields)
        with self.store.write(lock=True) as db:
            last = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
            seq, prev = (last[0]["seq"] + 1, last[0]["hash"]) if last else (1, GENESIS)
            content = {"seq": seq, "time": _now(), **row}
            stored = {**content, **{k: None if row[k] is None else canonical(row[k]) for k in ("params", "outputs")}}
            stored.update(prev_hash=prev, hash=chain_hash(prev, content))
            db.execute(
                f"INSERT INTO audit ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                [stored[c] for c in COLUMNS],
            )
        return seq

    def _pages(self, where: str = "", args: tuple = ()) -> Iterator[dict]:
        """Stored rows in seq order, PAGE at a time, optionally filtered by a SQL condition."""
        after = None
        while True:
            cond = " AND ".join(c for c in ("seq > ?" if after is not None else "", where) if c)
            rows = self.store.query(
                f"SELECT * FROM audit{' WHERE ' + cond if cond else ''} ORDER BY seq LIMIT {PAGE}",
                ((after,) if after is not None else ()) + args,
            )
            yield from rows
            if len(rows) < PAGE:
                return
            after = rows[-1]["seq"]

    def verify(self) -> VerifyResult:
        """Check every row's hash and its link to the row before it. A row whose content does not match its hash
        was edited; a gap in seq means deleted rows; a prev_hash naming another row means rows were reordered; a
        prev_hash naming no row means a row's hash was recomputed after an edit, or rows renumbered after a
        deletion. Two passes: the second, needed only for broken links, finds the rows they name."""
        rows, problems, links = 0, [], []  # links: (seq, seq before it, its prev_hash), for the second pass
        previous = (0, GENESIS)  # (seq, hash) of the row before
        for row in self._pages():
            rows += 1
            if row["seq"] == previous[0] + 1 and row["prev_hash"] != previous[1]:
                links.append((row["seq"], previous[0], row["prev_hash"]))
                problems.append(len(links) - 1)  # a placeholder, kept in seq order
            elif problem := _row_problem(row, previous[0]):
                problems.append(problem)
            previous = (row["seq"], row["hash"])
        if links:
            wanted = {prev_hash for _, _, prev_hash in links}
            found = {r["hash"]: r["seq"] for r in self._pages() if r["hash"] in wanted}
            problems = [_link_problem(*links[p], found) if isinstance(p, int) else p for p in problems]
        return VerifyResult(ok=not problems, rows=rows, problems=problems, last_hash=previous[1], last_seq=previous[0])

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last row: what `ldmkit audit anchor` keeps; (0, GENESIS) for an empty chain."""
        last = self.store.query("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        return (last[0]["seq"], last[0]["hash"]) if last else (0, GENESIS)

    def check_heads(
        self, result: VerifyResult, expected: tuple[int, str] | None = None, anchors: list[tuple[str, tuple]] = ()
    ) -> list[str]:
        """One line per head that does not hold, naming what differs: `expected` (seq, hash), the head the chain of
        `result` must end with; `anchors` (the line, (seq, hash)), heads kept earlier that it must still hold."""
        heads = ([expected] if expected else []) + [head for _, head in anchors]
        wanted, found = sorted({seq for seq, _ in heads if seq > 0}), {0: GENESIS}
        for i in range(0, len(wanted), 500):  # a bounded number of placeholders a query
            chunk = wanted[i : i + 500]
            rows = self.store.query(f"SELECT seq, hash FROM audit WHERE seq IN ({', '.join('?' * len(chunk))})", chunk)
            found.update((r["seq"], r["hash"]) for r in rows)
        problems = [head_problem(seq, digest, found.get(seq), result.last_seq) for seq, digest in heads]
        lines = [f"anchor {line}: {p}" for (line, _), p in zip(anchors, problems[1 if expected else 0 :]) if p]
        if expected:
            (seq, digest), problem = expected, problems[0]
            if problem is None and result.last_seq != seq:
                added = result.last_seq - seq
                problem = f"the head is row {result.last_seq}, not row {seq}: {added} rows were added after it"
            lines[:0] = [f"expected head {seq}:{digest}: {problem}"] if problem else []
        return lines

    def export(self, out: TextIO, since: str | None = None, key: str | None = None, fmt: str = "jsonl") -> int:
        """Write the rows (oldest first) to `out` as JSON lines or CSV (params and outputs as JSON text) and return
        how many. since: an ISO date or datetime (UTC unless it says otherwise); key: a key name or id."""
        if fmt not in FORMATS:
            raise InputError(f"--format {fmt!r} is not known; use one of: {', '.join(FORMATS)}")
        conds, args = [], ()
        if since:
            conds.append("time >= ?")
            args += (_utc_iso(since),)
        if key:
            conds.append("(key_id = ? OR key_name = ?)")
            args += (key, key)
        writer = csv.writer(out) if fmt == "csv" else None
        if writer:
            writer.writerow(COLUMNS)
        n = 0
        for row in self._pages(" AND ".join(conds), args):
            row = _decoded(row)
            if writer:
                writer.writerow(_csv_cells(row))
            else:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
        return n

    def tail(self, n: int = 20) -> list[dict]:
        """The last `n` rows, oldest first, params and outputs decoded."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"-n {n!r}: give a number of rows of at least 1")
        rows = self.store.query(f"SELECT * FROM audit ORDER BY seq DESC LIMIT {n}")
        return [_decoded(r) for r in reversed(rows)]

    def find(self, request_prefix: str | None = None, output_sha256: str | None = None) -> list[dict]:
        """Rows (oldest first, decoded) whose request id starts with `request_prefix` (hex digits, as a watermark
        carries them) or whose outputs include the image hash `output_sha256`; at most PAGE rows."""
        conds, args = [], ()
        for value, cond in ((request_prefix, "request_id LIKE ?"), (output_sha256, "outputs LIKE ?")):
            if value is None:
                continue
            if not value or any(c not in "0123456789abcdef" for c in value.lower()):
                raise InputError(f"{value!r} is not hex digits; give a request id prefix or a SHA-256 in hex")
            conds.append(cond)
            args += (f"{value.lower()}%" if cond.startswith("request") else f'%"{value.lower()}"%',)
        if not conds:
            return []
        rows = self.store.query(f"SELECT * FROM audit WHERE {' OR '.join(conds)} ORDER BY seq LIMIT {PAGE}", args)
        return [_decoded(r) for r in rows]

    def after(self, seq: int) -> list[dict]:
        """Rows with a seq above `seq` (at most PAGE), oldest first: what `audit tail --follow` prints next."""
        return [
            _decoded(r)
            for r in self.store.query(f"SELECT * FROM audit WHERE seq > ? ORDER BY seq LIMIT {PAGE}", (seq,))
        ]
