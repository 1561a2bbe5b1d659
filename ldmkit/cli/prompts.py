"""`ldmkit prompts` (add, list, show, retire the prompt templates of `ldmkit serve`). Each command function takes the
parsed arguments and returns an exit status."""

from __future__ import annotations

import argparse
import getpass
import json
import sys

from .options import command
from .serve import actions, table


def add(sub, common: argparse.ArgumentParser) -> None:
    add_prompts_command(sub, common)


def add_prompts_command(sub, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`ldmkit prompts add | list | show | retire`."""

    def options(p):
        from ..serve.prompts import ALLOWED_HELP

        action = actions(p, common, "prompts_action")
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
        a = action(
            "retire", "retire a template: no request may use any of its versions from now on", cmd_prompts_retire
        )
        a.add_argument("name", metavar="NAME", help="the template's name (see `ldmkit prompts list`)")

    help = "add, list, show and retire the prompt templates of `ldmkit serve`"
    return command(sub, common, "prompts", help, options=options)


# --- prompts ----------------------------------------------------------------------------------------------------------
def _cli_user() -> str:
    """Who adds or retires a template from the command line: cli:USER (the operating system's account)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # an account without a name (a container's bare uid)
        return "cli"


def cmd_prompts_add(args) -> int:
    from ..serve.prompts import Templates, params_from_text
    from ..serve.store import open_store

    params = params_from_text(args.param)
    with open_store(args.database) as store:
        t = Templates(store).add(args.name, args.text, args.negative, params, args.description, _cli_user())
    variables = ", ".join(t.variables) or "none"
    print(f"added template {t.name} version {t.version} (variables: {variables})", file=sys.stderr)
    print(t.ref, flush=True)
    return 0


def cmd_prompts_list(args) -> int:
    from ..serve.prompts import Templates
    from ..serve.store import open_store

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
    print(table([header, *rows]))
    return 0


def _params(t) -> str:
    return " ".join(f"{k}={v}" for k, v in t.params.items())


def cmd_prompts_show(args) -> int:
    from ..serve.prompts import Templates
    from ..serve.store import open_store

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
    from ..serve.prompts import Templates
    from ..serve.store import open_store

    with open_store(args.database) as store:
        t = Templates(store).retire(args.name, by=_cli_user())
    span = f"versions 1..{t.version}" if t.version > 1 else "version 1"
    print(
        f"retired template {t.name} ({span}) at {t.retired}; every server sharing this database refuses it from "
        f"now on, and `ldmkit prompts show {t.name}@VERSION` still reads it"
    )
    return 0
