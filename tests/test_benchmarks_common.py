"""benchmarks/common.py: the default result path, the JSON writer the scripts share, and the CPU name."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import cpu_name, default_out, write_json  # noqa: E402


def test_default_out_is_under_benchmarks_out():
    assert default_out("cold_start") == str(ROOT / "benchmarks" / "out" / "cold_start.json")


def test_write_json_makes_the_folders_and_says_where(tmp_path, capsys):
    path = tmp_path / "a" / "b" / "r.json"
    assert write_json(str(path), {"rows": [1, 2]}, note=" (3 s)") == path
    assert json.loads(path.read_text()) == {"rows": [1, 2]}
    assert capsys.readouterr().out == f"written {path} (3 s)\n"
    write_json(path, {"rows": []}, quiet=True)
    assert capsys.readouterr().out == ""
    assert json.loads(path.read_text()) == {"rows": []}


def test_cpu_name_is_the_model_name_of_proc_cpuinfo():
    info = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("model name")]
    assert cpu_name() == (names[0] if names else cpu_name()) and cpu_name()
