"""`ldmkit serve` (serve models over HTTP), `ldmkit keys` (create, list, revoke its API keys) and `ldmkit audit`
(verify, anchor, export, tail its audit trail). Each command function takes the parsed arguments and returns an exit
status. `keys list`, `audit verify`, `audit anchor`, `audit export` and `audit tail` (without --follow) open the
database read-only, so they work on an archived copy and change nothing in it."""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ..errors import InputError, OutputExistsError
from .options import command, database_option, set_option

POLL_S = 1.0  # how often `audit tail --follow` looks for new rows
ROLE_HELP = "viewer: list models and jobs; user: also generate; admin: also keys, audit and metrics"


def add(sub, common: argparse.ArgumentParser) -> None:
    command(
        sub,
        common,
        "serve",
        "serve models over HTTP: OpenAI and AUTOMATIC1111 APIs, jobs, keys, audit, a web page",
        cmd_serve,
        _serve_options,
    )
    add_keys_command(sub, common)
    add_audit_command(sub, common)


def _serve_options(p: argparse.ArgumentParser):
    from ..config import BACKENDS, SAMPLING_PRECISIONS  # runtime's, without importing torch

    p.add_argument(
        "--model",
        action="append",
        help="a shipped model's name or a model.safetensors (repeatable; default: the shipped models)",
    )
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument(
        "--database", help="keys and audit: a SQLite file or a postgresql:// URL (default: under $LDMKIT_HOME)"
    )
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    p.add_argument(
        "--precision",
        choices=SAMPLING_PRECISIONS,
        help="what every request's sampling steps compute in: fp32, bf16 (autocast; refused at start where the CPU "
        "or GPU has no native bf16) or auto (bf16 where native, else fp32) (default fp32)",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        help="what runs plain generations' denoiser: torch, or openvino (exported at start; edits and requests with "
        "LoRAs or ControlNets still run in torch) (default torch)",
    )
    p.add_argument("--policy", help="a policy.toml: prompts its rules refuse get 400 with the rule's id")
    p.add_argument("--config", help="a serve.toml with [serve] and [limits] tables")
    p.add_argument("--no-auth", action="store_true", help="serve without keys (loopback addresses only)")
    set_option(p, "--set serve.max_batch=8 --set limits.max_n=4")


def cmd_serve(args):
    from ..config import ServeRun, load_run
    from ..serve.server import serve

    overrides = list(args.overrides)
    for key in ("host", "port", "database", "device", "policy", "precision", "backend"):
        if getattr(args, key) is not None:
            overrides.append(f"serve.{key}={getattr(args, key)}")
    if args.model:
        overrides.append(f"serve.models={','.join(args.model)}")
    serve(load_run(ServeRun, args.config, overrides), no_auth=args.no_auth)


def rate_per_minute(text: str) -> float:
    """--rate as `30` or `30/min` (requests a minute); argparse reports a bad value naming the option."""
    number = text.strip().removesuffix("/min").strip()
    try:
        return float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate; give requests a minute, e.g. 30 or 30/min") from None


def actions(p: argparse.ArgumentParser, common: argparse.ArgumentParser, dest: str):
    """A function action(name, help, fn) adding a sub-command of `p` that takes --database and runs fn(args)."""
    subs = p.add_subparsers(dest=dest, required=True, metavar="ACTION")

    def action(name: str, help: str, fn) -> argparse.ArgumentParser:
        a = subs.add_parser(name, help=help, description=help, parents=[common])
        database_option(a)
        a.set_defaults(fn=fn)
        return a

    return action


