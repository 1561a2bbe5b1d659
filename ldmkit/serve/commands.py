"""`ldmkit keys` (create, list, revoke the API keys of `ldmkit serve`), `ldmkit audit` (verify, anchor, export, tail
its audit trail) and `ldmkit prompts` (add, list, show, retire its prompt templates). cli.py adds them with
add_keys_command(sub, common), add_audit_command(sub, common) and add_prompts_command(sub, common); each command
function takes the parsed arguments and returns an exit status. `keys list`, `audit verify`, `audit anchor`,
`audit export` and `audit tail` (without --follow) open the database read-only, so they work on an archived copy and
change nothing in it."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ..errors import InputError, OutputExistsError
from .audit import FORMATS, Audit, parse_anchors, parse_head
from .auth import ROLES, Keys
from .prompts import ALLOWED_HELP, Template, Templates, params_from_text
from .store import open_store

POLL_S = 1.0  # how often `audit tail --follow` looks for new rows
ROLE_HELP = "viewer: list models and jobs; user: also generate; admin: also keys, audit and metrics"


def rate_per_minute(text: str) -> float:
    """--rate as `30` or `30/min` (requests a minute); argparse reports a bad value naming the option."""
    number = text.strip().removesuffix("/min").strip()
    try:
        return float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate; give requests a minute, e.g. 30 or 30/min") from None


def _database_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--database",
        help="a SQLite file or a postgresql:// URL, as given to `ldmkit serve` "
        "(default: $LDMKIT_HOME/ldmkit.db, LDMKIT_HOME defaulting to ~/.local/share/ldmkit)",
    )


def _actions(p: argparse.ArgumentParser, common: argparse.ArgumentParser, dest: str):
    """A function action(name, help, fn) adding a sub-command of `p` that takes --database and runs fn(args)."""
    actions = p.add_subparsers(dest=dest, required=True, metavar="ACTION")

    def action(name: str, help: str, fn) -> argparse.ArgumentParser:
        a = actions.add_parser(name, help=help, description=help, parents=[common])
        _database_option(a)
        a.set_defaults(fn=fn)
        return a

    return action


def add_keys_command(sub, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`ldmkit keys create | list | revoke`."""
    p = sub.add_parser("keys", help="create, list and revoke the API keys of `ldmkit serve`", parents=[common])
    action = _actions(p, common, "keys_action")
    a = action("create", "create a key and print it on standard output; it is shown only this once", cmd_keys_create)
    a.add_argument("--name", required=True, help="a unique name for the key (who holds it); audit rows show it")
    a.add_argument("--role", required=True, choices=ROLES, help=ROLE_HELP)
    a.add_argument("--images-per-day", type=int, help="images the key may generate per UTC day (default: no limit)")
    a.add_argument(
        "--rate", type=rate_per_minute, help="requests a minute the key may send, e.g. 30 or 30/min (default: no limit)"
    )
    action("list", "list the keys with their roles, limits and today's images (never the keys)", cmd_keys_list)
    a = action("revoke", "revoke a key: every server sharing the database refuses it at once", cmd_keys_revoke)
    a.add_argument("key", metavar="NAME_OR_ID", help="the key's name or id (see `ldmkit keys list`)")
    return p


def add_audit_command(sub, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`ldmkit audit verify | anchor | export | tail`."""
    p = sub.add_parser(
        "audit", help="verify, anchor, export and follow the audit trail of `ldmkit serve`", parents=[common]
    )
    action = _actions(p, common, "audit_action")
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
    return p


def add_prompts_command(sub, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`ldmkit prompts add | list | show | retire`."""
    p = sub.add_parser(
        "prompts", help="add, list, show and retire the prompt templates of `ldmkit serve`", parents=[common]
    )
    action = _actions(p, common, "prompts_action")
    a = action("add", "add a template, or the next version of one, and print NAME@VERSION", cmd_prompts_add)
    a.add_argument("name", metavar="NAME", help="1 to 64 lowercase letters, digits, - and _, e.g. product-shot")
    a.add_argument("--text", required=True, help="the prompt: {name} is a variable, {{ and }} are literal braces")
    a.add_argument("--negative", default="", help="the negative prompt; it may use the same variables")
    a.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"a default generation field, repeatable, e.g. --param steps=30; keys: {ALLOWED_HELP}",
    )
    a.add_argument("--description", default="", help="what the template is for")
    a = action("list", "list the newest version of each template in use", cmd_prompts_list)
    a.add_argument("--retired", action="store_true", help="list retired templates too")
    a = action("show", "print one version of a template (retired ones too)", cmd_prompts_show)
    a.add_argument("ref", metavar="NAME[@VERSION]", help="a template name (its newest version) or NAME@VERSION")
    a.add_argument("--json", action="store_true", help="print the template as one JSON object")
    a = action("retire", "retire a template: no request may use any of its versions from now on", cmd_prompts_retire)
    a.add_argument("name", metavar="NAME", help="the template's name (see `ldmkit prompts list`)")
    return p


