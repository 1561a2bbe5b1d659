"""benchmarks/control.py's fidelity measures on known answers (the benchmark itself trains and samples for minutes)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from control import colour_error, edge_f1, mask_iou, targets  # noqa: E402


def _line(col: int, n: int = 1) -> torch.Tensor:
    m = torch.zeros(n, 3, 16, 16)
    m[:, :, 2:14, col] = 1
    return m


def test_edge_f1_counts_pixels_within_two_pixels():
    assert edge_f1(_line(5), _line(5)) == 1.0
    assert edge_f1(_line(7), _line(5)) == 1.0  # 2 px away: matched
    assert edge_f1(_line(8), _line(5)) == 0.0  # 3 px away: not
    half = _line(5) + _line(12)  # one true edge found, one extra: precision 1/2, recall 1
    assert abs(edge_f1(half, _line(5)) - 2 / 3) < 1e-6
    assert edge_f1(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16)) == 1.0


def test_mask_iou_and_colour_error():
    a, b = torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)
    a[0, :, :4], b[0, :, :2] = 1, 1  # IoU 1/2; the second pair is empty: 1
    assert abs(mask_iou(a, b) - 0.75) < 1e-6
    assert abs(colour_error(torch.full((1, 3, 8, 8), 0.75), torch.full((1, 3, 8, 8), 0.25), 4) - 0.5) < 1e-6


def test_the_targets_are_the_issues():
    rows = [
        {"row": "no control", "edge_f1": 0.1, "cost_ratio": 1.0, "fid": 50.0},
        {"row": "ControlNet 1.0", "edge_f1": 0.62, "cost_ratio": 1.4, "fid": 56.0},
    ]
    assert targets("canny", rows) == {
        "cost <= 1.5x": True,
        "edge F1 >= 0.6": True,
        "edge F1 >= 3x uncontrolled": True,
        "FID <= 1.1x uncontrolled": False,
    }
