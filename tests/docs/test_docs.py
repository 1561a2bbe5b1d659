"""Every shell block of README.md and docs/*.md is checked (the convention is described in docs/architecture.md).

A comment `<!-- docs-test: KIND (why) -->` on the line before a block says how: none runs it for real in the fast
suite, `slow` runs it only under `-m slow`, `parse-only` never runs it, `known-broken` expects its run to fail,
`status N` expects its last command to exit N, and `write FILE` (before a non-shell block) writes it to FILE.
Whatever the kind, every command is checked: ldmkit commands against the CLI's argparse parser, `make` targets
against the Makefile, scripts for existence and their options in their source.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from ldmkit.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*([\w-]+)\s*(.*?)\s*-->\s*$")
KINDS = {"slow", "parse-only", "known-broken", "status", "write"}
VENV_LDMKIT, VENV_PYTHON, VENV_TORCHRUN = ".venv/bin/ldmkit", ".venv/bin/python", ".venv/bin/torchrun"
# lines that never run (a block holding one is checked only): they install, serve, or take minutes to hours
CHECK_ONLY = {"make", VENV_TORCHRUN}
SHELL_BUILTINS = {"cd", "mkdir", "ls", "cat", "cp", "rm", "echo"}
LOCAL_SERVER = "http://127.0.0.1:8000/"  # `ldmkit serve`'s default address, which curl examples use
FAST_TIMEOUT_S, SLOW_TIMEOUT_S = 300, 1800


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    kind: str | None  # a MARKER kind, or None: run in the fast suite
    arg: str  # the marker's rest: the reason, the file name or the status

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page with the docs-test comment on the line before each (indented fences too)."""
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        indent, lang, start = len(fence.group(1)), fence.group(2), i
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        marker = MARKER.match(lines[start - 1]) if start else None
        kind, arg = (marker.group(1), marker.group(2)) if marker else (None, "")
        out.append(Block(page, start + 1, lang, "\n".join(body) + "\n", kind, arg))
        i += 1
    return out


def commands(text: str) -> list[list[str]]:
    """A shell block's commands as argument lists: backslash continuations joined, a quote that spans lines kept
    whole, comments dropped, leading VAR=value assignments removed."""
    out, acc = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            acc += line.rstrip()[:-1] + " "
            continue
        acc += line
        try:
            argv = shlex.split(acc, comments=True)
        except ValueError:  # a quoted string goes on to the next line
            acc += "\n"
            continue
        acc = ""
        while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
            argv = argv[1:]
        if argv:
            out.append(argv)
    assert not acc.strip(), f"unterminated command: {acc!r}"
    return out


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M)}


