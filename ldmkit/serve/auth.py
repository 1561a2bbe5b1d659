"""API keys, roles, request rates and daily image quotas of `ldmkit serve`. No HTTP here: the app passes the
Authorization header and the client's address in and turns an AuthError into its status.

A key is `ldk_<key id>_<secret part>`, shown once when created. The store keeps only the key id, a random salt and
the salted scrypt hash of the whole key, so a copy of the database lets nobody in. Key ids are public (they appear
in `keys list` and the audit trail), so checking a secret must not be a way to stall the server:
- scrypt (about 50 ms of one core) runs on a small pool of its own threads (VERIFY_THREADS), never on the event
  loop; when VERIFY_WAITING verifications already wait for it, another is refused at once (429, "busy");
- failed verifications are limited per key id (FAILURES_PER_KEY) and per client address (FAILURES_PER_CLIENT) in
  any FAILURE_WINDOW_S seconds; past either, a presented secret is refused without being checked (429 with
  Retry-After, "too many failures"). An attempt counts from its start until it succeeds, so parallel guesses
  cannot overrun the limit. A key id under attack cannot be verified anew until the attack pauses, but a key
  this process verified in the last CACHE_TTL_S seconds keeps working;
- a successful verification is remembered in this process's memory for CACHE_TTL_S seconds, under a keyed
  BLAKE2b hash of the presented key (the key itself is not kept), so a valid key costs microseconds. The key's row
  is still read on every request, so a revocation takes effect at once in every process that shares the database,
  and revoking forgets what this process remembered of the key.
Rates are counted per process (a sliding window). Daily image quotas are counted in the store, so replicas share
them: a request reserves its images, settles them once served and gives them back when it fails; quota.py keeps
the reservations, and gives back those of a process killed before it answered.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import concurrent.futures
import hashlib
import hmac
import math
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from ..errors import InputError, LdmkitError
from . import quota as reservations
from .quota import HOLD_S, RECONCILE_S, Reservation
from .store import Conflict, Store

ROLES = ("viewer", "user", "admin")  # each role may do what the roles before it may
PREFIX = "ldk"
SCRYPT = dict(n=2**14, r=8, p=1, dklen=32)  # about 50 ms and 16 MiB per verification
KEY_RE = re.compile(r"ldk_([0-9a-f]{12})_([A-Za-z0-9-]{43})")  # key id: 6 random bytes; secret: 32 (base64url)
CACHE_SIZE = 4096  # verified keys remembered per process
CACHE_TTL_S = 300.0  # how long a verified key is remembered; after that it is verified again
VERIFY_THREADS = max(1, min(4, (os.cpu_count() or 2) // 2))  # scrypt verifications at once (16 MiB each)
VERIFY_WAITING = 64  # verifications that may wait for a verify thread; another is refused at once (429)
FAILURE_WINDOW_S = 60.0  # the sliding window of failed verifications
FAILURES_PER_KEY = 10  # failed verifications of one key id in the window; more are refused unchecked (429)
FAILURES_PER_CLIENT = 20  # failed verifications from one client address in the window, whatever the key ids
TRACKED = 10_000  # key ids and addresses whose recent requests are counted; the least recently seen are forgotten
NAME_MAX = 100


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: a key's id, name, role and limits (None: unlimited)."""

    key_id: str
    name: str
    role: str
    images_per_day: int | None
    rate_per_min: float | None


class AuthError(LdmkitError):
    """A request refused for who sent it. status: 401 (no valid key), 403 (role too low) or 429 (rate, quota, too
    many failed attempts, verifications busy); reason: a short code ("missing key", "bad key", "revoked key",
    "role", "rate", "quota", "too many failures", "busy"); retry_after: whole seconds after which the same request
    may succeed, or None; key_id, key_name: the presented key's id (when the header held a well-formed key) and
    name (when its secret was right), for the audit trail. The message never contains the key."""

    def __init__(
        self,
        message: str,
        status: int,
        reason: str,
        retry_after: int | None = None,
        key_id: str | None = None,
        key_name: str | None = None,
    ):
        super().__init__(message)
        self.status, self.reason, self.retry_after = status, reason, retry_after
        self.key_id, self.key_name = key_id, key_name


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def seconds_to_midnight(now: datetime) -> int:
    """Whole seconds from `now` (UTC) to the next 00:00 UTC, at least 1."""
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil((midnight - now).total_seconds()))


