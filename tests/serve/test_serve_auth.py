"""API keys of `ldmkit serve`: only hashes stored, Bearer and Basic, revocation at once, roles, rates, shared
quotas, the store's refusals, and the `ldmkit keys` command."""

from __future__ import annotations

import argparse
import base64
import hashlib
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from ldmkit.cli.serve import add_audit_command, add_keys_command
from ldmkit.errors import InputError
from ldmkit.serve import auth
from ldmkit.serve.auth import ROLES, AuthError, Keys, Principal, seconds_to_midnight
from ldmkit.serve.store import open_store


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "keys.db")


@pytest.fixture
def keys(db):
    store = open_store(db)
    yield Keys(store)
    store.close()


def run_command(argv: list[str]) -> int:
    """Parse `argv` the way `ldmkit` does (a --debug parent on every command) and run it."""
    parser = argparse.ArgumentParser()
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    add_keys_command(sub, common)
    add_audit_command(sub, common)
    args = parser.parse_args(argv)
    return args.fn(args)


def refused(fn, *args) -> AuthError:
    with pytest.raises(AuthError) as info:
        fn(*args)
    return info.value


def test_keys_are_created_listed_and_revoked(keys):
    secret, alice = keys.create("alice", "user", images_per_day=10, rate_per_min=30)
    assert secret.startswith(f"ldk_{alice.key_id}_") and secret.count("_") == 2
    assert alice == Principal(alice.key_id, "alice", "user", 10, 30.0)
    keys.create("bob", "viewer")
    listed = {k["name"]: k for k in keys.list()}
    assert set(listed) == {"alice", "bob"}
    assert set(listed["alice"]) == {"id", "name", "role", "images_per_day", "rate_per_min", "created", "revoked"} | {
        "images_today"
    }
    assert listed["bob"]["images_per_day"] is None and listed["bob"]["revoked"] is None
    with pytest.raises(InputError, match="alice.*exists already"):
        keys.create("alice", "admin")
    assert keys.revoke(alice.key_id).name == "alice"  # by id
    assert keys.revoke("bob").key_id == listed["bob"]["id"]  # by name
    assert all(k["revoked"] for k in keys.list())
    with pytest.raises(InputError, match="'carol'"):
        keys.revoke("carol")


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(name="", role="user"), "--name"),
        (dict(name="a\nb", role="user"), "--name"),
        (dict(name="0123456789ab", role="user"), "--name"),
        (dict(name="x", role="root"), "--role"),
        (dict(name="x", role="user", images_per_day=-1), "--images-per-day"),
        (dict(name="x", role="user", rate_per_min=0), "--rate"),
        (dict(name="x", role="user", rate_per_min=float("nan")), "--rate"),
    ],
)
def test_bad_key_settings_name_their_option(keys, kwargs, option):
    with pytest.raises(InputError, match=option):
        keys.create(**kwargs)


def test_only_a_salted_hash_is_stored(db, keys):
    secret, who = keys.create("alice", "admin")
    row = sqlite3.connect(db).execute("SELECT salt, hash FROM keys WHERE id = ?", (who.key_id,)).fetchone()
    salt = bytes.fromhex(row[0])
    assert len(salt) == 16 and row[1] == hashlib.scrypt(secret.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32).hex()
    stored = b"".join(p.read_bytes() for p in (keys.store.path.parent).iterdir())  # the file, its WAL and index
    assert secret.encode() not in stored and secret.split("_")[2].encode() not in stored


def test_bearer_and_basic_carry_the_key(keys):
    secret, who = keys.create("alice", "user")
    basic = base64.b64encode(f"anyone:{secret}".encode()).decode()
    for header in (f"Bearer {secret}", f"bearer  {secret} ", f"Basic {basic}"):
        assert keys.authenticate(header) == who
    wrong = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    unknown = f"ldk_{'0' * 12}_{secret.split('_')[2]}"
    cases = [
        (None, "missing key"),
        ("   ", "missing key"),
        (f"Token {secret}", "bad key"),
        ("Bearer not-a-key", "bad key"),
        ("Basic %%%", "bad key"),
        ("Basic " + base64.b64encode(secret.encode()).decode(), "bad key"),  # no user:
        (f"Bearer {wrong}", "bad key"),
        (f"Bearer {unknown}", "bad key"),
    ]
    for header, reason in cases:
        err = refused(keys.authenticate, header)
        assert (err.status, err.reason) == (401, reason), header
        assert secret not in str(err) and secret.split("_")[2] not in str(err)


def test_revocation_applies_at_once_despite_the_cache(db, keys, monkeypatch):
    secret, _ = keys.create("alice", "user")
    calls = []
    scrypt = auth._scrypt
    monkeypatch.setattr(auth, "_scrypt", lambda *a: calls.append(1) or scrypt(*a))
    keys.authenticate(f"Bearer {secret}")
    keys.authenticate(f"Bearer {secret}")
    assert len(calls) == 1  # the second verification came from memory
    with open_store(db) as other:  # another process's view of the same database
        Keys(other).revoke("alice")
    err = refused(keys.authenticate, f"Bearer {secret}")
    assert (err.status, err.reason) == (401, "revoked key") and len(calls) == 1


