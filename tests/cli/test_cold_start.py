"""The `ldmkit` command starts without the model stack: importing the CLI, `ldmkit --help` and parsing a command
that needs no model load no torch, and the parser that adds a command's options only when it is chosen says and
accepts exactly what the full parser does."""

import argparse
import contextlib
import io
import subprocess
import sys

import pytest

from ldmkit.cli import build_parser, main

HEAVY = ("torch", "PIL", "numpy", "fastapi", "onnxruntime", "cv2")


def _loaded_after(code: str) -> list[str]:
    """The HEAVY modules a fresh interpreter holds after running `code`."""
    probe = f"{code}\nimport sys\nprint('loaded:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.splitlines()[-1]  # after any help text
    assert last.startswith("loaded:"), proc.stdout
    return [m for m in last.removeprefix("loaded:").split(",") if m]


def test_importing_the_cli_loads_no_model_stack():
    assert _loaded_after("import ldmkit.cli") == []


@pytest.mark.parametrize("argv", [["--help"], ["keys", "--help"], ["audit", "verify", "--help"]])
def test_help_and_a_command_without_a_model_load_no_model_stack(argv):
    code = f"from ldmkit.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    assert _loaded_after(code) == []


def test_a_model_command_does_load_torch():
    """The probe can fail: the options of generate come from the parameter table, which needs the samplers."""
    code = "from ldmkit.cli import main\ntry:\n    main(['generate', '--help'])\nexcept SystemExit:\n    pass"
    assert "torch" in _loaded_after(code)


def _paths(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) of every command and action of the full parser."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _paths(sub, (*path, name))


def test_the_lazy_parser_shows_the_full_parsers_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    for path, parser in _paths(build_parser()):
        shown = io.StringIO()
        with contextlib.redirect_stdout(shown), pytest.raises(SystemExit):
            main([*path, "--help"])
        assert shown.getvalue() == parser.format_help(), path


def test_the_start_up_objects_are_frozen_once_and_later_garbage_is_still_collected():
    """main turns the collector off while a command's library is imported and freezes what survives, once a
    process: a second call must not freeze the garbage left by the calls before it."""
    code = """
import gc, weakref
from ldmkit.cli import main
try:
    main(["keys", "--help"])
except SystemExit:
    pass
assert gc.isenabled()
first = gc.get_freeze_count()
class Node: pass
a, b = Node(), Node()
a.other, b.other = b, a  # a cycle: only the collector frees it
gone = weakref.ref(a)
del a, b
try:
    main(["audit", "verify", "--help"])
except SystemExit:
    pass
assert gc.get_freeze_count() == first, (first, gc.get_freeze_count())
gc.collect()
assert gone() is None
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr
