"""Exponential moving average of model weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """theta_ema <- d * theta_ema + (1 - d) * theta, with the warm-up d_t = min(d, (1 + t) / (10 + t)).

    Under FSDP the copy holds this rank's shards of the weights (parallel.Parallel.distribute) and each update is
    local to them."""

    def __init__(self, model: nn.Module, decay: float):
        """model: the trained module (its floating-point parameters and buffers are tracked); decay: d."""
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        src = model.state_dict()
        for k, v in self.model.state_dict().items():
            if v.dtype.is_floating_point:
                v.lerp_(src[k].to(v.dtype), 1.0 - d)
            else:
                v.copy_(src[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()