def parse_ldmkit(argv: list[str]) -> str | None:
    """None when the CLI's parser takes argv, else its error."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {e.code}"
    return None


def check_command(argv: list[str], targets: set[str]) -> str | None:
    """None when the command is sound, else what is wrong with it."""
    prog, rest = argv[0], argv[1:]
    if prog in (VENV_LDMKIT, "ldmkit"):
        return parse_ldmkit(rest)
    if prog == VENV_TORCHRUN:
        if "-m" not in rest or rest[rest.index("-m") + 1 : rest.index("-m") + 2] != ["ldmkit"]:
            return "torchrun without -m ldmkit"
        return parse_ldmkit(rest[rest.index("-m") + 2 :])
    if prog == "torchrun":
        return "torchrun is not on PATH unless the virtualenv is active: write .venv/bin/torchrun"
    if prog == "make":
        missing = [t for t in rest if not t.startswith("-") and "=" not in t and t not in targets]
        return f"no Makefile target {missing}" if missing else None
    if prog == VENV_PYTHON:
        if rest[:1] == ["-c"]:
            return None
        script = ROOT / rest[0]
        if not script.is_file():
            return f"no script {rest[0]}"
        source = script.read_text()
        unknown = [o.split("=")[0] for o in rest[1:] if o.startswith("--") and o.split("=")[0] not in source]
        return f"{rest[0]} has no option {unknown}" if unknown else None
    if prog in SHELL_BUILTINS:
        return None
    if prog == "curl":  # an example against a local server: its URLs only
        urls = [a for a in rest if "://" in a]
        wrong = [u for u in urls if not u.startswith(LOCAL_SERVER)]
        return f"curl to {wrong or 'no URL'}: examples talk to {LOCAL_SERVER}" if wrong or not urls else None
    return f"unknown program {prog!r}: teach tests/docs/test_docs.py how to check it"


ALL_BLOCKS = [b for page in PAGES for b in blocks(page)]
SH_BLOCKS = [b for b in ALL_BLOCKS if b.lang in ("sh", "bash", "shell", "console")]


def test_markers_are_known():
    bad = [f"{b.where()}: {b.kind}" for b in ALL_BLOCKS if b.kind is not None and b.kind not in KINDS]
    bad += [f"{b.where()}: write before a shell block" for b in SH_BLOCKS if b.kind == "write"]
    bad += [f"{b.where()}: shell blocks are ```sh" for b in SH_BLOCKS if b.lang != "sh"]
    assert not bad, bad


@pytest.mark.parametrize("block", SH_BLOCKS, ids=lambda b: b.where())
def test_every_command_parses(block):
    targets = make_targets()
    problems = [f"{shlex.join(argv)}: {why}" for argv in commands(block.text) if (why := check_command(argv, targets))]
    assert not problems, f"{block.where()}:\n" + "\n".join(problems)


def runnable(block: Block, slow: bool) -> bool:
    if block.kind in ("parse-only", "write") or (block.kind == "slow" and not slow):
        return False
    return not any(argv[0] in CHECK_ONLY or argv[0] == "ldmkit" for argv in commands(block.text)) and not any(
        argv[0] == VENV_PYTHON and argv[1:2] != ["-c"] for argv in commands(block.text)
    )


def run_page(page: Path, tmp: Path, slow: bool) -> None:
    """Run a page's runnable blocks in order in one folder, as a reader would, and check each one's status."""
    for name in (".venv", "weights"):
        (tmp / name).symlink_to(ROOT / name)
    env = dict(os.environ, LDMKIT_HOME=str(tmp / "home"), LDMKIT_CACHE=str(tmp / "cache"))
    for block in blocks(page):
        if block.kind == "write":
            (tmp / block.arg).write_text(block.text)
            continue
        if block.lang != "sh" or not runnable(block, slow):
            continue
        r = subprocess.run(
            ["bash", "-e", "-c", block.text],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=SLOW_TIMEOUT_S if slow else FAST_TIMEOUT_S,
        )
        output = f"{block.where()} exited {r.returncode}\n{block.text}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
        if block.kind == "known-broken":
            assert r.returncode != 0, f"{block.where()} works now: remove its known-broken marker"
        elif block.kind == "status":
            assert r.returncode == int(block.arg.split()[0]), output
        else:
            assert r.returncode == 0, output


def _pages_with(slow: bool) -> list[Path]:
    return [p for p in PAGES if any(b.lang == "sh" and runnable(b, slow) for b in blocks(p))]


@pytest.mark.parametrize("page", _pages_with(slow=False), ids=lambda p: p.name)
def test_fast_blocks_run(page, tmp_path):
    run_page(page, tmp_path, slow=False)


@pytest.mark.slow
@pytest.mark.parametrize("page", _pages_with(slow=True), ids=lambda p: p.name)
def test_all_blocks_run(page, tmp_path):
    run_page(page, tmp_path, slow=True)


BENCHMARK_SCRIPTS = sorted(
    {argv[1] for b in SH_BLOCKS for argv in commands(b.text) if argv[0] == VENV_PYTHON and argv[1:2] != ["-c"]}
)


@pytest.mark.slow
@pytest.mark.parametrize("script", BENCHMARK_SCRIPTS)
def test_scripts_answer_help(script):
    r = subprocess.run(
        [str(ROOT / VENV_PYTHON), script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]


def test_parser_catches_a_removed_option():
    """The check itself: an option the CLI does not have fails, a real one passes."""
    assert parse_ldmkit(["generate", "red apple", "--no-such-option"]) is not None
    assert parse_ldmkit(["generate", "red apple", "--n", "2"]) is None
    assert check_command(["torchrun", "-m", "ldmkit", "train"], make_targets()) is not None
    assert commands('a "b\nc" \\\n  --d  # e\nX=1 f') == [["a", "b\nc", "--d"], ["f"]]
