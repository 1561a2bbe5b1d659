"""Building a network whose weights are about to be loaded, without drawing the random weights first.

A module's constructor fills its parameters at random (kaiming-uniform, normal embeddings, ...), and a model read
from a file then overwrites every one of them: for the shipped emoji model's text encoder alone that draw is 22 M
random numbers, 0.09 s of a 2 s `ldmkit generate`, and for a Stable Diffusion-sized network seconds. Inside
`without_init()` those draws are skipped and the tensors keep whatever memory they were given, so the caller must
load every parameter and persistent buffer strictly afterwards (`checkpoint.load_state` refuses missing keys).

The skip is a torch function mode, so it holds in the calling thread only: a LoRA or a fresh model built at the
same time in another thread (a server's request) still gets its random weights. Buffers computed in a constructor
(sinusoidal positions, masks) are computed as always: only the random fills are skipped.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

# torch.nn.init's fills that dispatch through torch functions, and the tensor methods the other fills end in
_FILLS = {
    torch.nn.init.uniform_,
    torch.nn.init.normal_,
    torch.nn.init.kaiming_uniform_,
    torch.Tensor.uniform_,
    torch.Tensor.normal_,
}


class _SkipRandomFills(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FILLS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


@contextlib.contextmanager
def without_init():
    """Build modules in the block without their random initial weights (this thread only); load all of them after."""
    with _SkipRandomFills():
        yield
