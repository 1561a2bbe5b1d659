"""RePaint resampling (Lugmayr et al. 2022) over any sampler, in sigma space.

The walk goes down the sigma grid with a base sampler; at every jump point (every `jump` steps) it goes back up
`jump` steps by adding fresh noise and walks down again, `resample` times in all. In the variance-exploding form,
x_up = x + sqrt(sigma_up^2 - sigma^2) n with n ~ N(0, I). Used with an inpainting blend around the denoiser, each
pass lets the generated region harmonise with the known one. resample = 1 is the base sampler itself.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..noise import Generators, randn_like
from .common import Callback, DenoiseFn, check_sigmas
from .euler import sample_euler


def check_repaint(steps: int, resample: int, jump: int) -> None:
    """InputError unless resample and jump are at least 1 and, when resampling, jump is below the step count."""
    if resample < 1 or jump < 1:
        raise InputError(f"--resample {resample} and --jump {jump} must both be at least 1 (1: no resampling)")
    if resample > 1 and jump >= steps:
        raise InputError(
            f"--jump {jump} must be smaller than --steps {steps}: the walk goes back up --jump steps "
            f"from points before the end; lower --jump or raise --steps"
        )


def repaint_segments(steps: int, resample: int, jump: int) -> list[tuple[int, int]]:
    """The walk over grid indices 0..steps as downward segments (start, end); between two segments the walk jumps
    up from index `end` of the first to index `start` of the next. Jump points are the indices k = jump, 2 jump,
    ... below `steps` (never from sigma = 0); each is walked down to `resample` times."""
    check_repaint(steps, resample, jump)
    segments, start = [], 0
    if resample > 1:
        for k in range(jump, steps, jump):
            segments.append((start, k))
            segments += [(k - jump, k)] * (resample - 1)
            start = k
    segments.append((start, steps))
    return segments


def sample_repaint(
    denoise: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    step=None,
    resample: int = 1,
    jump: int = 1,
    **step_options,
) -> torch.Tensor:
    """RePaint (Lugmayr et al. 2022, Algorithm 1 with jumps) in sigma space: the base sampler `step` (a sampler
    function, default Euler) walks each segment of `repaint_segments`; between segments x_up = x +
    sqrt(sigma_up^2 - sigma^2) n, n drawn from `generator`. callback's step index runs over the whole walk."""
    sigmas = check_sigmas(x, sigmas)
    n_steps = len(sigmas) - 1
    check_repaint(n_steps, resample, jump)
    step = step or sample_euler
    done = 0
    previous_end = None
    for start, end in repaint_segments(n_steps, resample, jump):
        if previous_end is not None and previous_end != start:
            s, s_up = sigmas[previous_end], sigmas[start]
            x = x + (s_up**2 - s**2).clamp_min(0).sqrt() * randn_like(x, generator)  # back up to sigma_up
        offset = done

        def shifted(i, x_i, x0, sigma, offset=offset):
            callback(offset + i, x_i, x0, sigma)

        segment = sigmas[start : end + 1]
        x = step(denoise, x, segment, generator=generator, callback=shifted if callback else None, **step_options)
        done += end - start
        previous_end = end
    return x


def repaint_steps(steps: int, resample: int, jump: int) -> int:
    """How many sampler steps the walk of `repaint_segments` takes in all (the callback's count)."""
    return sum(end - start for start, end in repaint_segments(steps, resample, jump))
