"""benchmarks/video.py: its motion and consistency measures read real moving-fashion clips right, and a tiny run
writes every row."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.pipelines.test_video import tiny_video  # noqa: F401  (the fixture)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import video as bench  # noqa: E402


def test_real_clips_move_the_way_their_captions_say_and_warp_onto_each_other():
    caps, _, real = bench.moving_clips(40, 8, 32, 1)
    r = bench.scores(real, caps)
    assert r["motion_accuracy"] >= 0.95
    rng = np.random.default_rng(0)
    noise = [rng.random((8, 32, 32), dtype=np.float32) for _ in range(5)]
    assert r["warping_error"] < 0.5 * bench.scores(noise, caps[:5])["warping_error"]
    still = [np.repeat(c[:1], 8, axis=0) for c in real[:5]]
    r = bench.scores(still, caps[:5])
    assert r["motion_accuracy"] == 0.0 and r["frame_change"] == 0.0 and r["warping_error"] < 1e-3


@pytest.mark.slow
def test_a_tiny_run_writes_every_row(tmp_path, tiny_video):  # noqa: F811
    out = tmp_path / "video.json"
    argv = ["--model", str(tiny_video), "--n", "2", "--frames", "3", "--steps", "1", "--scale", "2", "--out", str(out)]
    bench.main(argv)
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"real clips", "video model", "image model, same noise", "image model, own noise"}
    assert result["rows"]["image model, same noise"]["frame_change"] == 0.0
    assert result["timing"][0]["frames"] == 2 and result["timing"][0]["seconds_per_clip"] > 0
