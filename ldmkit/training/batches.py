"""The data of each training step: its indices, its random generators, and its images loaded ahead by a DataLoader.

The images of step s are a pure function of (seed, s): the indices are consecutive slices of per-epoch
permutations seeded by (seed, epoch), and each item's augmentation (random crops, flips) is drawn from its own
generator, item_generators(seed, s, ..., AUGMENT_STREAM), keyed by the item's place in the step's global batch,
never from a process's global RNG. So the number of worker processes and their timing, the number of ranks and
which rank loads an item never change what a step sees, and a resumed run loads exactly the batches it would have
loaded.
"""

from __future__ import annotations

import os
import signal
from typing import Iterator

import torch

from ..data.common import reads_files, stack_images

AUGMENT_STREAM = 2  # item_generators stream of the data augmentation (0: the task's draws, 1: the global RNG)
PREFETCH = 4  # batches each worker loads ahead


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The generator for every random draw of one step: a pure function of (seed, step, stream)."""
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + step) * 7 + stream)


def item_generators(seed: int, step: int, positions, stream: int = 0) -> list[torch.Generator]:
    """One generator per item of step `step`'s global batch, for the items at `positions` (their places in it): a
    pure function of (seed, step, stream, position), so an item draws the same numbers on whichever rank, in
    whichever micro-batch and beside whichever other items it is trained."""
    base = ((seed * 1_000_003 + step) * 7 + stream) * 1_000_033
    return [torch.Generator("cpu").manual_seed((base + int(p)) % 2**63) for p in positions]


def rank_positions(batch: int, grad_accum: int, world_size: int, rank: int) -> torch.Tensor:
    """The places in each step's global batch of `batch` items that rank `rank` trains on, micro-batch by
    micro-batch: global micro-batch m (items m*M .. (m+1)*M - 1, M = batch / grad_accum) is split in equal blocks
    over the ranks, so that micro-batch m of every rank together is micro-batch m of a single process."""
    per_micro = batch // grad_accum
    share = per_micro // world_size
    return torch.cat(
        [torch.arange(m * per_micro + rank * share, m * per_micro + (rank + 1) * share) for m in range(grad_accum)]
    )


def batch_indices(seed: int, step: int, batch: int, n: int) -> torch.Tensor:
    """Indices of step `step`'s batch: consecutive slices of per-epoch permutations seeded by (seed, epoch)."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, pos = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator("cpu").manual_seed(seed * 7919 + epoch))
        out.extend(perm[pos : pos + batch - len(out)].tolist())
    return torch.tensor(out)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_workers(num_workers: int, dataset) -> int:
    """train.num_workers as a count: -1 is one per available core for data read from files, 0 for data in memory."""
    if num_workers >= 0:
        return num_workers
    return available_cores() if reads_files(dataset) else 0


class StepBatches(torch.utils.data.Dataset):
    """Item s: the images of training step s, uint8 (B, C, H, W) from a data set with load_batch (an image folder),
    else float (B, C, H, W) in [-1, 1] from its items."""

    def __init__(self, dataset, seed: int, batch_size: int, positions: torch.Tensor | None = None):
        """dataset: the training images; seed: train.seed; batch_size: images per step (all micro-batches, all
        ranks); positions: the places in each step's batch this process loads (rank_positions), default all."""
        self.dataset, self.seed, self.batch_size = dataset, seed, batch_size
        self.positions = torch.arange(batch_size) if positions is None else positions

    def __getitem__(self, step: int) -> torch.Tensor:
        idx = batch_indices(self.seed, step, self.batch_size, len(self.dataset))[self.positions].tolist()
        gens = item_generators(self.seed, step, self.positions.tolist(), AUGMENT_STREAM)
        load = getattr(self.dataset, "load_batch", None)
        if load is not None:
            return torch.cat([load([i], g) for i, g in zip(idx, gens)])
        with torch.random.fork_rng(devices=[]):  # items that draw from the global RNG draw their own numbers
            images = []
            for i, g in zip(idx, gens):
                torch.manual_seed(g.initial_seed())
                images.append(stack_images(self.dataset, [i]))
            return torch.cat(images)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A loaded batch on `device` as float in [-1, 1] (uint8 pixels are converted there, after a 4x smaller copy)."""
    x = x.to(device, non_blocking=True)
    return x.float().div(127.5).sub(1.0) if x.dtype == torch.uint8 else x


def _ignore_interrupt(worker_id: int) -> None:
    """Ctrl-C reaches every process of the terminal's group: a loading process leaves it to the training loop,
    which finishes its step and saves its state, instead of dying under it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def step_images(
    dataset,
    seed: int,
    batch_size: int,
    start: int,
    end: int,
    workers: int,
    device: torch.device,
    positions: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """The images of steps start..end-1 in order (the items at `positions` of each step's batch, default all), on
    `device`, loaded by `workers` processes (0: in this one), with pinned memory and non-blocking copies on CUDA.
    The workers live until the iterator is exhausted or closed."""
    loader = torch.utils.data.DataLoader(
        StepBatches(dataset, seed, batch_size, positions),
        batch_size=None,
        sampler=range(start, end),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=PREFETCH if workers > 0 else None,
        worker_init_fn=_ignore_interrupt if workers > 0 else None,
    )
    for x in loader:
        yield to_device(x, device)
