"""Batch-invariant inference on the CPU: an image's numbers do not depend on the batch it shares.

PyTorch's CPU kernels (oneDNN, MKL, ATen's own) pick their strategy from the shapes, strides and alignment they are
given, and the choice differs by instruction set (AVX2, AVX-512, AMX) and thread count: a convolution of one image
splits its work differently from one of two, a matrix product of a few rows takes a small-matrix path, a 1x1
convolution of 16 images takes another. Tuning around one CPU's choices does not carry to the next CPU.

So the guarantee is made by construction instead: every operation whose kernel choice depends on the shape (2-D
convolution, linear layers, matrix products, scaled dot-product attention) is called once per image, on a fresh
contiguous copy of that image's slice (the same shape, strides and 64-byte alignment whatever the batch), and the
results are concatenated. An image's call is then the very same call alone or in any batch, whatever kernel the CPU
picks for it, at any instruction-set level and thread count. Every other operation a model uses (normalisation,
softmax, elementwise maths) reduces within one image only, with a fixed order.

Classifier-free guidance gives each image two rows, its conditional and unconditional branch (`image_rows`): they
are one call of two rows, the same two-row call the image makes alone, which halves the calls of a guided batch.

The cost is the batching gain those kernels would have had (measured in benchmarks/RESULTS.md, "batch invariance").
`self_check()` measures the property on this machine; `ldmkit serve` runs it at start and reports it in /readyz.
Training (gradients on) and GPUs are left alone.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .attention import SpatialTransformer

_active = threading.local()  # torch function modes are per thread; so is the flag that avoids nesting them

# The calls that are made once per image: those whose CPU kernel depends on the batch's shape.
_CONV = {F.conv2d}
_LINEAR = {F.linear}
_ATTENTION = {F.scaled_dot_product_attention}
_PRODUCTS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}
_BADDBMM = {torch.baddbmm, torch.Tensor.baddbmm}
_ROUTED = _CONV | _LINEAR | _ATTENTION | _PRODUCTS | _BADDBMM


@contextlib.contextmanager
def image_rows(k: int, n: int):
    """Within the block (this thread), a call whose first axis has n rows holds n / k images of k rows each, image
    i in rows i, i + n / k, ..., as classifier-free guidance stacks its branches (k = 2: the conditional rows, then
    the unconditional ones). Each image's k rows are then one call, the call the image makes alone; any other call
    is still split row by row."""
    before = getattr(_active, "rows", None)
    _active.rows = (k, n) if k > 1 and n > 0 and n % k == 0 else None
    try:
        yield
    finally:
        _active.rows = before


def rows_per_image(n: int) -> int:
    """How many rows of a call with n rows on its first axis belong to one image: k inside `image_rows(k, n)`,
    else 1."""
    rows = getattr(_active, "rows", None)
    return rows[0] if rows is not None and rows[1] == n else 1


def subset_rows(n: int, k: int, m: int):
    """`image_rows` for a call on m rows picked from a call of n rows, the picked images' k branches one branch after
    the other: each image's branches stay one call where the n rows are grouped so (rows_per_image(n) == k), as
    when the image is alone; otherwise the m rows are split row by row, as the n rows are."""
    return image_rows(k if rows_per_image(n) == k else 1, m)


def own_rows(t: torch.Tensor, i: int, k: int = 1) -> torch.Tensor:
    """Image i's rows of t (one row, or its k rows i, i + n / k, ...) as a fresh contiguous tensor: the same shape,
    strides and alignment in any batch."""
    rows = t[i : i + 1] if k == 1 else t[i :: t.shape[0] // k]
    return rows.clone(memory_format=torch.contiguous_format)


def _each(n: int, call, k: int = 1) -> torch.Tensor:
    """call(i) over the n / k images, put back in their rows (call(0) alone for one image)."""
    outs = [call(i) for i in range(n // k)]
    if len(outs) == 1:
        return outs[0]
    return torch.cat(outs) if k == 1 else torch.stack(outs, 1).flatten(0, 1)


def _split_mask(mask, n: int, i: int, k: int = 1):
    """An attention mask's share for image i: its own rows when it has one per row, else the shared mask."""
    if isinstance(mask, torch.Tensor) and mask.ndim >= 3 and mask.shape[0] == n:
        return own_rows(mask, i, k)
    return mask


