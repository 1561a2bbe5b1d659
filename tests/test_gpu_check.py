"""benchmarks/gpu_check.py cannot rot between lent GPUs: its dry run runs every part on the CPU here, a part that
overruns its budget is cut off with its missing rows marked, and the bundle it carries is readable."""

import base64
import gzip
import hashlib
import json
import os
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_bundle  # noqa: E402
import gpu_check  # noqa: E402

from ldmkit.data.fashion_mnist import read_idx  # noqa: E402


def test_the_dry_run_runs_every_part_on_the_cpu_and_writes_the_json_and_the_table(tmp_path):
    out = tmp_path / "out"
    # budgets far above the dry run's needs (tens of seconds), so that a busy shared CPU does not cut rows off
    budgets = ["--budget", "correctness=600", "--budget", "speed=300", "--budget", "quality=300", "--total", "1200"]
    assert gpu_check.main(["--dry-run", "--out", str(out), *budgets]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True and set(report["parts"]) == set(gpu_check.PARTS)
    args = SimpleNamespace(dry_run=True)
    by_part = {p: [r for r in report["rows"] if r["part"] == p] for p in gpu_check.PARTS}
    for part, rows in by_part.items():
        assert [r["row"] for r in rows] == gpu_check.plan(part, args), part  # every planned row, in order, once
        assert report["parts"][part]["end"] == "finished"
    # every code path ran: no row failed or was skipped
    assert {r["status"] for r in by_part["correctness"]} == {"passed"}
    assert {r["status"] for r in by_part["speed"] + by_part["quality"]} == {"ok"}
    speed = {r["row"]: r for r in by_part["speed"]}
    assert speed["unet parity ldmkit vs diffusers"]["value"] < 1e-2  # the same weights give the same output
    assert all(r["value"] > 0 for r in by_part["speed"][1:])
    quality = {r["row"]: r for r in by_part["quality"]}
    assert quality["training"]["value"] > 0 and quality["training"]["steps"] >= 1
    assert all(np.isfinite(r["value"]) and r["value"] >= 0 for r in by_part["quality"][1:])
    samples = np.load(out / "quality-samples.npz")
    assert {k: v.shape for k, v in samples.items()} == {"steps_2": (4, 32, 32), "steps_1": (4, 32, 32)}
    table = (out / "gpu_check.md").read_text()
    assert "dry run on the CPU" in table and table.count("\n| correctness | test_") == len(by_part["correctness"])
    props = " ".join(r["note"] for r in by_part["correctness"])
    assert "batch vs alone" in props and "deterministic kernels cost" in props  # what the tests measured


def test_a_part_that_overruns_its_budget_is_cut_off_and_its_missing_rows_read_out_of_time(tmp_path):
    stall = {**os.environ, "LDMKIT_GPU_CHECK_STALL": "600"}  # the part would overrun on any machine, however fast
    args = SimpleNamespace(dry_run=True, out=str(tmp_path), env=stall)
    start = time.time()
    with open(tmp_path / "log", "w") as log:
        rows, info = gpu_check.run_part("speed", 2.0, args, tmp_path, log)
    assert time.time() - start < 2.0 + gpu_check.GRACE + 5
    assert info["end"] == "killed at the end of its budget"
    assert [r["row"] for r in rows] == gpu_check.plan("speed", args)
    assert gpu_check.OUT_OF_TIME in {r["status"] for r in rows}
    assert {r["status"] for r in rows} <= {"ok", gpu_check.OUT_OF_TIME}


def test_a_part_with_no_time_left_does_not_start(tmp_path):
    rows, info = gpu_check.run_part("quality", 0.0, SimpleNamespace(dry_run=False), tmp_path, None)
    assert info["end"] == "no time left" and {r["status"] for r in rows} == {gpu_check.OUT_OF_TIME}
    assert len(rows) == len(gpu_check.plan("quality", SimpleNamespace(dry_run=False)))


def test_budgets_are_changed_by_name_and_an_unknown_part_is_refused():
    args = gpu_check.parse(["--budget", "speed=12"])
    assert gpu_check.budgets(args) == {**gpu_check.BUDGETS, "speed": 12.0}
    assert sum(gpu_check.BUDGETS.values()) <= gpu_check.TOTAL <= 9 * 60
    with pytest.raises(SystemExit, match="PART=SECONDS"):
        gpu_check.budgets(gpu_check.parse(["--budget", "speedy=12"]))


def test_the_bundle_data_is_read_by_ldmkit_and_the_trimmed_wheel_records_what_it_holds(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gpu_bundle.idx_bytes(images)))
    assert np.array_equal(read_idx(path), images)

    src = tmp_path / "src" / "diffusers-0.0.1-py3-none-any.whl"
    src.parent.mkdir()
    files = {
        "diffusers/__init__.py": b"x = 1\n",
        "diffusers/models/unet.py": b"y = 2\n",
        "diffusers/pipelines/big.py": b"z = 3\n" * 100,
        "diffusers/modular_pipelines/m.py": b"w = 4\n",
        "diffusers-0.0.1.dist-info/RECORD": b"stale\n",
    }
    with zipfile.ZipFile(src, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    (tmp_path / "dest").mkdir()
    out = gpu_bundle.trimmed_wheel(src, tmp_path / "dest")
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        record = z.read("diffusers-0.0.1.dist-info/RECORD").decode().splitlines()
    assert names == {"diffusers/__init__.py", "diffusers/models/unet.py", "diffusers-0.0.1.dist-info/RECORD"}
    digest = base64.urlsafe_b64encode(hashlib.sha256(b"y = 2\n").digest()).rstrip(b"=").decode()
    assert f"diffusers/models/unet.py,sha256={digest},6" in record
    assert record[-1] == "diffusers-0.0.1.dist-info/RECORD,,"
