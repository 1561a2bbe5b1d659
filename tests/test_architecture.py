"""The import graph stays as shared/DESIGN.md draws it: no cycles between parts, none hidden in functions."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ldmkit"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            package = parts
        else:
            package = parts[:-1]
        yield ".".join(parts), package, ast.parse(path.read_text(), str(path))


def _target(package: list[str], node: ast.ImportFrom) -> str | None:
    """The absolute ldmkit module an ImportFrom names, or None for other packages."""
    if node.level == 0:
        return node.module if (node.module or "").split(".")[0] == "ldmkit" else None
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _part(module: str) -> str:
    """ldmkit.data.folder -> data; ldmkit.config -> config."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_no_ldmkit_imports_inside_functions():
    """Only optional heavy dependencies (transformers, diffusers, ...) may be imported inside a function. The CLI's
    handlers are the exception: each imports its command's library when it runs, so that `ldmkit --help` and a
    command's start stay fast; nothing imports the CLI, so no cycle can hide there."""
    hidden = []
    for name, package, tree in _modules():
        if name == "ldmkit.cli" or name.startswith("ldmkit.cli."):
            continue
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and _target(package, node):
                        hidden.append(f"{name}.{fn.name} imports {_target(package, node)}")
    assert not hidden, hidden


def test_parts_import_each_other_without_cycles():
    edges: dict[str, set[str]] = {}
    for name, package, tree in _modules():
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and (target := _target(package, node)):
                a, b = _part(name), _part(target)
                if a != b and b != "ldmkit":
                    edges.setdefault(a, set()).add(b)
    assert "cli" not in {b for deps in edges.values() for b in deps}, "nothing imports the CLI"

    def cycle_from(node, path):
        for nxt in sorted(edges.get(node, ())):
            if nxt in path:
                return path[path.index(nxt) :] + [nxt]
            found = cycle_from(nxt, path + [nxt])
            if found:
                return found
        return None

    for start in sorted(edges):
        cycle = cycle_from(start, [start])
        assert cycle is None, " -> ".join(cycle)


def test_low_level_parts_stay_low():
    """runtime, errors, noise, locks and config sit below everything that runs models; training never calls
    pipelines."""
    allowed = {"errors": set(), "config": {"errors"}, "runtime": {"errors"}, "noise": {"errors"}, "locks": set()}
    seen: dict[str, set[str]] = {}
    for name, package, tree in _modules():
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and (target := _target(package, node)):
                if _part(target) != _part(name):
                    seen.setdefault(_part(name), set()).add(_part(target))
    for part, ok in allowed.items():
        assert seen.get(part, set()) <= ok, (part, seen.get(part))
    assert "pipelines" not in seen.get("training", set())