def add_keys_command(sub, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`ldmkit keys create | list | revoke`."""

    def options(p):
        from ..serve.auth import ROLES

        action = actions(p, common, "keys_action")
        a = action(
            "create", "create a key and print it on standard output; it is shown only this once", cmd_keys_create
        )
        a.add_argument("--name", required=True, help="a unique name for the key (who holds it); audit rows show it")
        a.add_argument("--role", required=True, choices=ROLES, help=ROLE_HELP)
        a.add_argument("--images-per-day", type=int, help="images the key may generate per UTC day (default: no limit)")
        a.add_argument(
            "--rate",
            type=rate_per_minute,
            help="requests a minute the key may send, e.g. 30 or 30/min (default: no limit)",
        )
        action("list", "list the keys with their roles, limits and today's images (never the keys)", cmd_keys_list)
        a = action("revoke", "revoke a key: every server sharing the database refuses it at once", cmd_keys_revoke)
        a.add_argument("key", metavar="NAME_OR_ID", help="the key's name or id (see `ldmkit keys list`)")

    return command(sub, common, "keys", "create, list and revoke the API keys of `ldmkit serve`", options=options)


def add_audit_command(sub, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`ldmkit audit verify | anchor | export | tail`."""

    def options(p):
        from ..serve.audit import FORMATS

        action = actions(p, common, "audit_action")
        a = action(
            "verify",
            "check the hash chain and print its head (SEQ:HASH of the last row): exit status 0 when intact, 1 naming "
            "each broken row, a head that differs or an anchored head no longer in the chain",
            cmd_audit_verify,
        )
        a.add_argument(
            "--expect-head",
            metavar="SEQ:HASH",
            help="fail unless the last row is SEQ with this hash, as an earlier verify printed it "
            "(for a database that still grows, use --anchors)",
        )
        a.add_argument(
            "--anchors",
            metavar="FILE",
            help="fail unless every head in FILE (lines written by `ldmkit audit anchor --append FILE`) is still in "
            "the chain with the same hash",
        )
        a = action(
            "anchor",
            "print the chain's head with the time (UTC), to keep outside the database; --append adds it to a file",
            cmd_audit_anchor,
        )
        a.add_argument("--append", metavar="FILE", help="append the line to FILE (created when missing) as well")
        a = action("export", "write audit rows (oldest first) as JSON lines or CSV", cmd_audit_export)
        a.add_argument("--since", help="only rows from this UTC date or time on, e.g. 2025-06-01 or 2025-06-01T12:00")
        a.add_argument("--key", help="only rows of this key (name or id)")
        a.add_argument("--format", choices=FORMATS, default="jsonl", help="jsonl (default) or csv")
        a.add_argument("--out", help="output file (default: standard output)")
        a.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
        a = action("tail", "print the last audit rows, one line each", cmd_audit_tail)
        a.add_argument("-n", type=int, default=20, help="how many rows (default 20)")
        a.add_argument("--follow", action="store_true", help="keep printing new rows every second until Ctrl-C")

    help = "verify, anchor, export and follow the audit trail of `ldmkit serve`"
    return command(sub, common, "audit", help, options=options)


# --- keys -------------------------------------------------------------------------------------------------------------
def cmd_keys_create(args) -> int:
    from ..serve.auth import Keys
    from ..serve.store import open_store

    with open_store(args.database) as store:
        key, who = Keys(store).create(args.name, args.role, args.images_per_day, args.rate)
    limits = [
        f"{who.images_per_day} images a day" if who.images_per_day is not None else "",
        f"{who.rate_per_min:g} requests a minute" if who.rate_per_min is not None else "",
    ]
    details = ", ".join(x for x in [f"id {who.key_id}", f"role {who.role}", *limits] if x)
    print(f"created key {who.name} ({details})", file=sys.stderr)
    print(key, flush=True)
    print("this key is shown only once: store it now (the database keeps only a salted hash)", file=sys.stderr)
    return 0


def cmd_keys_list(args) -> int:
    from ..serve.auth import Keys
    from ..serve.store import open_store

    with open_store(args.database, read_only=True) as store:
        keys = Keys(store).list()
    if not keys:
        print("no keys yet; create one with `ldmkit keys create --name NAME --role admin`")
        return 0
    header = ["ID", "NAME", "ROLE", "IMAGES/DAY", "RATE/MIN", "TODAY", "CREATED", "REVOKED"]
    rows = [
        [
            k["id"],
            k["name"],
            k["role"],
            "-" if k["images_per_day"] is None else str(k["images_per_day"]),
            "-" if k["rate_per_min"] is None else f"{k['rate_per_min']:g}",
            str(k["images_today"]),
            k["created"],
            k["revoked"] or "-",
        ]
        for k in keys
    ]
    print(table([header, *rows]))
    return 0


def table(rows: list[list[str]]) -> str:
    """Left-aligned columns two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def cmd_keys_revoke(args) -> int:
    from ..serve.auth import Keys
    from ..serve.store import open_store

    with open_store(args.database) as store:
        who = Keys(store).revoke(args.key)
    print(f"revoked key {who.name} ({who.key_id}); every server sharing this database refuses it from now on")
    return 0


# --- audit ------------------------------------------------------------------------------------------------------------
def cmd_audit_verify(args) -> int:
    from ..serve.audit import Audit, parse_anchors, parse_head
    from ..serve.store import open_store

    expected = parse_head(args.expect_head, "--expect-head") if args.expect_head else None
    anchors = parse_anchors(_read_anchors(args.anchors), f"--anchors {args.anchors}") if args.anchors else []
    with open_store(args.database, read_only=True) as store:
        audit = Audit(store)
        result = audit.verify()
        problems = result.problems + audit.check_heads(result, expected, anchors)
    for problem in problems:
        print(problem)
    if not problems:
        held = [f"{result.rows} rows", *(["the expected head"] if expected else [])]
        print(f"ok: {', '.join(held + ([f'{len(anchors)} anchored heads'] if args.anchors else []))}")
    print(f"head: {result.head}")  # keep it outside the database: `ldmkit audit anchor`
    if not problems:
        return 0
    print(f"{len(problems)} problems in {result.rows} rows: the audit trail was altered", file=sys.stderr)
    return 1


def _read_anchors(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(
            f"--anchors {path} does not exist; give the file `ldmkit audit anchor --append` writes"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--anchors {path} cannot be read ({e}); give a text file of anchored heads") from None


def cmd_audit_anchor(args) -> int:
    from ..serve.audit import Audit
    from ..serve.store import open_store

    with open_store(args.database, read_only=True) as store:
        seq, digest = Audit(store).head()
    line = f"{datetime.now(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')} {seq}:{digest}"
    if args.append:
        _append_line(args.append, line)
    print(line)
    return 0


def _append_line(path: str, line: str) -> None:
    """Add `line` to the file at `path` (created when missing) and flush it to disk."""
    if Path(path).is_dir():
        raise InputError(f"--append {path} is a folder; name a file in it instead")
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise InputError(f"--append {path} cannot be written ({e.strerror or e}); choose another file") from None


def cmd_audit_export(args) -> int:
    from ..serve.audit import Audit
    from ..serve.store import open_store

    with open_store(args.database, read_only=True) as store:
        audit = Audit(store)
        if not args.out:
            audit.export(sys.stdout, since=args.since, key=args.key, fmt=args.format)
            return 0
        with _output(args.out, args.overwrite) as out:
            n = audit.export(out, since=args.since, key=args.key, fmt=args.format)
    print(f"wrote {n} rows to {args.out}", file=sys.stderr)
    return 0


def _output(path: str, overwrite: bool):
    """`path` opened for writing text; refuses a folder, and an existing file unless `overwrite`."""
    if Path(path).is_dir():
        raise InputError(f"--out {path} is a folder; name a file in it instead")
    try:
        return open(path, "w" if overwrite else "x", encoding="utf-8", newline="")
    except FileExistsError:
        raise OutputExistsError(
            f"--out {path} exists; add --overwrite to replace it, or choose another --out"
        ) from None
    except OSError as e:
        raise InputError(f"--out {path} cannot be written ({e.strerror or e}); choose another --out") from None


def cmd_audit_tail(args) -> int:
    from ..serve.audit import Audit
    from ..serve.store import open_store

    # read-only without --follow; following opens it as a server does, to see a log that a later start begins
    with open_store(args.database, read_only=not args.follow) as store:
        audit = Audit(store)
        rows = audit.tail(args.n)
        for row in rows:
            print(_line(row))
        if not args.follow:
            return 0
        last = rows[-1]["seq"] if rows else 0
        try:
            while True:
                sys.stdout.flush()
                time.sleep(POLL_S)
                for row in audit.after(last):
                    print(_line(row))
                    last = row["seq"]
        except KeyboardInterrupt:
            return 0


def _line(row: dict) -> str:
    """One audit row for people: seq, time (UTC), decision, status, key, route, model, images, reason."""
    images = f"{len(row['outputs'])} images" if row["outputs"] else ""
    cells = [
        f"{row['seq']:>6}",
        row["time"][:19] + "Z",
        f"{row['decision']:<18}",
        str(row["status"] if row["status"] is not None else "-"),
        row["key_name"] or row["key_id"] or "-",
        row["route"] or "-",
        row["model"] or "",
        images,
        row["reason"] or "",
    ]
    return " ".join(c for c in cells if c)
