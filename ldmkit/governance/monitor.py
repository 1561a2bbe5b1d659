"""Watching a served model's outputs: the rolling Fréchet distance between the Inception features of its last N
outputs and its reference statistics, computed in a background thread and never on the request path.

The reference of a model is `MODEL.reference.npz` beside its weights when that file exists (FeatureStats of its
training data: `ldmkit monitor reference MODEL` writes it), else the model's own first N outputs after the start (a
baseline: the distance then measures drift since the start). A sudden rise means the model or its inputs changed:
other weights, a broken text encoder, prompts from a new population.

Work happens only while the server is idle (`busy()` false), a few images at a time; when requests keep it busy, the
oldest images waiting for features are dropped rather than delaying anyone (at most `window` wait per model).
"""

from __future__ import annotations

import collections
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..evaluation.fid import FeatureStats, InceptionFeatures

CHUNK = 8  # images per feature pass: small, so a request arriving meanwhile waits little
IDLE_POLL_S = 0.2  # how often a busy server is asked again


def reference_path(model_path: Path) -> Path:
    """Where a model's reference statistics live: `weights/emoji.safetensors` -> `weights/emoji.reference.npz`."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name.removesuffix(".safetensors") + ".reference.npz")


class _Model:
    def __init__(self, window: int, reference: FeatureStats | None):
        self.pending: collections.deque[torch.Tensor] = collections.deque(maxlen=window)  # images (C, H, W)
        self.features: collections.deque[np.ndarray] = collections.deque(maxlen=window)  # (2048,) each
        self.reference = reference
        self.baseline = reference is None  # the reference is the first window of outputs
        self.since = 0  # features added since the last distance
        self.value: float | None = None


class OutputMonitor:
    """Rolling Fréchet distance per model. add() is cheap and never blocks; a daemon thread does the rest."""

    def __init__(
        self,
        window: int,
        references: dict[str, FeatureStats | None],
        on_value: Callable[[str, float, int], None],
        busy: Callable[[], bool] = lambda: False,
        features: Callable[[torch.Tensor], np.ndarray] | None = None,
        every: int | None = None,
    ):
        """window: outputs per model the distance is taken over (at least 2); references: model name -> its
        reference statistics (None: the first `window` outputs); on_value(model, distance, outputs): called with
        every new distance; busy(): true while requests wait or run; features: images -> (N, 2048) features
        (default: TF-Inception, loaded in the thread on first use); every: new outputs between two distances
        (default: a quarter of the window)."""
        if window < 2:
            raise ValueError(f"monitor window {window} must be at least 2 outputs")
        self.window, self.on_value, self.busy, self._features = window, on_value, busy, features
        self.every = every or max(1, window // 4)
        self.models = {name: _Model(window, ref) for name, ref in references.items()}
        self._wake = threading.Condition()
        self._stop = False
        self._working = False  # a chunk taken from `pending` is being processed
        self._thread = threading.Thread(target=self._run, name="ldmkit-monitor", daemon=True)
        self._thread.start()

    def add(self, model: str, images: torch.Tensor) -> None:
        """Queue outputs (B, C, H, W) in [-1, 1] of `model` for the statistic (the oldest drop when too many wait)."""
        m = self.models.get(model)
        if m is None:
            return
        with self._wake:
            m.pending.extend(images.detach().float().cpu())
            self._wake.notify()

    def value(self, model: str) -> float | None:
        return self.models[model].value

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def drain(self, timeout: float = 60.0) -> bool:
        """Wait until no image waits for features (tests); False on timeout."""
        with self._wake:
            idle = lambda: not self._working and not any(m.pending for m in self.models.values())  # noqa: E731
            return self._wake.wait_for(idle, timeout)

    # --- the thread -----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._stop or any(m.pending for m in self.models.values()))
                if self._stop:
                    return
            if self.busy():
                with self._wake:
                    self._wake.wait(IDLE_POLL_S)
                continue
            for name, m in self.models.items():
                with self._wake:
                    chunk = [m.pending.popleft() for _ in range(min(CHUNK, len(m.pending)))]
                    self._working = bool(chunk)
                try:
                    if chunk:
                        self._step(name, m, chunk)
                except Exception as err:  # the monitor must never take the server down; say why it stopped
                    print(f"ldmkit monitor: {name}: {type(err).__name__}: {err}; its statistic stops", file=sys.stderr)
                    m.pending.clear()
                    self.models = {k: v for k, v in self.models.items() if k != name}
                finally:
                    with self._wake:
                        self._working = False
                        self._wake.notify_all()  # drain() waiters

    def _step(self, name: str, m: _Model, chunk: list[torch.Tensor]) -> None:
        if self._features is None:
            self._features = InceptionFeatures("cpu", batch_size=CHUNK)
        sizes = {tuple(x.shape) for x in chunk}
        for shape in sizes:  # one pass a size (requests may ask for other sizes)
            m.features.extend(self._features(torch.stack([x for x in chunk if tuple(x.shape) == shape])))
        m.since += len(chunk)
        if len(m.features) < self.window:
            return
        stats = FeatureStats.from_features(np.stack(m.features))
        if m.reference is None:
            m.reference, m.since = stats, 0  # the baseline: distances from here on are drift since the start
            return
        if m.since >= self.every or m.value is None:
            m.since = 0
            m.value = stats.fid(m.reference)
            self.on_value(name, m.value, len(m.features))
