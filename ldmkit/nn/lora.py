"""Low-rank adaptation (Hu et al. 2021): W' = W + s * (alpha / r) * B A on linear layers and convolutions.

On a k x k convolution (LoCon) A is itself a k x k convolution from the layer's input to r channels, with the
layer's stride, padding and dilation, and B a 1x1 convolution from r to the layer's output: the update is still
B A with A flattened to (r, in * k * k), so merging adds it to the weight flattened the same way.

A `LoRA` holds the factors of one layer, a `LoRASet` those of one network, keyed by the module paths of that
network. A set changes a network in one of two ways, neither of which touches a sampler:
- unmerged (`attach`): a forward hook adds s_b * (alpha / r) * B A x_b to each targeted layer's output, with one
  scale s_b per sample, so a batch can mix scales (and, with several sets, adapters: a sample's scale is 0 for the
  sets it does not use, which adds an exact zero);
- merged (`merge`): W += s * (alpha / r) * B A in place, the fastest to sample with; `Merged.unmerge` puts back a
  copy of the weights taken before, so the base weights return bit for bit.
"""

from __future__ import annotations

import contextvars
import math
import weakref
from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .invariant import subset_rows

Targetable = (nn.Linear, nn.Conv2d)


def lora_shape(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a layer a LoRA can adapt: a linear layer, or a convolution without groups and with zero
    padding, whose in is in_channels * k * k; InputError otherwise."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
        kh, kw = module.kernel_size
        return module.in_channels * kh * kw, module.out_channels
    raise InputError(
        f"a LoRA adapts linear layers and convolutions without groups, not {type(module).__name__}"
        + (f" (groups={module.groups}, padding_mode={module.padding_mode!r})" if isinstance(module, nn.Conv2d) else "")
    )


def kernel(module: nn.Module) -> tuple[int, int]:
    """The kernel a LoRA on `module` carries: a convolution's (k, k), (1, 1) for a linear layer."""
    return tuple(module.kernel_size) if isinstance(module, nn.Conv2d) else (1, 1)


def targetable(net: nn.Module, kernels: bool = True) -> dict[str, nn.Module]:
    """Every layer of `net` a LoRA can adapt, by module path: linear layers and convolutions; without `kernels`,
    only the 1x1 convolutions (what "all" adapts; "all+conv" adds the others, LoCon)."""
    out = {}
    for path, m in net.named_modules():
        try:
            lora_shape(m)
        except InputError:
            continue
        if kernels or kernel(m) == (1, 1):
            out[path] = m
    return out


class LoRA(nn.Module):
    """The update (alpha / r) * B A of one layer with weight (out, in): A (r, in) "down", B (out, r) "up"."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, alpha: float | None = None, kernel=(1, 1)
    ) -> None:
        """in_features / out_features: the adapted layer's (lora_shape: a convolution's in is in_channels * k * k);
        rank: r, at most min(in, out); alpha: the scale numerator (default r, a factor 1); kernel: a convolution's
        (k, k)."""
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise InputError(
                f"LoRA rank {rank} does not fit a layer of {in_features} -> {out_features} features; use a rank "
                f"from 1 to {min(in_features, out_features)}"
            )
        self.rank, self.alpha = rank, float(rank if alpha is None else alpha)
        self.kernel = tuple(kernel)
        if in_features % (self.kernel[0] * self.kernel[1]):
            raise InputError(f"a LoRA of {in_features} input features cannot carry a {self.kernel} kernel")
        self.down = nn.Parameter(torch.empty(rank, in_features))  # A
        self.up = nn.Parameter(torch.empty(out_features, rank))  # B
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """A as a linear layer's default (Kaiming uniform), B zero: training starts from the base model exactly."""
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        nn.init.zeros_(self.up)

    @property
    def factor(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) * B A, (out, in)."""
        return (self.up @ self.down) * self.factor

    def forward(self, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        """(alpha / r) * B A x for the input x of `module`, the adapted layer: a linear layer (..., in) or a
        convolution (B, in, H, W), whose stride, padding and dilation A takes."""
        if isinstance(module, nn.Conv2d):
            down = self.down.to(x.dtype).view(self.rank, -1, *self.kernel)
            h = F.conv2d(x, down, None, module.stride, module.padding, module.dilation)  # (B, r, H', W')
            return F.conv2d(h, self.up.to(x.dtype)[:, :, None, None]) * self.factor  # (B, out, H', W')
        return F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype)) * self.factor  # (..., out)


def _slot(path: str) -> str:
    return path.replace(".", "/")  # a ModuleDict key cannot hold a dot


class LoRASet(nn.Module):
    """The LoRAs of one network, keyed by module path (`down.0.attn.0.blocks.0.attn1.to_q`)."""

    def __init__(self, layers: Mapping[str, LoRA]):
        super().__init__()
        self.layers = nn.ModuleDict({_slot(p): m for p, m in layers.items()})

    def items(self) -> Iterator[tuple[str, LoRA]]:
        for slot, m in self.layers.items():
            yield slot.replace("/", "."), m

    def paths(self) -> list[str]:
        return [p for p, _ in self.items()]

    def __getitem__(self, path: str) -> LoRA:
        return self.layers[_slot(path)]

    def __contains__(self, path: str) -> bool:
        return _slot(path) in self.layers

    @classmethod
    def for_modules(cls, net: nn.Module, paths: list[str], rank: int, alpha: float | None = None) -> "LoRASet":
        """Fresh LoRAs of `rank` for the modules `paths` of `net` (A random, B zero). A k x k convolution narrower
        than `rank` (a U-Net's conv_out, whose outputs are the latent channels) gets rank min(in, out) with the same
        factor alpha / r, a full-rank update; any other layer narrower than `rank` is refused (InputError)."""
        mods, out = dict(net.named_modules()), {}
        for p in paths:
            shape, k = lora_shape(mods[p]), kernel(mods[p])
            r = min(rank, *shape) if k != (1, 1) else rank
            out[p] = LoRA(*shape, r, None if alpha is None else alpha * r / rank, k)
        return cls(out)


# --- unmerged: forward hooks with per-sample scales -----------------------------------------------------------------

_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # network -> its Attached sets, in order
# the scales of the current call, per attached set: {id(set): (B,) tensor or float}; set by `scales`
_SCALES: contextvars.ContextVar[dict[int, torch.Tensor | float] | None] = contextvars.ContextVar(
    "lora_scales", default=None
)


@contextmanager
def scales(per_set: Mapping[LoRASet, torch.Tensor | float]):
    """Within the block, each attached set in `per_set` adds its update at that scale: one number, or one per sample
    (B,) (a batch k times as long, as classifier-free guidance makes it, repeats them k times). Context-local, so
    concurrent requests on one model do not see each other's scales."""
    token = _SCALES.set({**(_SCALES.get() or {}), **{id(s): v for s, v in per_set.items()}})
    try:
        yield
    finally:
        _SCALES.reset(token)


def _per_sample(scale: torch.Tensor | float, out: torch.Tensor) -> torch.Tensor | float:
    """`scale` shaped to multiply `out` (B, ...): a number as is, a vector (n,) as (B, 1, ...) (B = k n)."""
    if not isinstance(scale, torch.Tensor) or scale.ndim == 0:
        return float(scale)
    b, n = out.shape[0], scale.shape[0]
    if b % n:
        raise InputError(f"{n} LoRA scales do not fit a batch of {b}; give one scale per sample")
    return scale.to(out).repeat(b // n).view(b, *([1] * (out.ndim - 1)))


def _add_where_used(layer: "LoRA", module: nn.Module, x: torch.Tensor, s: torch.Tensor, out: torch.Tensor):
    """out plus s * layer(x) for the samples whose scale is not 0, the others left as they are (what a scale of 0
    adds to a finite output): a batch pays for a LoRA only on the images that use it. A sample's rows (k of them
    under guidance, sample i in rows i, i + n, ...) are computed as they are when only users of the LoRA are in the
    batch, alone included."""
    per_row = _per_sample(s, out)  # (B, 1, ...): the scales repeated once per guidance branch
    b, n = out.shape[0], s.shape[0]
    used = s.nonzero()[:, 0]
    if len(used) == 0:
        return out
    k = b // n
    rows = torch.cat([used + j * n for j in range(k)]).to(x.device)
    with subset_rows(b, k, len(rows)):
        delta = layer(x.index_select(0, rows), module)
    return out.index_add(0, rows, per_row.index_select(0, rows) * delta)


class Attached:
    """A set hooked into a network unmerged; `remove()` takes the hooks out again."""

    def __init__(self, net: nn.Module, lora: LoRASet, scale: torch.Tensor | float = 1.0):
        """net: the adapted network; lora: its set (paths of `net`); scale: the scale outside a `scales` block."""
        mods = dict(net.named_modules())
        missing = [p for p in lora.paths() if p not in mods]
        if missing:
            raise InputError(f"the LoRA names {len(missing)} modules the network lacks, first {missing[0]}")
        self.lora, self.default = lora, scale
        self.handles = [mods[p].register_forward_hook(self._hook(m)) for p, m in lora.items()]
        _ATTACHED.setdefault(net, []).append(self)
        self.net = weakref.ref(net)

    def scale(self) -> torch.Tensor | float:
        """This call's scale: the `scales` block's for this set, else the one given when attached."""
        return (_SCALES.get() or {}).get(id(self.lora), self.default)

    def _hook(self, layer: LoRA):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            s = self.scale()
            if not isinstance(s, torch.Tensor) and float(s) == 0.0:
                return out  # what a scale of 0 adds to a finite output
            if isinstance(s, torch.Tensor) and s.ndim == 1 and not bool(s.all()):
                return _add_where_used(layer, module, inputs[0], s, out)
            return out + _per_sample(s, out) * layer(inputs[0], module)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        net = self.net()
        if net is not None and self in _ATTACHED.get(net, []):
            _ATTACHED[net].remove(self)


def attached(net: nn.Module) -> list[Attached]:
    """The sets hooked into `net` (unmerged), in the order they were attached."""
    return list(_ATTACHED.get(net, []))


def attach(net: nn.Module, lora: LoRASet, scale: torch.Tensor | float = 1.0) -> Attached:
    """Hook `lora` into `net` unmerged at `scale` (one number, or one per sample)."""
    return Attached(net, lora, scale)


# --- merged ---------------------------------------------------------------------------------------------------------


class Merged:
    """Sets merged into a network's weights, with a copy of each changed weight as it was before the first merge."""

    def __init__(self, net: nn.Module):
        self.mods = dict(net.named_modules())
        self.saved: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def merge(self, lora: LoRASet, scale: float = 1.0) -> "Merged":
        """W += scale * (alpha / r) * B A for every layer of `lora` (computed in float32, cast to W's dtype)."""
        for path, layer in lora.items():
            if path not in self.mods:
                raise InputError(f"the LoRA names module {path}, which the network lacks")
            w = self.mods[path].weight
            self.saved.setdefault(path, w.detach().clone())
            delta = scale * layer.delta_weight().float().to(w.device)
            w.copy_((w.float() + delta.view(w.shape[0], -1).view_as(w)).to(w.dtype))
        return self

    @torch.no_grad()
    def unmerge(self) -> None:
        """Every merged weight back to its copy: the base weights bit for bit."""
        for path, w in self.saved.items():
            self.mods[path].weight.copy_(w)
        self.saved = {}


def merge(net: nn.Module, lora: LoRASet, scale: float = 1.0) -> Merged:
    """Merge `lora` into `net` at `scale`; the result's `unmerge()` restores the weights exactly."""
    return Merged(net).merge(lora, scale)
