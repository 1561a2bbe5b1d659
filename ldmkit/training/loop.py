"""The training loop only: optimiser steps, accumulation, clipping, EMA, logging, checkpoints and exact resume.

A `Task` (autoencoder or denoiser training) computes and back-propagates the loss of one micro-batch; this loop
owns everything around it, the loading of each step's images included (batches.py: a DataLoader with
train.num_workers processes for a task with pixel data, `task.images`). The data order is a pure function of
(seed, epoch), and every random draw of an item comes from its own generator keyed by (seed, step, the item's
place in the step's batch), so a run resumed from its last checkpoint continues bit for bit as if it had never
stopped, with any number of loading processes, and N ranks under torchrun (each training its share of every
micro-batch, parallel.Parallel averaging the gradients, or sharding the model under FSDP) train the weights of one
process, to float rounding. Rank 0 alone writes the log, grids and checkpoints and shows the progress bar; under
FSDP every rank first takes part in gathering the full weights they need.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import checkpoint
from ..config import TrainConfig, validate
from ..distributed import World
from ..errors import MissingFileError, NonFiniteError
from ..runtime import autocast
from .batches import batch_indices, item_generators, rank_positions, resolve_workers, step_generator, step_images
from .ema import EMA
from .logging import JsonlLog
from .parallel import Parallel, check_batch

__all__ = ["STATE_FILE", "Task", "batch_indices", "item_generators", "step_generator", "train"]

STATE_FILE = "train-state.safetensors"


class Task(Protocol):
    """What the loop trains."""

    model: nn.Module  # the module whose weights are tracked by EMA and exported
    optimizers: dict[str, tuple[torch.optim.Optimizer, list[nn.Parameter]]]  # name -> (optimizer, its params)
    size: int  # number of training examples
    images: torch.utils.data.Dataset | None  # pixel data the loop loads for each step (len == size), or None

    def micro_step(
        self, step: int, idx: torch.Tensor, gens: Sequence[torch.Generator], scale: float, x: torch.Tensor | None
    ) -> dict[str, float]:
        """Forward and backward one micro-batch (items idx, each drawing its random numbers from its generator in
        gens; their images x (b, C, H, W) on the device, in [-1, 1], when the task has `images`) with the loss
        multiplied by `scale`; return values to log (means over the micro-batch)."""

    def distribute(self, parallel: Parallel) -> None:
        """Prepare the trained modules with `parallel` (checkpointing, compile, DDP/FSDP) before the first step.
        Under FSDP `parallel` then moves the optimizers' parameters and state to the shards."""

    def modules(self) -> dict[str, nn.Module]:
        """Every module with state to checkpoint (model, discriminator, text encoder...)."""

    def export(self, out_dir: Path, weights: nn.Module, step: int) -> Path:
        """Write the usable checkpoint of `weights` (a module like `model` holding the weights to use: the EMA's
        where there is one, always whole); return its path."""

    def sample(self, out_dir: Path, weights: nn.Module, step: int) -> Path | None:
        """Write a sample grid drawn with `weights` (as for export); optional."""


@dataclass
class LoopResult:
    step: int
    export_path: Path
    history: list[dict] = field(default_factory=list)


