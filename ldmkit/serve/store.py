"""Where the server keeps API keys, daily image counts and the audit trail: a SQLite file on one machine, or a
PostgreSQL database that several replicas share.

Both kinds answer the same small API, so keys and audit are written once:
  store.query(sql, args)          -> list of rows as dicts, outside any transaction
  with store.write(lock=...) as db: db.execute(sql, args) -> rows; one transaction, committed when the block ends
SQL uses `?` placeholders and the common subset of both dialects (upserts with ON CONFLICT, RETURNING).

Safety under concurrency: every thread gets its own connection, so threads never share a transaction. SQLite runs
in WAL mode with synchronous=FULL (a commit survives a power cut) and a busy timeout, and every write transaction
starts with BEGIN IMMEDIATE, which serializes writers across threads and processes. PostgreSQL serializes the
writes that ask for it (audit appends, schema creation) with a transaction-scoped advisory lock.

Read-only use (`open_store(database, read_only=True)`, for `audit verify`, `audit export`, `keys list`): nothing is
created or written, so an auditor can check an archived copy, a read-only mount or a PostgreSQL standby. SQLite opens
the file with mode=ro, which SQLite itself enforces (for root too); a file with no write-ahead log beside it is also
opened immutable=1, so not even a -wal or -shm file is created beside it. PostgreSQL sessions are set READ ONLY.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

from ..errors import InputError, MissingDependencyError

BUSY_TIMEOUT_S = 30.0  # how long a SQLite writer waits for another one before giving up
CONNECT_TIMEOUT_S = 10  # how long to wait for a PostgreSQL server to answer
# The one advisory lock of PostgreSQL writes that must not interleave: a fixed 64-bit number derived from a name.
LOCK_ID = int.from_bytes(hashlib.sha256(b"ldmkit.serve.store").digest()[:8], "big", signed=True)

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS keys (
        id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, role TEXT NOT NULL, salt TEXT NOT NULL, hash TEXT NOT NULL,
        images_per_day BIGINT, rate_per_min DOUBLE PRECISION, created TEXT NOT NULL, revoked TEXT)""",
    """CREATE TABLE IF NOT EXISTS usage (
        key_id TEXT NOT NULL, day TEXT NOT NULL, images BIGINT NOT NULL, PRIMARY KEY (key_id, day))""",
    """CREATE TABLE IF NOT EXISTS audit (
        seq BIGINT PRIMARY KEY, time TEXT NOT NULL, request_id TEXT, key_id TEXT, key_name TEXT, client TEXT,
        route TEXT, model TEXT, weights_sha256 TEXT, params TEXT, outputs TEXT, decision TEXT NOT NULL, reason TEXT,
        status INTEGER, queue_ms DOUBLE PRECISION, run_ms DOUBLE PRECISION, prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS audit_time ON audit (time)",
    "CREATE INDEX IF NOT EXISTS audit_key ON audit (key_id)",
    """CREATE TABLE IF NOT EXISTS prompts (
        name TEXT NOT NULL, version INTEGER NOT NULL, text TEXT NOT NULL, negative_prompt TEXT NOT NULL,
        params TEXT NOT NULL, description TEXT NOT NULL, created TEXT NOT NULL, created_by TEXT, retired TEXT,
        retired_by TEXT, PRIMARY KEY (name, version))""",
)


READ_TABLES = ("keys", "usage", "audit")  # what a read-only open requires: the tables the read commands use


class Conflict(Exception):
    """A write that broke a UNIQUE or PRIMARY KEY constraint (a key name that is taken, say)."""


def default_database() -> Path:
    """$LDMKIT_HOME/ldmkit.db, LDMKIT_HOME defaulting to ~/.local/share/ldmkit."""
    home = os.environ.get("LDMKIT_HOME") or Path.home() / ".local" / "share" / "ldmkit"
    return Path(home).expanduser() / "ldmkit.db"


def open_store(database: str | None = None, read_only: bool = False) -> Store:
    """The store named by `--database`: None or "" -> the default SQLite file (its folder created), a path -> a
    SQLite file there, a postgresql:// URL -> that PostgreSQL database. Tables are created when missing.
    read_only: open an existing ldmkit database only to read it; nothing is created, and writes are refused."""
    if database and database.startswith(("postgresql://", "postgres://")):
        return PostgresStore(database, read_only)
    if not database:
        shown = f"--database {default_database()} (the default, under $LDMKIT_HOME)"
        return SQLiteStore(default_database(), shown, read_only)
    return SQLiteStore(Path(database).expanduser(), f"--database {database}", read_only)


class Executor:
    """Runs statements inside one write transaction; `?` placeholders, rows back as dicts."""

    def __init__(self, store: Store, conn):
        self._store, self._conn = store, conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> list[dict]:
        return self._store._execute(self._conn, sql, args)


class Store:
    """Keys, usage and audit tables in one database, usable from any number of threads (one connection each).

    Subclasses provide _connect, _execute, _begin, _end and _usable; `shown` names the database in messages."""

    kind = ""

    def __init__(self, shown: str, read_only: bool = False):
        self.shown = shown  # "--database VALUE", a password masked
        self.read_only = read_only  # opened only to read: no tables created, every write refused
        self._conns: dict[int, Any] = {}  # thread id -> connection
        self._lock = threading.Lock()
        self._closed = False

    # --- the API keys and audit use -----------------------------------------------------------------------------
    def query(self, sql: str, args: Sequence[Any] = ()) -> list[dict]:
        """The rows of one read statement, as dicts."""
        return self._execute(self._conn(), sql, args)

    @contextmanager
    def write(self, lock: bool = False) -> Iterator[Executor]:
        """One transaction, committed when the block ends (durably) and rolled back if it raises. lock=True
        serializes it with every other locked write of every process (SQLite serializes all writes anyway)."""
        if self.read_only:
            raise RuntimeError(f"the store of {self.shown} was opened read-only; open it without read_only to write")
        conn = self._conn()
        try:
            self._begin(conn, lock)
            yield Executor(self, conn)
            self._end(conn, commit=True)
        except BaseException:
            try:
                self._end(conn, commit=False)
            except Exception:
                pass  # the connection is gone, and its transaction with it; the first error says why
            raise

    def close(self) -> None:
        """Close every thread's connection; the store cannot be used afterwards."""
        with self._lock:
            self._closed = True
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- connections ----------------------------------------------------------------------------------------------
    def _conn(self):
        """This thread's connection, opened on first use (and again after a PostgreSQL connection broke)."""
        ident = threading.get_ident()
        conn = self._conns.get(ident)
        if conn is not None and self._usable(conn):
            return conn
        with self._lock:
            if self._closed:
                raise RuntimeError(f"the store of {self.shown} was closed; open a new one with open_store")
            alive = {t.ident for t in threading.enumerate()}
            for dead in [i for i in self._conns if i not in alive or i == ident]:
                self._conns.pop(dead).close()  # threads that ended, or this thread's broken connection
            conn = self._conns[ident] = self._connect()
        return conn

    def _create_tables(self) -> None:
        with self.write(lock=True) as db:
            for statement in SCHEMA:
                db.execute(statement)

    def _missing_tables(self, found: set[str]) -> None:
        """InputError unless `found` (the tables a read-only open sees) holds every table the read commands use."""
        missing = [t for t in READ_TABLES if t not in found]
        if missing:
            self.close()
            raise InputError(
                f"{self.shown} has no {', '.join(missing)} table, so it is not an ldmkit database; give the database "
                f"that `ldmkit serve` uses (a read-only command creates nothing)"
            )


