"""What a request will cost before it runs: its work in units, and each model's measured seconds per unit.

A unit is one pixel of one image through one denoiser pass of one step, so a request costs
`height * width * n * passes` units a step (passes: 2 with classifier-free guidance, else 1), times its steps. Each
ControlNet adds its own pass over the same images on the steps of its window, at its share of a backbone pass
(`control_share`); its units are spread over the request's steps.
A sampling step of a batch takes about `a + b * units` seconds: `a` is the fixed cost of a step (Python, kernel
dispatch), `b` the seconds per unit. Both are fitted by least squares to the batches the model ran, which keeps the
estimate of a large request honest when most batches are small (a ratio of totals would charge every unit the small
batches' fixed cost, and refuse large requests that would fit).
"""

from __future__ import annotations

import collections
import math
import time
from typing import Sequence

from ..denoisers.controlnet import Control, acting_steps
from ..diffusion.guidance import guides
from ..pipelines.plan import resolution
from ..pipelines.request import SampleRequest


def units_per_step(ldm, req: SampleRequest, controls: Sequence[Control] = ()) -> int:
    """The units of one sampling step of `req`: pixels x images x denoiser passes (2 with guidance), plus for each of
    `controls` (the ControlNets steering its images) those units times its share of a backbone pass, on the steps of
    its window, averaged over the request's steps (a scale of 0 steers nothing, so it costs nothing)."""
    h, w = resolution(ldm, req)
    units = h * w * req.n * (2 if guides(req.cfg) else 1)
    extra = sum(
        control_share(ldm, c) * len(acting_steps(req.steps, c.start, c.end)) / req.steps for c in controls if c.scale
    )
    return round(units * (1 + extra))


def control_share(ldm, control: Control) -> float:
    """A pass of `control`'s ControlNet as a fraction of a pass of `ldm`'s U-Net, by their parameters. A ControlNet is
    a copy of the U-Net's input convolution, embeddings, encoder and middle block (plus a small hint encoder and 1x1
    zero convolutions), each level at the resolution of the U-Net's own, so its work per pixel follows its share of
    the parameters: Stable Diffusion 1.5's ControlNet has 361M of the U-Net's 860M (0.42; counting the FLOPs of both at
    512x512 gives 0.35, so this errs on the side of refusing), the "base" preset's 47M of 107M (0.44)."""
    return _parameters(control.net) / _parameters(ldm.unet)


def _parameters(net) -> int:
    return sum(p.numel() for p in net.parameters())


def describe(ldm, req: SampleRequest, frames: int = 1, controls: Sequence[Control] = ()) -> str:
    """The request's work in words, for an error that refuses it (frames: of each clip; 1: images; controls: its
    ControlNets)."""
    h, w = resolution(ldm, req)
    passes = ", 2 passes a step for guidance" if guides(req.cfg) else ""
    nets = f", {len(controls)} ControlNet{'s' if len(controls) != 1 else ''}" if controls else ""
    what = f"{req.n} images" if frames == 1 else f"{req.n} clip{'s' if req.n != 1 else ''} of {frames} frames"
    return f"{w}x{h} pixels x {what} x {req.steps} steps{passes}{nets}"


class StepCost:
    """One model's seconds per sampling step as `a + b * units`, fitted to the warm-up runs (kept for good: they span
    two batch sizes, so the fit always has a slope) and the last `recent` batches."""

    def __init__(self, recent: int = 32):
        """recent: how many of the latest batches the fit follows (older ones are forgotten)."""
        self.anchors: list[tuple[float, float]] = []  # (units per step, seconds per step) of the warm-up
        self.recent: collections.deque[tuple[float, float]] = collections.deque(maxlen=recent)
        self._fit: tuple[float, float] | None = None

    def add(self, units: float, seconds: float, anchor: bool = False) -> None:
        """One measured batch: `units` a step took `seconds` a step."""
        if units <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        (self.anchors if anchor else self.recent).append((float(units), float(seconds)))
        self._fit = None

    def fit(self) -> tuple[float, float] | None:
        """(a, b): the fixed seconds of a step and the seconds per unit; None before any batch was measured."""
        if self._fit is None:
            self._fit = _least_squares([*self.anchors, *self.recent])
        return self._fit

    def seconds(self, units: float, steps: int, batches: int = 1) -> float | None:
        """Seconds for `steps` steps of `units` units a step run in `batches` batches; None when nothing is known."""
        fit = self.fit()
        if fit is None:
            return None
        a, b = fit
        return steps * (batches * a + b * units)


def _least_squares(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """The line y = a + b x closest to `points`, with a and b kept non-negative: a noisy slope below zero gives way to
    the mean seconds per unit, and a fixed cost above the fastest step gives way to that step's time."""
    if not points:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    if sxx <= 1e-12 * mx * mx or sxy <= 0:  # one batch size only, or noise: plain seconds per unit
        return 0.0, my / mx
    b = sxy / sxx
    a = min(max(my - b * mx, 0.0), min(y for _, y in points))
    return a, (my - a) / mx  # through the mean point, whether or not `a` was clamped


class StepTimer:
    """A sampler callback that notes when each step reports; `seconds_per_step` is the shortest time between two
    reports. That leaves out the work before the first step and after the last (conditioning, decoding), and the
    pauses of a loaded machine: an estimate on the low side admits a request that may still time out (and is then
    stopped at its next step), while one on the high side would refuse requests that fit."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, *_) -> float:
        now = time.monotonic()
        self.times.append(now)
        return now

    def seconds_per_step(self) -> float | None:
        if len(self.times) < 2:
            return None
        return min(b - a for a, b in zip(self.times, self.times[1:]))