def train(
    task: Task,
    cfg: TrainConfig,
    out_dir: str | Path,
    device: torch.device,
    resume: bool = False,
    config_dict: dict | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    world: World | None = None,
) -> LoopResult:
    """Run (or resume) training to cfg.steps. stop_after: leave after that many steps (tests of resume); world:
    this process's place among the ranks of a torchrun job (every rank calls train with the same arguments; default
    the single process)."""
    world = world or World()
    validate(cfg, "train")
    check_batch(cfg, world)
    out_dir = Path(out_dir)
    if world.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    ema = EMA(task.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    parallel = Parallel(cfg, world, device)
    start = load_state(out_dir / STATE_FILE, task, ema) if resume else 0  # every rank reads the saved state
    _check_start(world, start, out_dir)
    if resume and start == 0 and not (out_dir / STATE_FILE).exists():
        raise MissingFileError(f"--resume: no {STATE_FILE} in {out_dir}; start without --resume")
    parallel.distribute(task, ema)
    log = JsonlLog(out_dir / "log.jsonl", resume_step=start) if world.main else None
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    history: list[dict] = []
    interrupted = _InterruptFlag()
    positions = rank_positions(cfg.batch_size, cfg.grad_accum, world.size, world.rank)
    images = getattr(task, "images", None)
    batches = None
    if images is not None:
        workers = resolve_workers(cfg.num_workers, images)
        batches = step_images(images, cfg.seed, cfg.batch_size, start, end, workers, device, positions)
    bar = tqdm(total=cfg.steps, initial=start, disable=not (progress and world.main), unit="step", dynamic_ncols=True)
    t_last, logged, bad, step = time.time(), start, 0, start  # logged: the step of the last record (or the start)
    with interrupted:
        for step in range(start, end):
            x = next(batches) if batches is not None else None
            logs = _one_step(task, cfg, step, positions, device, x, parallel)
            if not all(math.isfinite(v) for k, v in logs.items() if k.startswith("loss")):
                bad += 1
                if bad >= 5:
                    raise NonFiniteError(
                        f"loss was not finite for {bad} steps in a row at step {step}; lower "
                        f"train.lr, keep train.grad_clip > 0, or use train.mixed_precision=no"
                    )
                continue
            bad = 0
            if ema is not None:
                ema.update(task.model)
            done = step + 1
            if done % cfg.log_every == 0 or done == end:
                now = time.time()
                n_steps = max(1, done - logged)  # since the previous record, also after a resume and at the end
                rec = {
                    "step": done,
                    **{k: round(v, 6) for k, v in logs.items()},
                    "images_per_s": round(n_steps * cfg.batch_size / max(now - t_last, 1e-9), 2),
                }
                t_last, logged = now, done
                if log is not None:
                    log.write(**rec)
                history.append(rec)
                bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.4f}", img_s=rec["images_per_s"])
            bar.update(1)
            if cfg.sample_every and done % cfg.sample_every == 0:
                weights = parallel.full_module(_weights(task, ema))  # every rank takes part under FSDP
                if world.main:
                    task.sample(out_dir, weights, done)
            stop = world.any(interrupted.flag)  # a signal to one rank stops every rank after the same step
            if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == end or stop:
                save_state(out_dir / STATE_FILE, task, ema, done, config_dict, parallel)
                world.barrier()  # a rank killed after this step resumes from this state
            if stop:
                bar.close()
                raise KeyboardInterrupt(
                    f"stopped at step {done}; state saved in {out_dir / STATE_FILE}; continue with --resume"
                )
        step = end
    bar.close()
    if batches is not None:
        batches.close()  # ends the loading processes
    weights = parallel.full_module(_weights(task, ema))
    path = world.on_main(lambda: task.export(out_dir, weights, step))
    return LoopResult(step, path, history)


def _weights(task: Task, ema: EMA | None) -> nn.Module:
    """The module whose weights grids and the export use: the EMA's where there is one."""
    return ema.model if ema is not None else task.model


