"""Image reservations: the images of a key's daily count held for a request that is not answered yet, in the
store's `reservations` table, so that a process killed before it answered (kill -9, a power cut) leaves a record
of what it charged. auth.Keys counts the images and calls these; the table is created on first use, so read-only
commands never need it.

A reservation is settled (its row deleted, the images stay counted) once its request is served, and released (row
deleted, images given back) when it fails. `reconcile`, run when a server starts and every RECONCILE_S seconds by a
reserving process, gives back the open reservations whose holder is known to be gone (a process of this machine
that no longer exists) or whose expiry passed (a request never lives that long). Their rows stay a day, marked
returned, so that a request wrongly judged dead counts its images again when it settles.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass

from .store import Store

HOLD_S = 3600.0  # default life of a reservation; past it, reconcile gives the images back
RECONCILE_S = 60.0  # how often a reserving process also gives back the reservations of dead requests
KEEP_S = 86400.0  # how long a returned reservation's row stays, for a late settle
HOST = socket.gethostname()  # with the process id and PROCESS, who holds a reservation
PROCESS = secrets.token_hex(8)  # tells this process from an earlier one with the same id (a container's pid 1)
TABLE = """CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY, key_id TEXT NOT NULL, day TEXT NOT NULL, images BIGINT NOT NULL, holder TEXT NOT NULL,
    expires DOUBLE PRECISION NOT NULL, returned TEXT)"""  # returned: when reconcile gave the images back


@dataclass(frozen=True)
class Reservation:
    """Images of a key's daily count held for a request that is not answered yet (a row in `reservations`)."""

    id: str
    key_id: str
    day: str  # the UTC day whose count holds the images
    images: int


def create_table(store: Store) -> None:
    with store.write(lock=True) as db:
        db.execute(TABLE)


def hold(db, held: Reservation, hold_s: float) -> None:
    """Record `held` (whose images the same transaction counted) as open for `hold_s` seconds."""
    db.execute(
        "INSERT INTO reservations (id, key_id, day, images, holder, expires) VALUES (?, ?, ?, ?, ?, ?)",
        (held.id, held.key_id, held.day, held.images, holder(), time.time() + hold_s),
    )


def settle(store: Store, held: Reservation) -> None:
    """Close `held`, its images counted: counted again when reconcile had given them back; nothing when closed."""
    with store.write() as db:
        gone = db.execute("DELETE FROM reservations WHERE id = ? RETURNING returned", (held.id,))
        if gone and gone[0]["returned"] is not None:
            db.execute(
                "INSERT INTO usage (key_id, day, images) VALUES (?, ?, ?) ON CONFLICT (key_id, day)"
                " DO UPDATE SET images = usage.images + excluded.images",
                (held.key_id, held.day, held.images),
            )


def release(store: Store, held: Reservation) -> bool:
    """Close `held` and give its images back; False (nothing given) when it was closed or given back already."""
    with store.write() as db:
        gone = db.execute("DELETE FROM reservations WHERE id = ? RETURNING returned", (held.id,))
        if not gone or gone[0]["returned"] is not None:
            return False
        uncount(db, held.key_id, held.day, held.images)
    return True


def reconcile(store: Store, stamp: str) -> int:
    """Give back the images of the open reservations whose holder is gone or whose expiry passed, marking them
    returned at `stamp` (an ISO time); drop returned rows older than KEEP_S. How many were given back."""
    now = time.time()
    with store.write(lock=True) as db:
        db.execute("DELETE FROM reservations WHERE returned IS NOT NULL AND expires < ?", (now,))
        open_ = db.execute("SELECT id, key_id, day, images, holder, expires FROM reservations WHERE returned IS NULL")
        dead = [r for r in open_ if r["expires"] < now or gone(r["holder"])]
        for r in dead:
            uncount(db, r["key_id"], r["day"], r["images"])
            db.execute("UPDATE reservations SET returned = ?, expires = ? WHERE id = ?", (stamp, now + KEEP_S, r["id"]))
    return len(dead)


def uncount(db, key_id: str, day: str, n: int) -> None:
    """Take `n` images off the key's count of `day`, never below zero."""
    db.execute(
        "UPDATE usage SET images = CASE WHEN images > ? THEN images - ? ELSE 0 END WHERE key_id = ? AND day = ?",
        (n, n, key_id, day),
    )


def holder() -> str:
    """Who holds a reservation made now: this machine, process id and process token."""
    return f"{HOST} {os.getpid()} {PROCESS}"


def gone(who: str) -> bool:
    """Whether the process holding a reservation is known to be gone: it ran on this machine, and no process has
    its id now (or this process has it, but was not it). A process of another machine is never known gone."""
    host, _, rest = who.partition(" ")
    pid, _, process = rest.partition(" ")
    if host != HOST or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return process != PROCESS
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists, under another user
        return False
    return False
