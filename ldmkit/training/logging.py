"""Run logs: one JSON object per line, appended and flushed so a killed run keeps everything logged so far.

A run killed in the middle of a write leaves a cut-off last line; a resume drops it with a warning. A damaged
line anywhere before the last one is not what a crash leaves, so it is an error naming the file and line, and the
file is left untouched for the user to inspect and repair.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

from ..errors import InputError


class JsonlLog:
    def __init__(self, path: str | Path, resume_step: int = 0):
        """path: the log file; resume_step: on resume, lines logged after this step (by a run that was killed
        before its next checkpoint) are dropped so the log matches the restored state."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step and self.path.exists():
            keep = [ln for ln, rec in read_records(self.path) if rec.get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif not resume_step:
            self.path.write_text("")
        self.t0 = time.time()

    def write(self, **record):
        record.setdefault("time", round(time.time() - self.t0, 3))
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def read_records(path: Path) -> list[tuple[str, dict]]:
    """(line, record) for every non-empty line; a cut-off final line is dropped with a warning."""
    lines = path.read_text().splitlines()
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    out = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError as e:
            if i == last:
                warnings.warn(
                    f"{path}: dropping line {i + 1}, cut off by a run that stopped while writing it ({ln[:60]!r})",
                    stacklevel=3,
                )
                break
            raise InputError(
                f"{path} line {i + 1} is not valid JSON ({e.msg}) and is not the last line, so it is "
                f"damage rather than a cut-off write; delete or repair that line, then resume"
            ) from None
        out.append((ln, rec if isinstance(rec, dict) else {}))
    return out