def _secret_part() -> str:
    """32 random bytes in base64url, drawn again while they contain "_" (about twice on average), so the key's
    three "_"-separated parts split unambiguously."""
    while "_" in (token := secrets.token_urlsafe(32)):
        pass
    return token


def _scrypt(key: str, salt: bytes) -> str:
    return hashlib.scrypt(key.encode(), salt=salt, **SCRYPT).hex()


def _presented_key(authorization: str | None) -> str:
    """The key in an Authorization header: `Bearer KEY`, or `Basic base64(user:KEY)` (the user name is ignored)."""
    how = "send `Authorization: Bearer KEY` or HTTP Basic auth with the key as password"
    if authorization is None or not authorization.strip():
        raise AuthError(f"this request carries no API key; {how}", 401, "missing key")
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        key = value
    elif scheme.lower() == "basic":
        try:
            _, colon, key = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            colon = ""
        if not colon:
            raise AuthError(f"the Basic credentials are not base64 of user:KEY; {how}", 401, "bad key")
    else:
        raise AuthError(f"the Authorization scheme is neither Bearer nor Basic; {how}", 401, "bad key")
    if not KEY_RE.fullmatch(key):
        raise AuthError(f"the API key is malformed (ldmkit keys look like ldk_ID_SECRET); {how}", 401, "bad key")
    return key


def _check_role(role: str, option: str = "--role") -> str:
    if role not in ROLES:
        raise InputError(f"{option} {role!r} is not a role; choose one of: {', '.join(ROLES)}")
    return role


def _check_new_key(name: str, role: str, images_per_day: int | None, rate_per_min: float | None) -> None:
    """Refuse a name, role or limit that `keys create` should not accept, naming the option to change."""
    if not isinstance(name, str) or not name.strip() or len(name) > NAME_MAX or not name.isprintable():
        raise InputError(f"--name {name!r}: give a printable name of 1 to {NAME_MAX} characters")
    if re.fullmatch(r"[0-9a-f]{12}", name):
        raise InputError(f"--name {name!r} looks like a key id (12 hex digits); add a letter beyond f")
    _check_role(role)
    if images_per_day is not None and (isinstance(images_per_day, bool) or not isinstance(images_per_day, int)):
        raise InputError(f"--images-per-day {images_per_day!r} is not a whole number; give one such as 100")
    if images_per_day is not None and images_per_day < 0:
        raise InputError(f"--images-per-day {images_per_day} is negative; give 0 or more, or leave it out")
    if rate_per_min is not None and not (isinstance(rate_per_min, (int, float)) and 0 < rate_per_min < math.inf):
        raise InputError(f"--rate {rate_per_min!r} must be a positive number of requests a minute, such as 60")


def _principal(row: dict) -> Principal:
    rate = row["rate_per_min"]
    return Principal(row["id"], row["name"], row["role"], row["images_per_day"], None if rate is None else rate)


class Windows:
    """Sliding window logs of event times, one per name (a key id, a client address), for at most TRACKED names
    (the least recently seen forgotten first). The caller holds a lock around every call."""

    def __init__(self):
        self._logs: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()

    def wait(self, name: str, allowed: int, window: float, now: float) -> int:
        """Whole seconds until one more event of `name` fits `allowed` in any `window` seconds; 0 when it fits now."""
        times = self._logs.get(name)
        if times is None:
            return 0
        while times and times[0] <= now - window:
            times.popleft()
        if len(times) < allowed:
            return 0
        return max(1, math.ceil(times[-allowed] + window - now))

    def add(self, name: str, now: float) -> None:
        self._logs.setdefault(name, collections.deque()).append(now)
        self._logs.move_to_end(name)
        while len(self._logs) > TRACKED:
            self._logs.popitem(last=False)

    def remove(self, name: str, stamp: float) -> None:
        """Take back one event of `name` at time `stamp` (an attempt that turned out not to be a failure)."""
        times = self._logs.get(name)
        if times is not None and stamp in times:
            times.remove(stamp)


@dataclass(frozen=True)
class Attempt:
    """A presented key that needs its scrypt verification: its row, and the failure counts it holds until then."""

    key: str
    key_id: str
    seen: bytes  # keyed hash of the key, where a success is remembered
    row: dict
    client: str | None
    stamp: float  # when it was counted against the key id's and the address's failures


BAD_KEY = "this API key is not valid on this server; ask an admin for a key"