class SQLiteStore(Store):
    """A SQLite file in WAL mode, shared safely by the threads and processes of one machine."""

    kind = "sqlite"

    def __init__(self, path: Path, shown: str, read_only: bool = False):
        super().__init__(shown, read_only)
        self.path = path
        if path.is_dir():
            raise InputError(f"{shown} is a folder; name a file in it instead, such as {path / 'ldmkit.db'}")
        if read_only:
            self._open_read_only()
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(
                f"{shown}: its folder {path.parent} cannot be created ({e.strerror or e}); "
                f"give a path in a writable folder"
            ) from None
        try:
            self._create_tables()
        except sqlite3.DatabaseError as e:
            self.close()
            if "not a database" in str(e):
                raise InputError(
                    f"{shown} is not a SQLite database (the file holds something else); "
                    f"give a new file name or the path of an ldmkit database"
                ) from None
            raise InputError(f"{shown} cannot be used as a SQLite database ({e}); check that it is writable") from None

    def _open_read_only(self) -> None:
        """Check that the file exists, can be read and holds the ldmkit tables; nothing is created or written."""
        if not self.path.exists():
            raise InputError(
                f"{self.shown} does not exist; give the path of the database `ldmkit serve` writes (this command "
                f"only reads; `ldmkit keys create` or `ldmkit serve` makes a new one)"
            )
        wal, journal = Path(f"{self.path}-wal"), Path(f"{self.path}-journal")
        # No log beside the file: no process has it open, and immutable=1 reads it creating no -wal or -shm file.
        self._immutable = not (wal.exists() or journal.exists())
        try:
            try:
                found = self._table_names()
            except sqlite3.OperationalError:
                # mode=ro reads a write-ahead log through a -shm file, created when missing. Where it cannot be (a
                # read-only folder), an empty log holds no rows to miss, so the file is read as immutable instead.
                if self._immutable or _size(wal) > 0 or _size(journal) > 0:
                    raise
                broken = self._conns.pop(threading.get_ident(), None)
                if broken is not None:
                    broken.close()
                self._immutable = True
                found = self._table_names()
        except sqlite3.DatabaseError as e:
            self.close()
            raise self._unreadable(e, wal) from None
        self._missing_tables(found)

    def _table_names(self) -> set[str]:
        return {r["name"] for r in self.query("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def _unreadable(self, error: sqlite3.DatabaseError, wal: Path) -> InputError:
        """The InputError of a read-only open that failed with `error`, saying what to do."""
        if "not a database" in str(error):
            return InputError(
                f"{self.shown} is not a SQLite database (the file holds something else); "
                f"give the path of the database `ldmkit serve` writes"
            )
        if _size(wal) > 0:
            return InputError(
                f"{self.shown} has a write-ahead log ({wal.name}, {_size(wal)} bytes) holding rows not yet in the "
                f"file, and SQLite reads it only where it may create {self.path.name}-shm beside it, which this "
                f"folder does not allow ({error}); copy {self.path.name} and {wal.name} together to a writable "
                f"folder and give that copy"
            )
        return InputError(f"{self.shown} cannot be read as a SQLite database ({error}); check that it can be read")

    def _connect(self):
        if self.read_only:  # SQLite refuses writes itself (root's too); see _open_read_only for immutable=1
            uri = f"{self.path.resolve().as_uri()}?mode=ro{'&immutable=1' if self._immutable else ''}"
            conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        else:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            if self.read_only:
                conn.execute("PRAGMA query_only = 1")  # a second guard, in SQLite's own words
            else:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _usable(conn) -> bool:
        return True

    def _execute(self, conn, sql: str, args: Sequence[Any]) -> list[dict]:
        try:
            cursor = conn.execute(sql, tuple(args))
        except sqlite3.IntegrityError as e:
            if "UNIQUE" in str(e):
                raise Conflict(str(e)) from None
            raise
        return [dict(r) for r in cursor.fetchall()] if cursor.description else []

    @staticmethod
    def _begin(conn, lock: bool) -> None:
        conn.execute("BEGIN IMMEDIATE")  # takes the write lock now, not at the first write: no upgrade deadlocks

    @staticmethod
    def _end(conn, commit: bool) -> None:
        if conn.in_transaction:
            conn.execute("COMMIT" if commit else "ROLLBACK")


def _size(path: Path) -> int:
    """The size of the file at `path` in bytes, 0 when there is none."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _masked(url: str) -> str:
    """`url` with its password, if any, replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class PostgresStore(Store):
    """A PostgreSQL database through psycopg 3, shared by any number of server replicas."""

    kind = "postgresql"

    def __init__(self, url: str, read_only: bool = False):
        super().__init__(f"--database {_masked(url)}", read_only)
        try:
            import psycopg
        except ImportError:
            raise MissingDependencyError(
                f"{self.shown} needs psycopg 3; install it with pip install 'psycopg[binary]' "
                f"(or ldmkit[serve]), or give a SQLite path instead"
            ) from None
        self._psycopg, self.url = psycopg, url
        try:
            if read_only:
                names = self.query(
                    "SELECT to_regclass('keys') AS keys, to_regclass('usage') AS usage, to_regclass('audit') AS audit"
                )[0]
                found = {name for name, regclass in names.items() if regclass is not None}
            else:
                self._create_tables()
        except psycopg.Error as e:
            self.close()
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InputError(
                f"{self.shown}: cannot use this PostgreSQL database ({first}); check that the server runs and that "
                f"the URL's host, port, user, password and database name are right"
            ) from None
        if read_only:
            self._missing_tables(found)

    def _connect(self):
        from psycopg.rows import dict_row

        conn = self._psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=CONNECT_TIMEOUT_S)
        if self.read_only:  # every statement of the session runs in a read-only transaction
            conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        return conn

    @staticmethod
    def _usable(conn) -> bool:
        return not (conn.closed or conn.broken)

    def _execute(self, conn, sql: str, args: Sequence[Any]) -> list[dict]:
        sql = sql.replace("%", "%%").replace("?", "%s")  # psycopg's placeholders; a literal % doubled
        try:
            cursor = conn.execute(sql, tuple(args))
        except self._psycopg.errors.UniqueViolation as e:
            raise Conflict(str(e)) from None
        return cursor.fetchall() if cursor.description else []

    @staticmethod
    def _begin(conn, lock: bool) -> None:
        conn.execute("BEGIN")
        if lock:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))  # released by COMMIT or ROLLBACK

    def _end(self, conn, commit: bool) -> None:
        if conn.closed or conn.broken:
            return
        conn.execute("COMMIT" if commit else "ROLLBACK")