def test_roles_are_ordered():
    for have in ROLES:
        who = Principal("id", "k", have, None, None)
        for need in ROLES:
            if ROLES.index(have) >= ROLES.index(need):
                Keys.require(who, need)
            else:
                err = refused(Keys.require, who, need)
                assert err.status == 403 and err.reason == "role" and need in str(err)


def test_rate_limit_is_a_sliding_window(keys, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: clock[0])
    who = Principal("id", "k", "user", None, 2.0)
    keys.check_rate(who)
    clock[0] += 20
    keys.check_rate(who)
    err = refused(keys.check_rate, who)
    assert (err.status, err.reason, err.retry_after) == (429, "rate", 40)  # the first request leaves at 1060
    clock[0] += 40
    keys.check_rate(who)  # refused requests did not count
    slow = Principal("id2", "s", "user", None, 0.5)  # one request per 120 s
    keys.check_rate(slow)
    clock[0] += 119.5
    assert refused(keys.check_rate, slow).retry_after == 1
    clock[0] += 0.5
    keys.check_rate(slow)
    keys.check_rate(Principal("id3", "u", "user", None, None))  # no rate: never refused


def test_daily_quota_is_shared_between_stores(db, keys, monkeypatch):
    _, who = keys.create("alice", "user", images_per_day=5)
    with open_store(db) as other_store:
        other = Keys(other_store)
        keys.reserve_images(who, 3)
        now = datetime.now(timezone.utc)
        err = refused(other.reserve_images, who, 3)
        assert (err.status, err.reason) == (429, "quota")
        assert 0 <= seconds_to_midnight(now) - err.retry_after <= 2
        other.reserve_images(who, 2)
        assert [k["images_today"] for k in other.list()] == [5]
        keys.release_images(who, 2)
        other.reserve_images(who, 2)
        err = refused(keys.reserve_images, who, 6)
        assert err.reason == "quota" and err.retry_after is None  # waiting would not help
        tomorrow = datetime.now(timezone.utc) + timedelta(days=1)
        monkeypatch.setattr(auth, "utc_now", lambda: tomorrow)
        other.reserve_images(who, 5)  # a new UTC day, a new count


def test_seconds_to_midnight():
    assert seconds_to_midnight(datetime(2025, 3, 1, 0, 0, 0, tzinfo=timezone.utc)) == 86400
    assert seconds_to_midnight(datetime(2025, 3, 1, 23, 59, 59, 500000, tzinfo=timezone.utc)) == 1
    assert seconds_to_midnight(datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)) == 43200


def test_bad_database_values_say_what_to_do(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(InputError, match=f"--database {blocker}/sub/k.db.*cannot be created"):
        open_store(str(blocker / "sub" / "k.db"))
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a SQLite file, just some text that is long enough" * 20)
    with pytest.raises(InputError, match=f"--database {junk} is not a SQLite database"):
        open_store(str(junk))
    with pytest.raises(InputError, match="is a folder"):
        open_store(str(tmp_path))
    with open_store(str(tmp_path / "new" / "folder" / "k.db")) as store:  # missing folders are created
        assert store.query("SELECT COUNT(*) AS n FROM keys") == [{"n": 0}]


def test_keys_command_on_the_default_database(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LDMKIT_HOME", str(tmp_path / "home"))
    assert run_command(["keys", "create", "--name", "ops", "--role", "admin", "--images-per-day", "7"]) == 0
    out, err = capsys.readouterr()
    secret = out.strip()
    assert secret.startswith("ldk_") and "shown only once" in err
    assert (tmp_path / "home" / "ldmkit.db").exists()
    assert run_command(["keys", "list"]) == 0
    out, _ = capsys.readouterr()
    assert "ops" in out and "admin" in out and " 7 " in out and secret not in out
    with open_store(None) as store:
        assert Keys(store).authenticate(f"Bearer {secret}").name == "ops"
    assert run_command(["keys", "revoke", "ops", "--database", str(tmp_path / "home" / "ldmkit.db")]) == 0
    assert "revoked key ops" in capsys.readouterr().out
    with pytest.raises(InputError, match="'nobody'"):
        run_command(["keys", "revoke", "nobody"])


def test_rate_option_takes_requests_a_minute_with_or_without_per_min():
    import argparse

    from ldmkit.cli.serve import rate_per_minute

    assert rate_per_minute("30/min") == rate_per_minute("30") == 30.0
    with pytest.raises(argparse.ArgumentTypeError, match="30/min"):
        rate_per_minute("fast")
