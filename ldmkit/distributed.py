"""Several processes under `torchrun`: which one this is, its device, and the few collective steps ldmkit needs.

torchrun starts one process per device and tells each its RANK, LOCAL_RANK and WORLD_SIZE in the environment; the
process group is torch.distributed's (NCCL between CUDA devices, gloo between CPU processes). A command run without
torchrun (or with one process) gets `World()`, the single process, and every helper here is then a no-op, so the
code that trains or generates is the same either way.

Rules the callers keep: rank 0 alone writes files (run folder, logs, checkpoints, images); work whose result every
rank needs (a check of the run folder, a cache build) runs on rank 0 first, and an error there reaches every rank
(`World.on_main`), so no rank is left waiting on a collective that the others will never join.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import os
import pickle
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from .errors import ConfigError, DeviceError, InputError, LdmkitError
from .runtime import resolve_device

# How long a rank waits for the others at a collective before giving up. A rank that died is noticed sooner by
# torchrun, which then stops the rest; this bounds a hang when the processes were started some other way.
TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("LDMKIT_DIST_TIMEOUT_MIN", "30")))


class OtherRankError(LdmkitError):
    """An error raised on another rank, re-raised here so that every rank stops with the same message."""


def launched() -> bool:
    """Whether this process was started by torchrun (or anything setting RANK and WORLD_SIZE) with several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def main_process() -> bool:
    """Whether this process is rank 0 of its job (or runs alone): the one that prints results."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one job."""

    rank: int = 0  # global rank, 0 .. size - 1
    size: int = 1  # number of processes (world size)
    local_rank: int = 0  # rank on this machine, which picks its CUDA device

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and shows progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """fn() on rank 0 alone; its result (picklable) is returned on every rank, and an error it raises is raised
        on every rank (the original on rank 0, an equal one elsewhere), so that all ranks stop together."""
        if not self.active:
            return fn()
        box: list[Any] = [None]
        error: BaseException | None = None
        if self.main:
            try:
                box = [("ok", fn())]
            except Exception as e:  # noqa: BLE001 - every error must reach the other ranks
                error = e
                box = [("error", _portable(e))]
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise error if error is not None else value
        return value

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the body on rank 0, then on the other ranks: for work that fills a cache the others then read. An
        error on rank 0 is raised on every rank."""
        if not self.active:
            yield
            return
        if self.main:
            error: Exception | None = None
            try:
                yield
            except Exception as e:  # noqa: BLE001 - every error must reach the other ranks
                error = e
            self.on_main(lambda: _reraise(error) if error is not None else None)
        else:
            self.on_main(lambda: None)  # waits for rank 0's body, raising its error
            yield

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean of each value over the ranks (each rank must pass the same keys)."""
        if not self.active or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.collective_device())
        dist.all_reduce(t)
        return {k: float(v) / self.size for k, v in zip(keys, t.tolist())}

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on at least one."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.collective_device())
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def collective_device(self) -> torch.device:
        """Where tensors of collectives live: the CUDA device under NCCL, else the CPU."""
        if self.active and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def shard(self, n: int) -> range:
        """The items of n (in order) this rank handles: a contiguous block; blocks differ by at most one item."""
        per, extra = divmod(n, self.size)
        start = self.rank * per + min(self.rank, extra)
        return range(start, start + per + (1 if self.rank < extra else 0))

    def check_same(self, what: str, value: dict[str, Any]) -> None:
        """Refuse, on every rank, a `value` (a flat dict) that is not the same on all ranks, naming the keys."""
        if not self.active:
            return
        every = self.gather(value)
        for r, other in enumerate(every):
            keys = sorted(k for k in set(other) | set(every[0]) if other.get(k) != every[0].get(k))
            if keys:
                shown = ", ".join(f"{k}: {every[0].get(k)!r} on rank 0, {other.get(k)!r} on rank {r}" for k in keys[:6])
                raise ConfigError(
                    f"the ranks of this job were started with different {what} ({shown}); start every node's "
                    f"torchrun with the same command and settings"
                )


def _portable(e: BaseException) -> BaseException:
    """`e` when it survives pickling (to be sent to the other ranks), else an OtherRankError with its message."""
    try:
        copy = pickle.loads(pickle.dumps(e))
        return copy if str(copy) == str(e) else OtherRankError(f"on rank 0: {e}")
    except Exception:  # noqa: BLE001
        return OtherRankError(f"on rank 0: {type(e).__name__}: {e}")


def _reraise(e: BaseException):
    raise e


def world() -> World:
    """This process's World: from the process group once it is set up, else the single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World()


def device_for(name: str, option: str = "train.device") -> torch.device:
    """The device of this rank for a device setting: under torchrun, "auto" and "cuda" name this rank's own CUDA
    device (cuda:LOCAL_RANK); an explicit "cuda:N" is refused there, as every rank would pick the same device."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        return torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name) if name in ("cpu", "cuda") else None
    if dev is None:
        raise InputError(
            f"{option} {name!r} under torchrun: each rank picks its own device; use {option}=cuda (one GPU per "
            f"rank, by LOCAL_RANK) or cpu"
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{option} cuda was requested but CUDA is not available; use {option}=cpu")
        if local >= torch.cuda.device_count():
            raise DeviceError(
                f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} CUDA device(s); start "
                f"torchrun with --nproc-per-node {torch.cuda.device_count()} or fewer"
            )
        return torch.device("cuda", local)
    return dev


@contextlib.contextmanager
def process_group(device_name: str, option: str = "train.device") -> Iterator[tuple[World, torch.device]]:
    """`with process_group(cfg.device) as (world, device):` joins the job's process group when torchrun started
    this process (and leaves it at the end, if it joined here), else yields the single process and its device."""
    if not launched():
        yield World(), resolve_device(device_name, option)
        return
    device = device_for(device_name, option)
    joined = not dist.is_initialized()
    if joined:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=TIMEOUT)
    try:
        yield world(), device
    except BaseException:
        if joined and dist.is_initialized():
            _leave(together=False)  # another rank may never reach a barrier: leave at once
        raise
    if joined and dist.is_initialized():
        _leave(together=True)


# Process groups this process has left, kept until it exits. A gloo group runs each collective on worker threads,
# which free the collective's tensors after the caller has moved on, and freeing a tensor Python dropped takes the
# interpreter lock. Two ways that went wrong at the end of a run on a loaded CPU, where the workers run late:
# - the group's destructor waits for its workers; run by a DDP wrapper's reducer (the group's last holder after
#   destroy_process_group) it holds the lock meanwhile, and the process hangs;
# - a worker still freeing tensors when the interpreter finalises is stopped mid-destructor, and the process aborts.
# So the group is released at exit (_release_left), by its Python handle, whose destructor lets go of the lock and
# waits for the workers to finish, after whatever else held the group (a DDP wrapper in a reference cycle) is gone.
_LEFT: list[Any] = []


def _release_left() -> None:
    if not _LEFT:
        return
    sys.last_type = sys.last_value = sys.last_traceback = None  # an error that ended the process, already shown
    gc.collect()  # wrappers (DDP and its reducer) that hold the group from a reference cycle
    _LEFT.clear()


atexit.register(_release_left)


def _leave(together: bool) -> None:
    """Leave the job's process group, keeping its handle until exit (see _LEFT). together: wait for every rank
    first, so that no rank exits while another still talks to it (a rank that left right after the last collective
    was seen to abort in gloo's teardown on a loaded CPU)."""
    _LEFT.append(dist.group.WORLD)
    if together:
        dist.barrier()
    dist.destroy_process_group()