def _one_step(
    task: Task,
    cfg: TrainConfig,
    step: int,
    positions: torch.Tensor,
    device: torch.device,
    x: torch.Tensor | None,
    parallel: Parallel,
) -> dict[str, float]:
    """One optimizer step on this rank's items (`positions` in the step's batch; x their images)."""
    world = parallel.world
    torch.manual_seed(step_generator(cfg.seed, step, 1).initial_seed() + world.rank)  # dropout (per rank)
    idx = batch_indices(cfg.seed, step, cfg.batch_size, task.size)[positions]
    gens = item_generators(cfg.seed, step, positions.tolist())
    micro = len(positions) // cfg.grad_accum  # check_batch made it a whole number
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    for opt, _ in task.optimizers.values():
        opt.zero_grad(set_to_none=True)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
    totals: dict[str, float] = {}
    for m in range(cfg.grad_accum):
        part = slice(m * micro, (m + 1) * micro)
        with parallel.sync(last=m == cfg.grad_accum - 1), autocast(cfg.mixed_precision, device):
            logs = task.micro_step(
                step, idx[part], gens[part], 1.0 / cfg.grad_accum, x[part] if x is not None else None
            )
        for k, v in logs.items():
            totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
    totals = world.mean(totals)  # the batch's means, the same on every rank (so all skip a non-finite step)
    if not all(math.isfinite(v) for k, v in totals.items() if k.startswith("loss")):
        return totals
    for name, (opt, params) in task.optimizers.items():
        if not any(p.grad is not None for p in params):
            continue  # e.g. the discriminator before it starts
        if cfg.grad_clip > 0:
            norm = parallel.clip(params, cfg.grad_clip)
            totals[f"grad_norm_{name}"] = float(norm)
        opt.step()
    totals["lr"] = lr
    return totals


def _check_start(world: World, start: int, out_dir: Path) -> None:
    """Every rank must resume from the same step: a rank on another machine that does not see rank 0's run folder
    (or sees an older copy) is refused on every rank."""
    starts = world.gather(start)
    if len(set(starts)) > 1:
        shown = ", ".join(f"rank {r}: step {s}" for r, s in enumerate(starts))
        raise MissingFileError(
            f"the ranks found different train states in {out_dir / STATE_FILE} ({shown}); put --out on storage "
            f"that every node shares, so that all ranks read the state rank 0 writes"
        )


# --- train state ----------------------------------------------------------------------------------------------


def save_state(
    path: Path, task: Task, ema: EMA | None, step: int, config_dict: dict | None, parallel: Parallel
) -> None:
    """Write the train state (modules, EMA, optimizers) in full, whatever the sharding: rank 0 writes; under FSDP
    every rank must call this, as the shards are gathered."""
    if not (parallel.world.main or parallel.kind == "fsdp"):
        return
    tensors: dict[str, torch.Tensor] = {}
    for name, mod in task.modules().items():
        tensors.update(checkpoint.prefixed(parallel.full_state(mod.state_dict()), f"module.{name}"))
    if ema is not None:
        tensors.update(checkpoint.prefixed(parallel.full_state(ema.state_dict()), "ema"))
    groups = {}
    for name, (opt, _) in task.optimizers.items():
        sd = opt.state_dict()
        groups[name] = sd["param_groups"]
        for pid, st in sd["state"].items():
            for k, v in parallel.full_state(st).items():
                tensors[f"opt.{name}.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    if not parallel.world.main:
        return
    checkpoint.save(
        path, tensors, "train-state", config_dict, step=step, param_groups=groups, ema_updates=ema.updates if ema else 0
    )


def load_state(path: Path, task: Task, ema: EMA | None) -> int:
    if not path.exists():
        return 0
    tensors, meta = checkpoint.load(path, "train-state")
    for name, mod in task.modules().items():
        checkpoint.load_state(mod, checkpoint.subset(tensors, f"module.{name}"), path, name)
    if ema is not None:
        checkpoint.load_state(ema.model, checkpoint.subset(tensors, "ema"), path, "EMA")
        ema.updates = meta.get("ema_updates", 0)
    for name, (opt, _) in task.optimizers.items():
        state: dict[int, dict] = {}
        for k, v in checkpoint.subset(tensors, f"opt.{name}").items():
            pid, key = k.split(".", 1)
            state.setdefault(int(pid), {})[key] = v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"][name]})
    return int(meta["step"])


class _InterruptFlag:
    """Turns the first Ctrl-C / SIGTERM into a flag so the loop saves its state at the end of the step."""

    def __init__(self):
        self.flag = False

    def _handler(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True

    def __enter__(self):
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)
        return False
