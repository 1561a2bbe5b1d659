"""Checks the server makes before work and about itself: non-finite numbers anywhere in a body, whether its
database can be written (/readyz), and error messages cleaned of server paths and command-line advice."""

from __future__ import annotations

import math

MAX_DEPTH = 32  # nesting a body may have; deeper JSON could pass the parser yet fail when the answer echoes it


def find_non_finite(data) -> tuple[str, str] | None:
    """(field, why) for the first number in `data` (a parsed JSON body) that is not finite, such as 1e309, which
    reads as infinity and could not be written back as JSON, or for nesting deeper than MAX_DEPTH; None if all
    is well. The field is named as the client sent it: "denoising_strength", "override_settings.x", "labels.2"."""
    stack = [((), data)]
    while stack:
        path, value = stack.pop()
        name = ".".join(path) or "body"
        if isinstance(value, float) and not math.isfinite(value):
            return name, f"{value} is not a finite number (JSON numbers must be finite); send a finite number"
        if isinstance(value, (dict, list)):
            if len(path) >= MAX_DEPTH:
                return name, f"the body nests deeper than {MAX_DEPTH} levels here; send flatter JSON"
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend(((*path, str(k)), v) for k, v in reversed(list(items)))
    return None


class _Probe(Exception):
    """Rolls back the write /readyz tries."""


def database_problem(store) -> str | None:
    """None when a row can be written to the database (in a transaction that is then rolled back), else why not:
    a server that cannot write its audit trail answers nothing, so it is not ready."""
    try:
        with store.write() as db:
            db.execute(
                "INSERT INTO usage (key_id, day, images) VALUES (?, ?, 0) ON CONFLICT (key_id, day) DO NOTHING",
                ("", "readyz"),
            )
            raise _Probe
    except _Probe:
        return None
    except Exception as e:  # any driver's error: the text names the cause, never the file's path
        return f"the database cannot be written ({type(e).__name__}: {_first_line(e)})"


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0][:200]


def scrub(message: str, models: dict) -> str:
    """An error message as an HTTP client may see it: each served model's file path replaced by the model's name,
    and command-line advice (a clause naming an `ldmkit ...` command) left out."""
    for name, m in models.items():
        path = getattr(m, "path", None)
        if path is not None:
            message = message.replace(str(path), name).replace(str(path.parent), "the server's model folder")
    kept = []
    for clause in message.split("; "):  # "X, so `ldmkit generate` cannot use it; use `ldmkit inpaint`" -> "X"
        at = clause.find("`ldmkit ")
        if at < 0:
            kept.append(clause)
            continue
        cut = max(clause.rfind(", ", 0, at), clause.rfind(" (", 0, at))
        if cut > 0:
            kept.append(clause[:cut])
    return "; ".join(kept).strip() or "the request failed"