class Keys:
    """API keys and their limits, kept in `store`. One instance per process serves any number of threads."""

    def __init__(self, store: Store):
        self.store = store
        self._verified: collections.OrderedDict[bytes, tuple[str, str, float]] = collections.OrderedDict()
        # ^ keyed hash of a verified key -> (key id, its stored hash, remembered until this time.monotonic())
        self._pepper = secrets.token_bytes(32)  # keys that hash: this process's memory holds no plain hash of a key
        self._windows = Windows()  # key id -> times of recent requests (check_rate)
        self._failed_keys, self._failed_clients = Windows(), Windows()  # failed verifications, by key id and address
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # the verify threads, started when needed
        self._waiting = 0  # verifications running or waiting on the pool
        self._table = False  # whether this process made sure the reservations table exists
        self._reconciled = -math.inf  # time.monotonic() of the last reconcile

    # --- managing keys ----------------------------------------------------------------------------------------
    def create(
        self, name: str, role: str, images_per_day: int | None = None, rate_per_min: float | None = None
    ) -> tuple[str, Principal]:
        """A new key: (the key itself, shown this once, its Principal). Names are unique, revoked keys' included."""
        _check_new_key(name, role, images_per_day, rate_per_min)
        key_id = secrets.token_hex(6)
        key = f"{PREFIX}_{key_id}_{_secret_part()}"
        salt = secrets.token_bytes(16)
        rate = None if rate_per_min is None else float(rate_per_min)
        row = (key_id, name, role, salt.hex(), _scrypt(key, salt), images_per_day, rate, _stamp())
        try:
            with self.store.write() as db:
                db.execute(
                    "INSERT INTO keys (id, name, role, salt, hash, images_per_day, rate_per_min, created)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
        except Conflict:
            raise InputError(
                f"a key named {name!r} exists already (names stay taken after a revocation, so audit rows name one "
                f"key); choose another --name"
            ) from None
        return key, Principal(key_id, name, role, images_per_day, rate)

    def list(self) -> list[dict]:
        """Every key: id, name, role, images_per_day, rate_per_min, created, revoked (time or None), images_today."""
        return self.store.query(
            "SELECT k.id, k.name, k.role, k.images_per_day, k.rate_per_min, k.created, k.revoked,"
            " COALESCE(u.images, 0) AS images_today FROM keys k"
            " LEFT JOIN usage u ON u.key_id = k.id AND u.day = ? ORDER BY k.created, k.name",
            (utc_now().date().isoformat(),),
        )

    def revoke(self, name_or_id: str) -> Principal:
        """Revoke a key (found by id first, then by name) for every process at once; revoking twice is harmless."""
        with self.store.write() as db:
            rows = db.execute("SELECT * FROM keys WHERE id = ?", (name_or_id,)) or db.execute(
                "SELECT * FROM keys WHERE name = ?", (name_or_id,)
            )
            if not rows:
                raise InputError(f"no key is named {name_or_id!r} or has that id; `ldmkit keys list` shows them")
            db.execute("UPDATE keys SET revoked = ? WHERE id = ? AND revoked IS NULL", (_stamp(), rows[0]["id"]))
        self._forget(rows[0]["id"])
        return _principal(rows[0])

    # --- who is asking ------------------------------------------------------------------------------------------
    def authenticate(self, authorization: str | None, client: str | None = None) -> Principal:
        """The Principal of the key in an Authorization header sent from address `client` (None: not counted per
        address); AuthError 401 for a missing, malformed, unknown, wrong or revoked key, 429 while its key id or
        address has too many recent failures. The key's row is read every time, so revocations apply at once.
        Verifies in the calling thread: a server awaits authenticate_async instead."""
        attempt = self.begin(authorization, client)
        if isinstance(attempt, Principal):
            return attempt
        return self.finish(attempt, self.verify(attempt))

    async def authenticate_async(self, authorization: str | None, client: str | None = None) -> Principal:
        """authenticate, with the scrypt verification on the verify threads so the event loop never waits for it;
        AuthError 429 ("busy") when VERIFY_WAITING verifications are already running or waiting."""
        attempt = self.begin(authorization, client)
        if isinstance(attempt, Principal):
            return attempt
        with self._lock:
            if self._waiting >= VERIFY_WAITING:
                self._not_a_failure(attempt)
                raise AuthError(
                    "the server is checking many keys at once; retry in 1 s", 429, "busy", 1, attempt.key_id
                )
            self._waiting += 1
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="ldmkit-verify")
        future = self._pool.submit(self.verify, attempt)
        future.add_done_callback(self._one_less_waiting)
        return self.finish(attempt, await asyncio.wrap_future(future))

    def begin(self, authorization: str | None, client: str | None = None) -> Principal | Attempt:
        """The quick part of authenticate: the Principal of a key remembered as verified, else the Attempt that
        scrypt must verify, counted against the failures of its key id and address (AuthError 429 when either
        has too many already, 401 for an unknown key id)."""
        key = _presented_key(authorization)
        key_id = KEY_RE.fullmatch(key).group(1)
        seen = hashlib.blake2b(key.encode(), key=self._pepper, digest_size=32).digest()
        now, rows = time.monotonic(), None
        with self._lock:
            known = seen in self._verified
        if known:  # the row still decides: revoked, or a new hash
            rows = self.store.query("SELECT * FROM keys WHERE id = ?", (key_id,))
            if rows and self._remembered(seen, rows[0], now):
                return self._admitted(rows[0])
        with self._lock:  # a refusal here reads no row: a flood costs the database nothing
            wait = self._failed_keys.wait(key_id, FAILURES_PER_KEY, FAILURE_WINDOW_S, now)
            if client is not None:
                wait = max(wait, self._failed_clients.wait(client, FAILURES_PER_CLIENT, FAILURE_WINDOW_S, now))
            if wait:
                raise AuthError(
                    f"too many failed attempts with key id {key_id} or from this address; check the key and retry in "
                    f"{wait} s",
                    429,
                    "too many failures",
                    wait,
                    key_id,
                )
            self._failed_keys.add(key_id, now)
            if client is not None:
                self._failed_clients.add(client, now)
        if rows is None:
            rows = self.store.query("SELECT * FROM keys WHERE id = ?", (key_id,))
        if not rows:
            raise AuthError(BAD_KEY, 401, "bad key", key_id=key_id)
        return Attempt(key, key_id, seen, rows[0], client, now)

    @staticmethod
    def verify(attempt: Attempt) -> bool:
        """Whether the presented key hashes to its row's hash: the slow part (scrypt), safe in any thread."""
        return hmac.compare_digest(_scrypt(attempt.key, bytes.fromhex(attempt.row["salt"])), attempt.row["hash"])

    def finish(self, attempt: Attempt, ok: bool) -> Principal:
        """The Principal of a verified attempt (remembered for CACHE_TTL_S unless revoked), or AuthError 401."""
        if not ok:
            raise AuthError(BAD_KEY, 401, "bad key", key_id=attempt.key_id)
        row = attempt.row
        with self._lock:
            self._not_a_failure(attempt)
            if not row["revoked"]:
                self._verified[attempt.seen] = (row["id"], row["hash"], time.monotonic() + CACHE_TTL_S)
                while len(self._verified) > CACHE_SIZE:
                    self._verified.popitem(last=False)
        return self._admitted(row)

    def _admitted(self, row: dict) -> Principal:
        """The Principal of a key whose secret was right; AuthError 401 (with its id and name) when it was revoked."""
        if row["revoked"]:
            self._forget(row["id"])
            raise AuthError(
                f"key {row['name']} was revoked at {row['revoked']}; ask an admin for a new key",
                401,
                "revoked key",
                key_id=row["id"],
                key_name=row["name"],
            )
        return _principal(row)

    def _remembered(self, seen: bytes, row: dict, now: float) -> bool:
        """Whether this process verified the key hashed to `seen` against this row less than CACHE_TTL_S ago."""
        with self._lock:
            entry = self._verified.get(seen)
            if entry is None:
                return False
            key_id, stored, until = entry
            if until > now and key_id == row["id"] and hmac.compare_digest(stored, row["hash"]):
                return True
            del self._verified[seen]
            return False

    def _forget(self, key_id: str) -> None:
        """Drop what this process remembers of key `key_id`'s verifications (it was revoked)."""
        with self._lock:
            for seen in [s for s, entry in self._verified.items() if entry[0] == key_id]:
                del self._verified[seen]

    def _not_a_failure(self, attempt: Attempt) -> None:
        """Take back the failure counts of an attempt that succeeded or was never checked; call with the lock."""
        self._failed_keys.remove(attempt.key_id, attempt.stamp)
        if attempt.client is not None:
            self._failed_clients.remove(attempt.client, attempt.stamp)

    def _one_less_waiting(self, _future) -> None:
        with self._lock:
            self._waiting -= 1

    @staticmethod
    def require(principal: Principal, role: str) -> None:
        """AuthError 403 unless `principal`'s role is `role` or one after it in ROLES."""
        _check_role(role, "role")
        if ROLES.index(principal.role) < ROLES.index(role):
            raise AuthError(
                f"key {principal.name} has role {principal.role}; this needs role {role} or above",
                403,
                "role",
                key_id=principal.key_id,
                key_name=principal.name,
            )

    # --- limits -------------------------------------------------------------------------------------------------
    def check_rate(self, principal: Principal) -> None:
        """Count one request against the key's rate, or refuse it with AuthError 429.

        Sliding window log: at most c = max(1, floor(rate)) requests in any window of w = 60 * c / rate seconds,
        which is `rate` a minute on average and also bounds rates below one a minute. Refused requests do not count.
        """
        rate = principal.rate_per_min
        if rate is None:
            return
        allowed = max(1, math.floor(rate))
        window = 60.0 * allowed / rate
        now = time.monotonic()
        with self._lock:
            wait = self._windows.wait(principal.key_id, allowed, window, now)
            if wait:
                raise AuthError(
                    f"key {principal.name} may send {rate:g} requests a minute; retry in {wait} s",
                    429,
                    "rate",
                    wait,
                    principal.key_id,
                    principal.name,
                )
            self._windows.add(principal.key_id, now)

    # --- daily image quotas -----------------------------------------------------------------------------------------
    def reserve_images(self, principal: Principal, n: int, hold_s: float = HOLD_S) -> Reservation:
        """Count `n` images against today's (UTC) count of the key and record them as reserved for a request not
        yet answered, atomically in the store; or refuse them with AuthError 429 (retry_after: seconds to 00:00
        UTC) when they would pass the key's images_per_day. Keys without a quota are counted too (`keys list`
        shows it). settle() keeps the count once the request is served, release() gives it back when it fails;
        after hold_s seconds without either, reconcile() gives it back (make it longer than a request can live)."""
        _check_count(n)
        quota, now = principal.images_per_day, utc_now()
        if quota is not None and n > quota:
            raise AuthError(
                f"this request asks for {n} images, more than the {quota} a day of key {principal.name}; "
                f"ask for at most {quota}",
                429,
                "quota",
                key_id=principal.key_id,
                key_name=principal.name,
            )
        if time.monotonic() - self._reconciled > RECONCILE_S:
            self.reconcile()
        held = Reservation(secrets.token_hex(16), principal.key_id, now.date().isoformat(), n)
        within = "" if quota is None else " WHERE usage.images + excluded.images <= ?"
        with self.store.write() as db:
            counted = db.execute(
                "INSERT INTO usage (key_id, day, images) VALUES (?, ?, ?) ON CONFLICT (key_id, day)"
                f" DO UPDATE SET images = usage.images + excluded.images{within} RETURNING images",
                (principal.key_id, held.day, n) + (() if quota is None else (quota,)),
            )
            if counted:
                reservations.hold(db, held, hold_s)
            used = counted or db.execute(
                "SELECT images FROM usage WHERE key_id = ? AND day = ?", (principal.key_id, held.day)
            )
        if not counted:
            wait = seconds_to_midnight(now)
            raise AuthError(
                f"key {principal.name} has used {used[0]['images']} of its {quota} images today; this request asks "
                f"for {n} more; the count restarts at 00:00 UTC, in {wait // 3600} h {wait % 3600 // 60} min",
                429,
                "quota",
                wait,
                principal.key_id,
                principal.name,
            )
        return held

    def settle(self, held: Reservation) -> None:
        """The request was served: its images stay counted (counted again if reconcile gave them back meanwhile).
        Settling twice counts nothing more."""
        reservations.settle(self.store, held)

    def release(self, held: Reservation) -> bool:
        """The request failed or was cancelled: give its images back. True when they were given back now; False
        when the reservation was settled or given back already."""
        return reservations.release(self.store, held)

    def release_images(self, principal: Principal, n: int, day: str | None = None) -> None:
        """Give back `n` images counted on `day` (default today, UTC) for a request that was settled and then
        failed to be answered (never below zero)."""
        _check_count(n)
        with self.store.write() as db:
            reservations.uncount(db, principal.key_id, day or utc_now().date().isoformat(), n)

    def reconcile(self) -> int:
        """Give back the images of open reservations whose request can no longer be answered (quota.reconcile);
        how many reservations were given back."""
        if not self._table:
            reservations.create_table(self.store)
            self._table = True
        self._reconciled = time.monotonic()
        return reservations.reconcile(self.store, _stamp())


def _check_count(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"an image count must be a whole number of at least 0, not {n!r}")


def _stamp() -> str:
    """Now, UTC, to the second, in ISO 8601."""
    return utc_now().isoformat(timespec="seconds")
