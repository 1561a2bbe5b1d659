"""API keys, roles, request rates and daily image quotas of `ldmkit serve`. No HTTP here: the app passes the
Authorization header in and turns an AuthError into its status.

A key is `ldk_<key id>_<secret part>`, shown once when created. The store keeps only the key id, a random salt and
the salted scrypt hash of the whole key, so a copy of the database lets nobody in. Verifying a key costs about
50 ms of scrypt, so a successful verification is remembered in this process's memory, under the SHA-256 of the
presented key; the key's row is still read on every request, so a revocation takes effect at once in every process
that shares the database. Rates are counted per process (a sliding window); daily image quotas are counted in the
store, so replicas share them.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import math
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from ..errors import InputError, LdmkitError
from .store import Conflict, Store

ROLES = ("viewer", "user", "admin")  # each role may do what the roles before it may
PREFIX = "ldk"
SCRYPT = dict(n=2**14, r=8, p=1, dklen=32)  # about 50 ms and 16 MiB per verification
KEY_RE = re.compile(r"ldk_([0-9a-f]{12})_([A-Za-z0-9-]{43})")  # key id: 6 random bytes; secret: 32 (base64url)
CACHE_SIZE = 4096  # verified keys remembered per process
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
    """A request refused for who sent it. status: 401 (no valid key), 403 (role too low) or 429 (rate or quota);
    reason: a short code ("missing key", "bad key", "revoked key", "role", "rate", "quota"); retry_after: whole
    seconds after which the same request may succeed, or None. The message never contains the key."""

    def __init__(self, message: str, status: int, reason: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.reason, self.retry_after = status, reason, retry_after


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


class Keys:
    """API keys and their limits, kept in `store`. One instance per process serves any number of threads."""

    def __init__(self, store: Store):
        self.store = store
        self._verified: collections.OrderedDict[bytes, str] = collections.OrderedDict()  # sha256(key) -> hash
        self._windows: dict[str, collections.deque[float]] = {}  # key id -> times of recent requests
        self._lock = threading.Lock()

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
        return _principal(rows[0])

    # --- who is asking ------------------------------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> Principal:
        """The Principal of the key in an Authorization header; AuthError 401 for a missing, malformed, unknown,
        wrong or revoked key. The key's row is read every time, so revocations apply at once."""
        key = _presented_key(authorization)
        rows = self.store.query("SELECT * FROM keys WHERE id = ?", (KEY_RE.fullmatch(key).group(1),))
        if not rows or not self._matches(key, rows[0]):
            raise AuthError("this API key is not valid on this server; ask an admin for a key", 401, "bad key")
        row = rows[0]
        if row["revoked"]:
            raise AuthError(
                f"key {row['name']} was revoked at {row['revoked']}; ask an admin for a new key", 401, "revoked key"
            )
        return _principal(row)

    def _matches(self, key: str, row: dict) -> bool:
        """Whether `key` hashes to the row's hash: from this process's memory of earlier successes, else scrypt."""
        seen = hashlib.sha256(key.encode()).digest()
        with self._lock:
            remembered = self._verified.get(seen)
        if remembered is not None and hmac.compare_digest(remembered, row["hash"]):
            return True
        if not hmac.compare_digest(_scrypt(key, bytes.fromhex(row["salt"])), row["hash"]):
            return False
        with self._lock:
            self._verified[seen] = row["hash"]
            while len(self._verified) > CACHE_SIZE:
                self._verified.popitem(last=False)
        return True

    @staticmethod
    def require(principal: Principal, role: str) -> None:
        """AuthError 403 unless `principal`'s role is `role` or one after it in ROLES."""
        _check_role(role, "role")
        if ROLES.index(principal.role) < ROLES.index(role):
            raise AuthError(
                f"key {principal.name} has role {principal.role}; this needs role {role} or above", 403, "role"
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
            times = self._windows.setdefault(principal.key_id, collections.deque())
            while times and times[0] <= now - window:
                times.popleft()
            if len(times) >= allowed:
                wait = max(1, math.ceil(times[0] + window - now))
                raise AuthError(
                    f"key {principal.name} may send {rate:g} requests a minute; retry in {wait} s", 429, "rate", wait
                )
            times.append(now)

    def reserve_images(self, principal: Principal, n: int) -> None:
        """Count `n` images against today's (UTC) count of the key, atomically in the store, or refuse them with
        AuthError 429 (retry_after: seconds to 00:00 UTC) when they would pass the key's images_per_day. Keys
        without a quota are counted too (`keys list` shows it)."""
        _check_count(n)
        quota, now = principal.images_per_day, utc_now()
        if quota is not None and n > quota:
            raise AuthError(
                f"this request asks for {n} images, more than the {quota} a day of key {principal.name}; "
                f"ask for at most {quota}",
                429,
                "quota",
            )
        day, within = now.date().isoformat(), "" if quota is None else " WHERE usage.images + excluded.images <= ?"
        with self.store.write() as db:
            counted = db.execute(
                "INSERT INTO usage (key_id, day, images) VALUES (?, ?, ?) ON CONFLICT (key_id, day)"
                f" DO UPDATE SET images = usage.images + excluded.images{within} RETURNING images",
                (principal.key_id, day, n) + (() if quota is None else (quota,)),
            )
            used = counted or db.execute(
                "SELECT images FROM usage WHERE key_id = ? AND day = ?", (principal.key_id, day)
            )
        if not counted:
            wait = seconds_to_midnight(now)
            raise AuthError(
                f"key {principal.name} has used {used[0]['images']} of its {quota} images today; this request asks "
                f"for {n} more; the count restarts at 00:00 UTC, in {wait // 3600} h {wait % 3600 // 60} min",
                429,
                "quota",
                wait,
            )

    def release_images(self, principal: Principal, n: int) -> None:
        """Give back `n` images reserved today for a request that failed or was cancelled (never below zero)."""
        _check_count(n)
        with self.store.write() as db:
            db.execute(
                "UPDATE usage SET images = CASE WHEN images > ? THEN images - ? ELSE 0 END"
                " WHERE key_id = ? AND day = ?",
                (n, n, principal.key_id, utc_now().date().isoformat()),
            )


def _check_count(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"an image count must be a whole number of at least 0, not {n!r}")


def _stamp() -> str:
    """Now, UTC, to the second, in ISO 8601."""
    return utc_now().isoformat(timespec="seconds")