# --- keys -------------------------------------------------------------------------------------------------------------
def cmd_keys_create(args) -> int:
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
    print(_table([header, *rows]))
    return 0


def _table(rows: list[list[str]]) -> str:
    """Left-aligned columns two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def cmd_keys_revoke(args) -> int:
    with open_store(args.database) as store:
        who = Keys(store).revoke(args.key)
    print(f"revoked key {who.name} ({who.key_id}); every server sharing this database refuses it from now on")
    return 0


# --- audit ------------------------------------------------------------------------------------------------------------
def cmd_audit_verify(args) -> int:
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


# --- prompts ----------------------------------------------------------------------------------------------------------
def _cli_user() -> str:
    """Who adds or retires a template from the command line: cli:USER (the operating system's account)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # an account without a name (a container's bare uid)
        return "cli"


def cmd_prompts_add(args) -> int:
    params = params_from_text(args.param)
    with open_store(args.database) as store:
        t = Templates(store).add(args.name, args.text, args.negative, params, args.description, _cli_user())
    variables = ", ".join(t.variables) or "none"
    print(f"added template {t.name} version {t.version} (variables: {variables})", file=sys.stderr)
    print(t.ref, flush=True)
    return 0


def cmd_prompts_list(args) -> int:
    with open_store(args.database) as store:
        templates = Templates(store).list(include_retired=args.retired)
    if not templates:
        print("no templates yet; add one with `ldmkit prompts add NAME --text TEXT`")
        return 0
    header = ["NAME", "VERSION", "VARIABLES", "PARAMS", "CREATED", "RETIRED", "DESCRIPTION"]
    rows = [
        [
            t.name,
            str(t.version),
            ",".join(t.variables) or "-",
            _params(t) or "-",
            t.created,
            t.retired or "-",
            t.description if len(t.description) <= 40 else t.description[:39] + "…",
        ]
        for t in templates
    ]
    print(_table([header, *rows]))
    return 0


def _params(t: Template) -> str:
    return " ".join(f"{k}={v}" for k, v in t.params.items())


def cmd_prompts_show(args) -> int:
    with open_store(args.database) as store:
        templates = Templates(store)
        t = templates.show(args.ref)
        newest = templates.versions(t.name)[-1].version
    if args.json:
        print(json.dumps(t.as_dict(), ensure_ascii=False, indent=2))
        return 0
    lines = [
        ("template", f"{t.ref} ({'the newest' if t.version == newest else f'newest: {t.name}@{newest}'})"),
        ("text", t.text),
        ("negative", t.negative_prompt or "-"),
        ("variables", ", ".join(t.variables) or "none"),
        ("params", _params(t) or "none"),
        ("description", t.description or "-"),
        ("created", f"{t.created} by {t.created_by or 'unknown'}"),
        ("retired", f"{t.retired} by {t.retired_by or 'unknown'}" if t.retired else "no"),
    ]
    print("\n".join(f"{k + ':':<13}{v}" for k, v in lines))
    return 0


def cmd_prompts_retire(args) -> int:
    with open_store(args.database) as store:
        t = Templates(store).retire(args.name, by=_cli_user())
    span = f"versions 1..{t.version}" if t.version > 1 else "version 1"
    print(
        f"retired template {t.name} ({span}) at {t.retired}; every server sharing this database refuses it from "
        f"now on, and `ldmkit prompts show {t.name}@VERSION` still reads it"
    )
    return 0