def _per_image(func, args: tuple, kwargs: dict):
    """func(*args, **kwargs) computed image by image, or None where the call has no image axis to split."""
    x = args[0]
    n = x.shape[0]
    k = rows_per_image(n)
    if func in _CONV and x.ndim == 4:
        return _each(n, lambda i: func(own_rows(x, i, k), *args[1:], **kwargs), k)
    if func in _LINEAR and x.ndim >= 2:
        return _each(n, lambda i: func(own_rows(x, i, k), *args[1:], **kwargs), k)
    if func in _ATTENTION and x.ndim >= 3:
        q, key, v, *rest = args
        if key.shape[0] != n or v.shape[0] != n:
            return None
        mask = kwargs.get("attn_mask", rest[0] if rest else None)
        kw = {name: val for name, val in kwargs.items() if name != "attn_mask"}
        tail = tuple(rest[1:])
        return _each(
            n,
            lambda i: func(
                own_rows(q, i, k), own_rows(key, i, k), own_rows(v, i, k), _split_mask(mask, n, i, k), *tail, **kw
            ),
            k,
        )
    if func in _PRODUCTS and len(args) == 2 and isinstance(args[1], torch.Tensor) and not kwargs:
        a, b = args
        if a.ndim >= 3 and b.ndim >= 3 and b.shape[0] == n:
            return _each(n, lambda i: func(own_rows(a, i, k), own_rows(b, i, k)), k)
        if a.ndim >= 2 and b.ndim == 2:  # one shared right-hand matrix: each image's rows alone
            return _each(n, lambda i: func(own_rows(a, i, k), b), k)
        return None
    if func in _BADDBMM and len(args) == 3:
        c, a, b = args
        if a.ndim == 3 and c.ndim == 3 and c.shape[0] == a.shape[0] == b.shape[0]:
            return _each(n, lambda i: func(own_rows(c, i, k), own_rows(a, i, k), own_rows(b, i, k), **kwargs), k)
    return None


class BatchInvariant(TorchFunctionMode):
    """Computes the CPU inference calls whose kernel depends on the batch's shape once per image."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ROUTED and args:
            x = args[0]
            if isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.ndim >= 2 and not torch.is_grad_enabled():
                out = _per_image(func, args, kwargs)
                if out is not None:
                    return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def batch_invariant(device: torch.device | str | None = "cpu"):
    """Run the block with batch-invariant CPU kernels when `device` is the CPU (a no-op elsewhere, and when the
    thread is already inside such a block)."""
    if torch.device(device or "cpu").type != "cpu" or getattr(_active, "on", False) or getattr(_active, "off", False):
        yield
        return
    _active.on = True
    try:
        with BatchInvariant():
            yield
    finally:
        _active.on = False


@contextlib.contextmanager
def plain_kernels():
    """Run the block with the plain kernels, whose numbers may depend on the batch (in this thread): what
    benchmarks/batch_invariance.py compares against."""
    before = getattr(_active, "off", False)
    _active.off = True
    try:
        yield
    finally:
        _active.off = before


# --- the property, measured on this machine ---------------------------------------------------------------------
CAPS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")  # what this process's kernels obey


def _probe_model(seed: int) -> torch.nn.Module:
    """A small network with each kind of layer the models use: 3x3 and 1x1 convolutions (one strided), group norm,
    a cross-attention transformer block over the pixels and a linear time embedding."""
    torch.manual_seed(seed)

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_in = torch.nn.Conv2d(4, 64, 3, padding=1)
            self.down = torch.nn.Conv2d(64, 64, 3, stride=2, padding=1)
            self.emb = torch.nn.Linear(32, 64)
            self.attn = SpatialTransformer(64, 4, context_dim=48, groups=16)
            self.skip = torch.nn.Conv2d(64, 128, 1)
            self.out = torch.nn.Conv2d(128, 4, 3, padding=1)

        def forward(self, x, t, ctx):
            h = self.down(F.silu(self.conv_in(x))) + self.emb(t)[:, :, None, None]
            return self.out(F.silu(self.skip(self.attn(h, ctx))))

    return Probe().eval()


@torch.no_grad()
def self_check(sizes: tuple[int, ...] = (2, 5), seed: int = 0) -> dict:
    """Checks on this machine, at its current thread count and instruction-set caps, that each image of a probe
    network's batch of every size in `sizes` gets bit for bit the numbers it gets alone. Returns {"holds": bool,
    "threads", "caps", "failures": [...]}: a failure names the batch size and the image."""
    model = _probe_model(seed)
    g = torch.Generator().manual_seed(seed + 1)
    n = max(sizes)
    x = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.randn(n, 32, generator=g)
    ctx = torch.randn(n, 7, 48, generator=g)
    with batch_invariant():
        alone = [model(x[i : i + 1], t[i : i + 1], ctx[i : i + 1]) for i in range(n)]
        failures = []
        for b in sizes:
            together = model(x[:b], t[:b], ctx[:b])
            failures += [f"image {i} of a batch of {b}" for i in range(b) if not torch.equal(together[i], alone[i][0])]
        # two rows an image, as guidance stacks them: image i's rows i and i + b, against the two alone
        ctx2 = ctx.flip(0)  # the second branch's own context
        with image_rows(2, 2):
            pairs = [model(x[[i, i]], t[[i, i]], torch.stack([ctx[i], ctx2[i]])) for i in range(n)]
        for b in sizes:
            with image_rows(2, 2 * b):
                together = model(torch.cat([x[:b]] * 2), torch.cat([t[:b]] * 2), torch.cat([ctx[:b], ctx2[:b]]))
            failures += [
                f"guided image {i} of a batch of {b}" for i in range(b) if not torch.equal(together[i::b], pairs[i])
            ]
    caps = {k: os.environ[k] for k in CAPS if k in os.environ}
    return {"holds": not failures, "threads": torch.get_num_threads(), "caps": caps, "failures": failures}
