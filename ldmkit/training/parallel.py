"""How the trained modules run: data-parallel over ranks (DDP, or FSDP sharding), torch.compile, gradient
checkpointing. A task hands its modules to `Parallel` once, before the first step; the loop asks it for the
gradient-synchronisation context of each micro-batch and for the averaged values of a step.

DDP keeps a full copy of the model on every rank and averages gradients after each backward; FSDP (fully_shard)
shards parameters, gradients and optimizer state over the ranks, gathering each block's parameters for its forward
and backward only. Either way every rank ends a step with the same weights (DDP) or its shard of them (FSDP), and
the per-item randomness of the loop (batches.item_generators) makes them the weights of a single process.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import TrainConfig
from ..denoisers.dit import DiTBlock
from ..distributed import World
from ..errors import ConfigError
from ..nn.attention import SpatialTransformer
from ..nn.blocks import ResBlock

CHECKPOINTED = (ResBlock, SpatialTransformer, DiTBlock)  # blocks whose activations gradient checkpointing recomputes


def strategy(cfg: TrainConfig, world: World) -> str:
    """ "none" for a single process; else "ddp" or "fsdp" as train.distributed says ("auto": DDP)."""
    if not world.active:
        return "none"
    if cfg.distributed == "none":
        raise ConfigError(
            f"train.distributed = 'none' but torchrun started {world.size} processes; run without torchrun (or with "
            f"--nproc-per-node 1), or set train.distributed to auto, ddp or fsdp"
        )
    if cfg.distributed == "fsdp":
        raise ConfigError(
            "train.distributed = 'fsdp' (sharded parameters) is not implemented in this version; the models ldmkit "
            "trains fit one device each, so set train.distributed = ddp (or auto)"
        )
    return "ddp"


def check_batch(cfg: TrainConfig, world: World) -> None:
    """Each rank takes an equal share of every micro-batch: train.batch_size must divide by grad_accum x world size."""
    if cfg.batch_size % (cfg.grad_accum * world.size):
        per = cfg.grad_accum * world.size
        lower, upper = cfg.batch_size // per * per, (cfg.batch_size // per + 1) * per
        what = f"train.grad_accum {cfg.grad_accum} x " if cfg.grad_accum > 1 else ""
        raise ConfigError(
            f"train.batch_size {cfg.batch_size} does not divide over {what}world size {world.size} (torchrun "
            f"processes); set train.batch_size to a multiple of {per} (e.g. {lower or upper} or {upper}) or change "
            f"the number of processes"
        )


def checkpoint_blocks(module: nn.Module) -> int:
    """Gradient checkpointing: the residual, transformer and DiT blocks of `module` keep no activations for the
    backward pass and recompute them there (less memory, about a third more compute). Returns the block count."""
    n = 0
    for m in module.modules():
        if isinstance(m, CHECKPOINTED):
            m.forward = functools.partial(_checkpointed, m.forward)
            n += 1
    return n


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


class Parallel:
    """The training modules' wrappers of one run: DDP or FSDP over ranks, torch.compile, checkpointing."""

    def __init__(self, cfg: TrainConfig, world: World, device: torch.device):
        """cfg: the run's train settings (distributed, compile, gradient_checkpointing); world: this process's
        place among the ranks; device: this rank's device."""
        self.cfg, self.world, self.device = cfg, world, device
        self.kind = strategy(cfg, world)
        self.wrapped: list[nn.Module] = []

    def backbone(self, module: nn.Module) -> nn.Module:
        """The denoiser's backbone (or the autoencoder) prepared in place: checkpointed blocks, compiled."""
        if self.cfg.gradient_checkpointing:
            checkpoint_blocks(module)
        if self.cfg.compile:
            module.compile()
        return module

    def data_parallel(self, module: nn.Module) -> nn.Module:
        """`module` (whose forward computes what the gradients flow from) averaged over ranks: a DDP wrapper to
        call instead of it. Its parameters stay those of `module`. The single process gets `module` itself."""
        if self.kind != "ddp":
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
        self.wrapped.append(ddp)
        return ddp

    @contextlib.contextmanager
    def sync(self, last: bool) -> Iterator[None]:
        """The context of one micro-batch's forward and backward: gradients are averaged over the ranks after the
        last micro-batch of a step only."""
        with contextlib.ExitStack() as stack:
            if not last:
                for m in self.wrapped:
                    stack.enter_context(m.no_sync())
            yield

    def clip(self, params: list[nn.Parameter], max_norm: float) -> float:
        """Clip the gradients of `params` to a total norm of max_norm (over all ranks' shards under FSDP); return
        the norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
            norm = norm.full_tensor()
        return float(norm)

    def mean_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of `t` over the ranks (for values computed from each rank's share that must be the batch's)."""
        if not self.world.active:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t / self.world.size
