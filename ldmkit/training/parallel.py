"""How the trained modules run: data-parallel over ranks (DDP, or FSDP sharding), torch.compile, gradient
checkpointing. A task hands its modules to `Parallel` once, before the first step; the loop asks it for the
gradient-synchronisation context of each micro-batch and for the averaged values of a step.

DDP keeps a full copy of the model on every rank and averages gradients after each backward; FSDP (fully_shard)
shards parameters, gradients and optimizer state over the ranks, gathering each block's parameters for its forward
and backward only. Either way every rank ends a step with the same weights (DDP) or its shard of them (FSDP), and
the per-item randomness of the loop (batches.item_generators) makes them the weights of a single process.

Under FSDP every residual, transformer and DiT block is its own unit (its parameters gathered together), and the
module handed to `data_parallel` is the root unit holding the rest. The loop builds the model, loads a saved state
and the EMA in full on every rank, then `Parallel.distribute` shards them: the optimizers and the EMA follow the
model's shards. A train state is saved in full (`full_state`, gathered on rank 0), in the format of a single
process, so a run resumes at any world size with or without FSDP; grids and the export gather full weights first.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from ..config import TrainConfig
from ..denoisers.dit import DiTBlock
from ..distributed import World
from ..errors import ConfigError
from ..nn.attention import SpatialTransformer
from ..nn.blocks import ResBlock

# blocks whose activations gradient checkpointing recomputes, and that FSDP makes units of their own
CHECKPOINTED = (ResBlock, SpatialTransformer, DiTBlock)


def strategy(cfg: TrainConfig, world: World) -> str:
    """ "none" for a single process (whatever train.distributed says, as there is nothing to share or shard); else
    "ddp" or "fsdp" as train.distributed says ("auto": DDP)."""
    if not world.active:
        return "none"
    if cfg.distributed == "none":
        raise ConfigError(
            f"train.distributed = 'none' but torchrun started {world.size} processes; run without torchrun (or with "
            f"--nproc-per-node 1), or set train.distributed to auto, ddp or fsdp"
        )
    return "fsdp" if cfg.distributed == "fsdp" else "ddp"


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
        self.template: nn.Module | None = None  # FSDP: the task's model unsharded, parameters on the meta device

    def distribute(self, task, ema) -> None:
        """task.distribute(self) (checkpointing, compile, DDP or FSDP); under FSDP the task's optimizers (their
        parameters and state) and the EMA (`ema`, or None) then hold this rank's shards of what they held in full,
        rank 0's weights on every rank (as DDP broadcasts them: a module initialised from the global random state
        after rank 0 alone built a cache would differ between ranks)."""
        before = dict(task.model.named_parameters())
        if self.kind == "fsdp":
            self.template = _meta_copy(task.model)
            modules = [task.model] + ([ema.model] if ema is not None else [])
            for t in [t for m in modules for t in m.state_dict().values()]:
                dist.broadcast(t, src=0)  # in place: state_dict tensors share the parameters' storage
        task.distribute(self)
        if self.kind != "fsdp":
            return
        after = dict(task.model.named_parameters())
        new = {id(p): after[name] for name, p in before.items()}
        for opt, params in task.optimizers.values():
            _follow(opt, new)
            params[:] = [new[id(p)] for p in params]
        if ema is not None:
            _shard_like(ema.model, after)

    def backbone(self, module: nn.Module) -> nn.Module:
        """The denoiser's backbone (or the autoencoder) prepared in place: checkpointed blocks, compiled."""
        if self.cfg.gradient_checkpointing:
            checkpoint_blocks(module)
        if self.cfg.compile:
            module.compile()
        return module

    def data_parallel(self, module: nn.Module) -> nn.Module:
        """`module` (whose forward computes what the gradients flow from) averaged over ranks: a DDP wrapper to
        call instead of it, or under FSDP `module` itself, sharded in place (each block of CHECKPOINTED a unit,
        `module` the root). The single process gets `module` itself."""
        if self.kind == "fsdp":
            for m in reversed(list(module.modules())):  # inner units before the ones holding them
                if isinstance(m, CHECKPOINTED):
                    fully_shard(m)
            return fully_shard(module)
        if self.kind != "ddp":
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
        self.wrapped.append(ddp)
        return ddp

    @contextlib.contextmanager
    def sync(self, last: bool) -> Iterator[None]:
        """The context of one micro-batch's forward and backward: under DDP gradients are averaged over the ranks
        after the last micro-batch of a step only; FSDP reduces each micro-batch's gradients to the shards at once
        (they accumulate there, in 1/N of the memory of a full gradient)."""
        with contextlib.ExitStack() as stack:
            if not last:
                for m in self.wrapped:
                    stack.enter_context(m.no_sync())
            yield

    def clip(self, params: list[nn.Parameter], max_norm: float) -> float:
        """Clip the gradients of `params` to a total norm of max_norm (over all ranks' shards under FSDP); return
        the norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return float(norm)

    def mean_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of `t` over the ranks (for values computed from each rank's share that must be the batch's)."""
        if not self.world.active:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t / self.world.size

    def full_state(self, state: dict) -> dict:
        """`state` (a state dict, or an optimizer's state of one parameter) with every sharded tensor gathered in
        full: on rank 0 on the CPU, on the other ranks left out. A collective under FSDP: every rank calls it with
        the same keys in the same order. Otherwise `state` itself."""
        if self.kind != "fsdp":
            return state
        out = {}
        for k, v in state.items():
            if isinstance(v, DTensor):
                v = v.full_tensor()
                if not self.world.main:
                    continue
                v = v.cpu()
            out[k] = v
        return out

    def full_module(self, module: nn.Module) -> nn.Module | None:
        """`module` (the task's model or its EMA copy) with full weights, for a grid or an export: under FSDP a
        collective that returns an unsharded copy on rank 0 and None on the other ranks; otherwise `module`."""
        if self.kind != "fsdp":
            return module
        state = self.full_state(module.state_dict())
        if not self.world.main:
            return None
        full = copy.deepcopy(self.template)
        full.load_state_dict(state, assign=True)
        return full.to(self.device)


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters lie on the meta device (no memory); buffers are copied."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in module.parameters()}
    return copy.deepcopy(module, memo)


def _follow(opt: torch.optim.Optimizer, new: dict[int, nn.Parameter]) -> None:
    """Point `opt` at the sharded parameters (`new`: id of a full parameter -> its shard), its state sharded
    likewise (Adam's moments; the step count stays whole)."""
    state = {}
    for p, st in opt.state.items():
        q = new[id(p)]
        state[q] = {k: _like(v, q) if torch.is_tensor(v) and v.shape == p.shape else v for k, v in st.items()}
    opt.state = collections.defaultdict(dict, state)
    for group in opt.param_groups:
        group["params"] = [new[id(p)] for p in group["params"]]


def _like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """This rank's shard of `full`, placed as `ref` (a sharded parameter) is; `full` itself if ref is whole."""
    if not isinstance(ref, DTensor):
        return full
    return distribute_tensor(full.detach().to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)


def _shard_like(module: nn.Module, like: dict[str, nn.Parameter]) -> None:
    """Replace each parameter of `module` (a copy of the sharded model: the EMA) by its shard, placed as the
    model's parameter of the same name is."""
    for name, p in list(module.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner)
        sub._parameters[leaf] = nn.Parameter(_like(p.data, like[name]), requires_grad=p.requires_grad)
