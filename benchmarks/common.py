"""What the benchmark scripts share: where a result goes by default, how it is written, and the CPU it ran on.

A script imports it as `from common import ...`: running `python benchmarks/x.py` puts benchmarks/ on the path,
and the tests that import a benchmark put it there themselves.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"


def default_out(name: str) -> str:
    """The default --out of benchmark `name`: benchmarks/out/<name>.json under the repository, as a string."""
    return str(OUT / f"{name}.json")


def write_json(path: str | Path, result: dict, *, quiet: bool = False, note: str = "") -> Path:
    """Write `result` as indented JSON to `path` (its folders made), then say `written <path><note>` unless `quiet`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    if not quiet:
        print(f"written {path}{note}")
    return path


def cpu_name() -> str:
    """The CPU's model name (as lscpu shows it), from /proc/cpuinfo where there is one, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
