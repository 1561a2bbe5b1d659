"""Run logs: one JSON object per line, appended and flushed so a killed run keeps everything logged so far."""
from __future__ import annotations

import json
import time
from pathlib import Path


class JsonlLog:
    def __init__(self, path: str | Path, resume_step: int = 0):
        """path: the log file; resume_step: on resume, lines logged after this step (by a run that was killed
        before its next checkpoint) are dropped so the log matches the restored state."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step and self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif not resume_step:
            self.path.write_text("")
        self.t0 = time.time()

    def write(self, **record):
        record.setdefault("time", round(time.time() - self.t0, 3))
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
