"""The `ldmkit` command: parse -> request -> call. Nothing else lives here.

One module per command group, each with add(sub, common) adding its commands (options.py tells how); GROUPS lists
them in the order `ldmkit --help` shows them. Adding a command group = one module + one entry in GROUPS. A handler
imports the library when it runs, so `ldmkit --help`, and the parsing before any command, import no model code."""

from __future__ import annotations

import argparse
import gc
import sys
import warnings

from ..errors import LdmkitError
from . import edit, generate, governance, inversion, models, prompts, serve, synth, train, video
from .options import Commands

GROUPS = (train, generate, video, edit, inversion, models, synth, serve, prompts, governance)
_startup_frozen = False  # main has frozen the start-up's objects in this process (see main)


def build_parser(lazy: bool = False) -> argparse.ArgumentParser:
    """The parser of `ldmkit`, every command's options added; lazy: add a command's options only when it is chosen
    (what main does, so that a command's start imports only what it needs)."""
    ap = argparse.ArgumentParser(prog="ldmkit", description="Latent diffusion: train, sample, evaluate, serve.")
    debug_help = "show the full traceback of any error"
    ap.add_argument("--debug", action="store_true", help=debug_help)
    # Every command takes --debug too (`ldmkit generate --debug ...`); SUPPRESS keeps a command that was not given
    # it from resetting the value given before the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    kw = {"action": Commands} if lazy else {}
    sub = ap.add_subparsers(dest="command", required=True, **kw)
    for group in GROUPS:
        group.add(sub, common)
    return ap


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings as a user reads them: `warning: message`, without the source line that raised them."""
    print(f"warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    # Parsing a command's options imports its library (torch among it): hundreds of thousands of objects that live
    # as long as the process. The collector would walk them again and again as they pile up (0.1-0.2 s of a 2 s
    # generate); instead it is off while they are made, and they are then set aside (frozen) where it never looks.
    # Once a process: a later call (main called in-process again) imports nothing new, and freezing again would
    # set aside the garbage of the calls before it, never to be collected.
    global _startup_frozen
    first = not _startup_frozen
    if first:
        gc.disable()
    try:
        parser = build_parser(lazy=True)
        args = parser.parse_args(argv)
    finally:
        if first:
            _startup_frozen = True
            gc.freeze()
            gc.enable()
    shown = warnings.showwarning
    if not args.debug:
        warnings.showwarning = _one_line_warning
    try:
        status = args.fn(args) or 0
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130
    except LdmkitError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown
    return status
