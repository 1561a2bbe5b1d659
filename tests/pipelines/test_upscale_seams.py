"""The seam measure of benchmarks/upscale_seams.py: 1 for a smooth picture, above 1 when tile borders show."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from upscale_seams import borders, seam_ratio  # noqa: E402

from ldmkit.pipelines.upscale import Tiling  # noqa: E402


def test_a_line_at_a_tile_border_raises_the_seam_ratio():
    rng = np.random.default_rng(0)
    smooth = rng.normal(128, 4, (64, 64))
    lines = borders(Tiling(8, 2), 16, 4)  # latent side 16, 4 output pixels per latent pixel
    assert lines == [24, 32, 56]  # tiles start at 0, 6 and 8 latent pixels and end at 8, 14 and 16
    assert abs(seam_ratio(smooth, lines, lines) - 1) < 0.1
    seamed = smooth.copy()
    for k in lines:
        seamed[k:, :] += 6  # a step across every border row and column
        seamed[:, k:] += 6
    assert seam_ratio(seamed, lines, lines) > 1.5
