"""The rolling output statistic: a background Fréchet distance that rises when a model's outputs change."""

import threading

import numpy as np
import pytest
import torch

from ldmkit.evaluation.fid import FeatureStats
from ldmkit.governance.monitor import OutputMonitor, reference_path


def features(x: torch.Tensor) -> np.ndarray:
    """A tiny stand-in for Inception: the mean of each of 4 horizontal bands of each image, (N, 4)."""
    return x.mean(dim=1).reshape(len(x), 4, -1).mean(-1).double().numpy()


def images(n: int, shift: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.2 * torch.randn(n, 3, 8, 8, generator=g) + shift).clamp(-1, 1)


def test_distance_rises_when_outputs_change():
    values = []
    mon = OutputMonitor(16, {"m": None}, lambda m, d, n: values.append((m, d, n)), features=features, every=8)
    try:
        mon.add("m", images(16, 0.0, 0))  # the baseline
        assert mon.drain(30)
        mon.add("m", images(16, 0.0, 1))  # same population
        assert mon.drain(30)
        steady = mon.value("m")
        mon.add("m", images(16, 0.6, 2))  # the model changed
        assert mon.drain(30)
        changed = mon.value("m")
    finally:
        mon.close()
    assert steady is not None and changed is not None
    assert changed > 10 * max(steady, 1e-3), (steady, changed)
    assert values and all(m == "m" and n == 16 for m, _, n in values)


def test_reference_statistics_are_used_when_given():
    ref = FeatureStats.from_features(features(images(64, 0.5, 3)))
    mon = OutputMonitor(16, {"m": ref}, lambda *a: None, features=features)
    try:
        mon.add("m", images(16, 0.5, 4))
        assert mon.drain(30)
        near = mon.value("m")
        mon.add("m", images(16, -0.5, 5))
        assert mon.drain(30)
        far = mon.value("m")
    finally:
        mon.close()
    assert near is not None and far > 10 * max(near, 1e-3)


def test_nothing_is_computed_while_the_server_is_busy():
    busy = threading.Event()
    busy.set()
    calls = []

    def counting(x):
        calls.append(len(x))
        return features(x)

    mon = OutputMonitor(4, {"m": None}, lambda *a: None, busy=busy.is_set, features=counting)
    try:
        mon.add("m", images(4, 0.0, 0))
        assert not mon.drain(0.5)  # still waiting: the server is busy
        assert calls == []
        busy.clear()
        assert mon.drain(30)
        assert sum(calls) == 4
    finally:
        mon.close()


def test_waiting_images_are_bounded_and_unknown_models_ignored():
    mon = OutputMonitor(4, {"m": None}, lambda *a: None, busy=lambda: True, features=features)
    try:
        mon.add("m", images(50, 0.0, 0))
        mon.add("other", images(3, 0.0, 0))
        assert len(mon.models["m"].pending) == 4  # the oldest dropped, nobody delayed
        assert "other" not in mon.models
    finally:
        mon.close()


def test_bad_window_and_reference_path():
    with pytest.raises(ValueError, match="at least 2"):
        OutputMonitor(1, {}, lambda *a: None, features=features)
    assert reference_path("weights/emoji.safetensors").name == "emoji.reference.npz"
