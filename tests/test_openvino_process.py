"""The OpenVINO tests run in a pytest process of their own, so that OpenVINO is never loaded in the main one.

With them in the main process the full suite died twice with a segmentation fault, at the same test some 200 tests
after them (the OpenAI client's `uname -p` subprocess in tests/serve/test_serve_api.py: the kernel could not
deliver a SIGCHLD to the main thread, si_code SI_KERNEL), while the same files alone pass. The cause is not
established; see the project's notes. The tests they hold are unchanged and must pass here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = (
    "tests/pipelines/test_openvino.py",
    "tests/serve/test_serve_openvino.py",
    "tests/test_benchmarks_smoke.py::test_cpu_sampling_times_ldmkit_on_openvino_too",
)


def test_the_openvino_tests_pass_in_a_process_of_their_own():
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    env = dict(os.environ, LDMKIT_OPENVINO_PROCESS="1")
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *TESTS]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    tail = done.stdout[-4000:] + done.stderr[-2000:]
    assert done.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail.split("\n")[-2], tail  # they ran, none skipped
