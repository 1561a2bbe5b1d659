"""What a user waits for before the first image: the `ldmkit` command's start, measured from outside the process.

    .venv/bin/python benchmarks/cold_start.py                           # this checkout, 3 runs of each
    .venv/bin/python benchmarks/cold_start.py --baseline /tmp/old       # and an older source tree, interleaved
    .venv/bin/python benchmarks/cold_start.py --tree /tmp/new --baseline /tmp/old

Three figures, each the median of --repeats fresh processes: `import ldmkit.cli` (the total `-X importtime`
reports for it, and whether torch came with it), `ldmkit --help`, and `ldmkit generate --model emoji "red apple"
--steps 25` (plus --generate-args) from process start to the PNG on disk. Each process's wall time and its CPU time
(user + system) are kept: on a machine shared with other jobs the wall time grows with their load while the CPU
time mostly does not.
--baseline names another source tree (e.g. `git archive OLD ldmkit | tar -x -C /tmp/old`, with the weights/ folder
linked beside it); its runs alternate with this tree's so that a busy machine slows both alike.
Writes benchmarks/out/cold_start.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_name, default_out, write_json

ROOT = Path(__file__).resolve().parent.parent
CLI = "import sys\nfrom ldmkit.cli import main\nsys.exit(main())"  # what the `ldmkit` console script runs


def timed(cmd: list[str], root: Path, cwd: str) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, stderr) of `cmd` run with `root` first on the import path."""
    env = dict(os.environ, PYTHONPATH=str(root), LDMKIT_WEIGHTS=str(ROOT / "weights"))
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed under {root}:\n{err[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, err


def measure(root: Path, python: str, model: str, steps: int, tmp: str, extra: tuple[str, ...] = ()) -> dict:
    """One run of each figure for the source tree `root`."""
    _, _, err = timed([python, "-X", "importtime", "-c", "import ldmkit.cli"], root, tmp)
    total = [int(m.group(1)) for m in re.finditer(r"\|\s*(\d+) \| ldmkit\.cli$", err, re.M)]
    probe = "import sys, ldmkit.cli; sys.stderr.write(str('torch' in sys.modules))"
    _, _, torch_loaded = timed([python, "-c", probe], root, tmp)
    help_wall, help_cpu, _ = timed([python, "-c", CLI, "--help"], root, tmp)
    out = Path(tmp) / "x.png"
    gen = [python, "-c", CLI, "generate", "--model", model, "red apple", "--steps", str(steps), "--out", str(out)]
    gen_wall, gen_cpu, _ = timed([*gen, "--overwrite", *extra], root, tmp)
    if not out.is_file():
        raise SystemExit(f"generate wrote no {out} under {root}")
    return {
        "import_cli_s": total[0] / 1e6 if total else float("nan"),
        "import_loads_torch": torch_loaded.strip() == "True",
        "help_wall_s": help_wall,
        "help_cpu_s": help_cpu,
        "generate_wall_s": gen_wall,
        "generate_cpu_s": gen_cpu,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="emoji")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--generate-args",
        default="",
        help='more options for the timed generate, e.g. "--backend openvino --precision auto" (its export cached by '
        "a first run)",
    )
    ap.add_argument("--tree", default=str(ROOT), help="the ldmkit source tree (holding ldmkit/) to measure")
    ap.add_argument("--baseline", help="another ldmkit source tree to measure beside --tree")
    ap.add_argument("--python", default=sys.executable, help="the interpreter (default: this one)")
    ap.add_argument("--out", default=default_out("cold_start"))
    args = ap.parse_args(argv)

    trees = {"this": Path(args.tree).resolve()} | ({"baseline": Path(args.baseline).resolve()} if args.baseline else {})
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, root in trees.items():
                extra = tuple(shlex.split(args.generate_args))
                runs[name].append(measure(root, args.python, args.model, args.steps, tmp, extra))
            result = summary(args, trees, runs)
            # after every round: a long run on a busy machine keeps what it measured
            write_json(args.out, result, quiet=True)
    print(
        f"{args.model}, {args.steps} steps, median of {args.repeats}; {result['cpu']}, "
        f"load average {result['load_average_1min']:.1f}"
    )
    print(f"{'tree':<9} {'import cli s':>12} {'torch':>6} {'--help wall/cpu s':>18} {'generate wall/cpu s':>20}")
    for name, r in result["rows"].items():
        print(
            f"{name:<9} {r['import_cli_s']:>12.3f} {'yes' if r['import_loads_torch'] else 'no':>6} "
            f"{r['help_wall_s']:>9.2f}/{r['help_cpu_s']:<8.2f} "
            f"{r['generate_wall_s']:>10.2f}/{r['generate_cpu_s']:<9.2f}"
        )
    return 0


def summary(args, trees: dict[str, Path], runs: dict[str, list[dict]]) -> dict:
    """The medians of each tree's runs so far, with the machine they ran on."""
    rows = {}
    for name, results in runs.items():
        rows[name] = {k: statistics.median(r[k] for r in results) for k in results[0] if k != "import_loads_torch"}
        rows[name]["import_loads_torch"] = any(r["import_loads_torch"] for r in results)
        rows[name]["runs"] = results
    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "python": platform.python_version(),
        "model": args.model,
        "steps": args.steps,
        "generate_args": args.generate_args,
        "repeats": len(next(iter(runs.values()))),
        "trees": {name: str(root) for name, root in trees.items()},
        "rows": rows,
    }


if __name__ == "__main__":
    raise SystemExit(main())
