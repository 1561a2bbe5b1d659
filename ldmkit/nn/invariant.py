"""Batch-invariant inference on the CPU: an image's numbers do not depend on the batch it shares.

PyTorch's CPU kernels pick their strategy from the shapes they are given. Three cases change the last bits of a
result with the batch size, measured on torch 2.13's oneDNN / MKL kernels:
- a 2-D convolution of a batch of 1 splits its work differently from any batch of 2 or more, and every batch of 2
  or more gives each image exactly the numbers it gets in any other;
- a matrix product with fewer than a dozen rows takes a small-matrix path; from about a dozen rows on, each row's
  numbers no longer depend on how many rows there are;
- at one thread, a 1x1 convolution of a batch of 16 or more images gives each image other numbers than a smaller
  batch does (3x3 ones do not; at two and four threads neither does).
So a lone image is convolved as a batch of two (itself twice), a 1x1 convolution (stride 1, no padding, one group:
a matrix product over the channels) is computed as that product, image by image in one batched call (a matrix
product of channels moved last would not do: strided, it too depends on the row count), and a linear layer with
fewer than MIN_ROWS rows is padded with zero rows. All cost little (the padding is only ever added to small work;
the batched product is as fast as the convolution), and every other operation a model uses (normalisation,
attention, elementwise maths) already treats each batch row on its own.

With that, the same seed gives the same image bit for bit at any batch size, and a server may batch different
users' requests into one forward pass without changing anyone's image. tests/test_invariant.py checks the property
on the layers and on whole models. Training (gradients on) and GPUs are left alone.
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

MIN_ROWS = 16  # a matrix product with at least this many rows gives each row the same numbers at any row count

_active = threading.local()  # torch function modes are per thread; so is the flag that avoids nesting them


class BatchInvariant(TorchFunctionMode):
    """Reroutes the CPU inference calls of F.conv2d and F.linear whose result would depend on the batch size."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d or func is F.linear:
            x = args[0]
            if isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.ndim >= 2 and not torch.is_grad_enabled():
                if func is F.linear:
                    return _linear(x, *args[1:], **kwargs)
                if x.ndim == 4:
                    pointwise = _pointwise(*args[1:], **kwargs)
                    if pointwise is not None:  # (C_out, C_in) weight and bias: a matrix product over the channels
                        return _pointwise_conv(x, *pointwise)
                    if x.shape[0] == 1:
                        return func(torch.cat([x, x]), *args[1:], **kwargs)[:1]  # (1, C_out, H', W')
        return func(*args, **kwargs)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with fewer than MIN_ROWS rows padded by zero rows (then cut off again)."""
    rows = math.prod(x.shape[:-1])
    if rows >= MIN_ROWS:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])  # (rows, C_in)
    y = F.linear(torch.cat([flat, flat.new_zeros(MIN_ROWS - rows, x.shape[-1])]), weight, bias)[:rows]
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution of x (N, C_in, H, W) as one (C_out, C_in) x (C_in, H * W) product per image (a batched
    product of the same shape for every image; as fast as the convolution, and no copy of x)."""
    n, c, h, w = x.shape
    cols = x.reshape(n, c, h * w)
    if bias is None:
        y = torch.bmm(weight.expand(n, -1, -1), cols)
    else:
        y = torch.baddbmm(bias.view(1, -1, 1).expand(n, -1, h * w), weight.expand(n, -1, -1), cols)
    return y.view(n, -1, h, w)  # (N, C_out, H, W)


def _pointwise(weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """(weight (C_out, C_in), bias) when F.conv2d's arguments make it a 1x1 convolution of stride 1, no padding and
    one group, else None."""
    ones = (1, (1, 1), [1, 1])
    if weight.shape[2:] != (1, 1) or groups != 1 or stride not in ones:
        return None
    if padding not in (0, (0, 0), [0, 0], "valid", "same"):
        return None
    return weight.flatten(1), bias


@contextlib.contextmanager
def batch_invariant(device: torch.device | str | None = "cpu"):
    """Run the block with batch-invariant CPU kernels when `device` is the CPU (a no-op elsewhere, and when the
    thread is already inside such a block)."""
    if torch.device(device or "cpu").type != "cpu" or getattr(_active, "on", False):
        yield
        return
    _active.on = True
    try:
        with BatchInvariant():
            yield
    finally:
        _active.on = False
