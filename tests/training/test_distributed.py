"""Training and evaluation under torchrun: 2 CPU processes with gloo against one process, on tiny models.

Each torchrun launch costs a few seconds of start-up, so one module-scoped two-rank run of each command serves
several tests.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit import checkpoint
from ldmkit.cli import main
from ldmkit.config import TrainConfig
from ldmkit.data import build_dataset
from ldmkit.distributed import World
from ldmkit.errors import ConfigError
from ldmkit.evaluation.evaluate import _generated
from ldmkit.ldm import LatentDiffusion
from ldmkit.training.batches import item_generators, rank_positions
from ldmkit.training.loop import STATE_FILE
from ldmkit.training.parallel import check_batch, strategy
from tests.factory import ATTENTION_UNET, AUTOENCODER, set_options

# the tests' tiny autoencoder and attention U-Net (tests/factory.py) on 16x16 grayscale images, as command-line options
TRAIN = dict(lr=1e-3, warmup_steps=2, ema_decay=0.9, log_every=1, num_workers=0)
AE_ARGS = [
    *["--resolution", "16", "--batch-size", "8", "--device", "cpu", "--quiet"],
    *set_options("data", dict(channels=1, holdout=0)),
    *set_options("model", AUTOENCODER | dict(mid_attention=False)),
    *set_options("loss", dict(perceptual_weight=0, disc_start=1, disc_channels=8, disc_layers=2)),
    *set_options("train", dict(grad_accum=2) | TRAIN),
]
UNET_ARGS = [
    *["--resolution", "16", "--batch-size", "8", "--device", "cpu", "--quiet"],
    *set_options("data", dict(channels=1)),
    *set_options("unet", ATTENTION_UNET),
    *set_options("train", TRAIN),
]


def torchrun(args, nproc=2, check=True, timeout=180, env=None):
    """`torchrun --standalone --nproc-per-node N -m ldmkit ARGS` (a free port of its own), its CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "ldmkit", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def state(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path / STATE_FILE, "train-state")[0]


def assert_same_weights(a: dict, b: dict, tol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=tol, rtol=tol), (k, (a[k] - b[k]).abs().max())


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """16 grayscale 16x16 PNGs of a bright square at different places."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(16):
        a = np.zeros((16, 16), np.uint8)
        o = int(rng.integers(0, 8))
        a[o : o + 8, o : o + 8] = 255
        Image.fromarray(a).save(d / f"{i:02d}.png")
    return d


@pytest.fixture(scope="module")
def ae_runs(tmp_path_factory, images):
    """The same 3-step autoencoder run (GAN from step 1, 2 micro-batches) by 2 ranks and by one process."""
    root = tmp_path_factory.mktemp("ae")
    args = ["train-autoencoder", "--data", images, *AE_ARGS, "--steps", "3"]
    two = torchrun([*args, "--out", root / "two"])
    assert main([*map(str, args), "--out", str(root / "one")]) == 0
    return root, two


def test_two_ranks_train_the_autoencoder_of_one_process(ae_runs):
    root, _ = ae_runs
    assert_same_weights(state(root / "two"), state(root / "one"))
    a = checkpoint.load(root / "two" / "autoencoder.safetensors")[0]
    b = checkpoint.load(root / "one" / "autoencoder.safetensors")[0]
    assert_same_weights(a, b)
    logs = [json.loads(x) for x in (root / "two" / "log.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (root / "one" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3]  # each step logged once: rank 0 alone writes
    for r, q in zip(logs, ref):  # the logged values are the whole batch's, averaged over the ranks
        assert r.keys() == q.keys()
        for k in {"loss", "l1", "d_weight", "d_loss", "grad_norm_autoencoder"} & q.keys():
            assert r[k] == pytest.approx(q[k], rel=1e-4), k


def test_only_rank_0_writes_and_reports(ae_runs):
    root, proc = ae_runs
    assert sorted(p.name for p in (root / "two").iterdir()) == sorted(p.name for p in (root / "one").iterdir())
    assert proc.stdout.count("autoencoder written to") == 1


def test_a_run_of_2_ranks_resumes_in_one_process(ae_runs, images, tmp_path):
    root, _ = ae_runs
    shutil.copytree(root / "two", tmp_path / "two")
    shutil.copytree(root / "one", tmp_path / "one")
    base = ["train-autoencoder", "--data", str(images), *AE_ARGS, "--steps", "5", "--resume"]
    assert main([*base, "--out", str(tmp_path / "two")]) == 0  # warns that train.steps changed
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    assert_same_weights(state(tmp_path / "two"), state(tmp_path / "one"))
    steps = [json.loads(x)["step"] for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def unet_runs(ae_runs, images, tmp_path_factory):
    """The same 3-step class-free U-Net run on the autoencoder's latents by 2 ranks and by one process."""
    root = tmp_path_factory.mktemp("unet")
    ae = ae_runs[0] / "one" / "autoencoder.safetensors"
    args = ["train", "--data", images, "--autoencoder", ae, *UNET_ARGS, "--steps", "3"]
    two = torchrun([*args, "--out", root / "two"])
    assert main([*map(str, args), "--out", str(root / "one")]) == 0
    return root, two


def test_two_ranks_train_the_denoiser_of_one_process(unet_runs):
    root, proc = unet_runs
    assert_same_weights(state(root / "two"), state(root / "one"))
    assert proc.stdout.count("model written to") == 1


def test_ranks_generate_their_share_of_the_images_of_one_process(unet_runs):
    ldm = LatentDiffusion.load(unet_runs[0] / "one" / "model.safetensors")
    ds = build_dataset(ldm.run.data)
    idx = list(range(5))
    whole = torch.cat(list(_generated(ldm, ds, idx, "euler", 2, 1.0, 3, 2, False)))
    shares = [World(r, 2).shard(5) for r in range(2)]
    assert [list(s) for s in shares] == [[0, 1, 2], [3, 4]]
    parts = [torch.cat(list(_generated(ldm, ds, idx, "euler", 2, 1.0, 3, 2, False, s))) for s in shares]
    assert torch.allclose(torch.cat(parts), whole, atol=1e-5)


def test_evaluate_under_torchrun_gives_the_numbers_of_one_process(unet_runs, tmp_path):
    model = unet_runs[0] / "one" / "model.safetensors"
    # torchrun refuses `--n`, an ambiguous abbreviation of its own options: --images is its other name
    args = ["evaluate", model, "--images", "6", "--steps", "2", "--batch-size", "2", "--device", "cpu", "--quiet"]
    proc = torchrun([*args, "--out", tmp_path / "two.json"])
    assert proc.stdout.count("written") == 1
    assert main([*map(str, args), "--out", str(tmp_path / "one.json")]) == 0
    two, one = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("two", "one"))
    assert two["ranks"] == 2 and "ranks" not in one
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-4) and two["kid"] == pytest.approx(one["kid"], rel=1e-3)


def test_sample_under_torchrun_writes_the_files_of_one_process(unet_runs, tmp_path):
    """`ldmkit sample` at 2 ranks: each draws its block of the images and writes its files (--separate), or sends
    its tiles to rank 0 for the grid; the files are those of one process (at one thread, as torchrun's ranks run),
    and rank 0 alone reports every path."""
    model = unet_runs[0] / "one" / "model.safetensors"
    args = ["sample", model, "--images", "5", "--steps", "2", "--batch-size", "2", "--sampler", "euler"]
    args += ["--device", "cpu", "--quiet"]
    single = [sys.executable, "-m", "ldmkit", *map(str, args)]
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    for kind, out in (("separate", ["--separate", "--out"]), ("grid", ["--out"])):
        name = "" if kind == "separate" else ".png"
        two = torchrun([*args, *out, tmp_path / f"two{name}"])
        one = subprocess.run(
            [*single, *out, str(tmp_path / f"one{name}")], capture_output=True, text=True, env=one_thread
        )
        assert one.returncode == 0, one.stderr
        assert two.stdout.count(".png") == one.stdout.count(".png") == (5 if kind == "separate" else 1)
    names = [f"{i:05d}.png" for i in range(5)]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == names
    for f in names:
        assert (tmp_path / "two" / f).read_bytes() == (tmp_path / "one" / f).read_bytes(), f
    assert (tmp_path / "two.png").read_bytes() == (tmp_path / "one.png").read_bytes()


def test_item_draws_do_not_depend_on_the_world_size():
    """Each rank's share of every micro-batch, and each item's generator, are those of one process."""
    one = rank_positions(12, 3, 1, 0)
    two = [rank_positions(12, 3, 2, r) for r in range(2)]
    assert sorted(torch.cat(two).tolist()) == one.tolist() == list(range(12))
    assert two[0][:2].tolist() == [0, 1] and two[1][:2].tolist() == [2, 3]  # micro-batch 0 = items 0..3
    a = item_generators(5, 7, [3])[0]
    b = item_generators(5, 7, range(8))[3]
    assert torch.equal(torch.randn(4, generator=a), torch.randn(4, generator=b))


def test_a_world_size_that_does_not_divide_the_batch_is_refused():
    with pytest.raises(ConfigError, match=r"train.batch_size 6 .*world size 4"):
        check_batch(TrainConfig(batch_size=6), World(0, 4))
    with pytest.raises(ConfigError, match=r"train.batch_size 8 .*grad_accum 2 x world size 3"):
        check_batch(TrainConfig(batch_size=8, grad_accum=2), World(0, 3))
    check_batch(TrainConfig(batch_size=8, grad_accum=2), World(1, 2))


def test_torchrun_refuses_a_batch_its_ranks_cannot_share(images, tmp_path):
    args = ["train-autoencoder", "--data", images, *AE_ARGS, "--steps", "2", "--batch-size", "6"]
    proc = torchrun([*args, "--out", tmp_path / "r"], check=False)
    assert proc.returncode != 0
    assert "train.batch_size 6 does not divide over train.grad_accum 2 x world size 2" in proc.stderr
    assert not (tmp_path / "r" / STATE_FILE).exists()


def losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("option", ["train.gradient_checkpointing=true", "train.compile=true"])
def test_checkpointing_and_compile_keep_the_loss(unet_runs, ae_runs, images, tmp_path, option):
    ae = ae_runs[0] / "one" / "autoencoder.safetensors"
    args = ["train", "--data", images, "--autoencoder", ae, *UNET_ARGS, "--steps", "3", "--set", option]
    assert main([*map(str, args), "--out", str(tmp_path / "r")]) == 0
    assert losses(tmp_path / "r") == pytest.approx(losses(unet_runs[0] / "one"), rel=1e-4)
    assert_same_weights(state(tmp_path / "r"), state(unet_runs[0] / "one"), tol=1e-4)


def test_train_autoencoder_refuses_fsdp_with_what_to_set(images, tmp_path):
    args = ["train-autoencoder", "--data", images, *AE_ARGS, "--steps", "2", "--set", "train.distributed=fsdp"]
    proc = torchrun([*args, "--out", tmp_path / "r"], check=False)
    assert proc.returncode != 0
    assert "not supported by train-autoencoder" in proc.stderr and "set train.distributed = ddp" in proc.stderr
    assert not (tmp_path / "r" / STATE_FILE).exists()


def test_fsdp_without_torchrun_is_the_single_process():
    cfg = TrainConfig(distributed="fsdp")
    assert strategy(cfg, World()) == "none" and strategy(cfg, World(0, 2)) == "fsdp"
    assert strategy(TrainConfig(distributed="auto"), World(1, 2)) == "ddp"


FSDP = ["--set", "train.distributed=fsdp"]


@pytest.fixture(scope="module")
def fsdp_runs(unet_runs, ae_runs, images, tmp_path_factory):
    """The 3-step U-Net run of unet_runs by 2 FSDP ranks with gradient checkpointing and a grid at the end (r3); a
    copy resumed to 4 steps in one process (r4), and the one-process run resumed to 4 steps by 2 FSDP ranks (b4)."""
    root = tmp_path_factory.mktemp("fsdp")
    ae = ae_runs[0] / "one" / "autoencoder.safetensors"
    args = ["train", "--data", images, "--autoencoder", ae, *UNET_ARGS]
    opts = [*FSDP, "--set", "train.gradient_checkpointing=true", "--set", "train.sample_every=3"]
    proc = torchrun([*args, "--steps", "3", *opts, "--out", root / "r3"])
    shutil.copytree(root / "r3", root / "r4")
    assert main([*map(str, args), "--steps", "4", "--resume", "--out", str(root / "r4")]) == 0
    shutil.copytree(unet_runs[0] / "one", root / "b4")
    torchrun([*args, "--steps", "4", "--resume", *FSDP, "--out", root / "b4"])
    return root, proc


def test_fsdp_with_checkpointing_trains_the_denoiser_of_one_process(fsdp_runs, unet_runs):
    root, proc = fsdp_runs
    one = unet_runs[0] / "one"
    assert_same_weights(state(root / "r3"), state(one))  # model, EMA and Adam moments, saved in full
    assert losses(root / "r3") == pytest.approx(losses(one), rel=1e-4)
    a = checkpoint.load(root / "r3" / "model.safetensors")[0]
    b = checkpoint.load(one / "model.safetensors")[0]
    assert {k: (v.dtype, v.shape) for k, v in a.items()} == {k: (v.dtype, v.shape) for k, v in b.items()}
    assert_same_weights(a, b)
    assert proc.stdout.count("model written to") == 1
    names = {p.name for p in (root / "r3").iterdir()}
    assert names == {p.name for p in one.iterdir()} | {"samples-0000003.png"}  # rank 0 alone wrote, with full weights
    with Image.open(root / "r3" / "samples-0000003.png") as grid:
        assert np.asarray(grid).std() > 0


SHARDING = """
import sys, torch, torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from ldmkit.config import DiTConfig, TrainConfig
from ldmkit.denoisers.dit import DiT
from ldmkit.distributed import world
from ldmkit.training.ema import EMA
from ldmkit.training.parallel import Parallel

class Task:  # what Parallel.distribute needs of a training task
    def __init__(self):
        torch.manual_seed(0)
        dit = DiT(DiTConfig(preset="", depth=2, hidden_size=32, num_heads=2, patch_size=2, in_channels=2,
                            out_channels=2))
        self.model = nn.ModuleDict({"unet": dit})
        params = list(self.model.parameters())
        self.optimizers = {"denoiser": (torch.optim.AdamW(params, lr=1e-3), params)}
        self.forward = dit
    def distribute(self, parallel):
        self.forward = parallel.data_parallel(self.model["unet"])
    def step(self):
        self.forward(torch.randn(2, 2, 4, 4), torch.zeros(2)).square().mean().backward()
        self.optimizers["denoiser"][0].step()

dist.init_process_group("gloo")
w, task = world(), Task()
task.step()  # Adam moments in full, as a resumed state has them
ema = EMA(task.model, 0.9)
before = {k: v.clone() for k, v in task.model.state_dict().items()}
moments = [st["exp_avg"].clone() for st in task.optimizers["denoiser"][0].state.values()]
if w.rank == 1:  # weights that differ between ranks: rank 0's are kept, as DDP keeps them
    with torch.no_grad():
        for t in [*task.model.parameters(), *ema.model.parameters()]:
            t.add_(1.0)
parallel = Parallel(TrainConfig(distributed="fsdp"), w, torch.device("cpu"))
parallel.distribute(task, ema)
opt, params = task.optimizers["denoiser"]
local = lambda t: t.to_local().numel() if isinstance(t, DTensor) else t.numel()
assert params == list(task.model.parameters()) == opt.param_groups[0]["params"]
held = [sum(local(t) for t in ts) / sum(t.numel() for t in ts) for ts in
        (params, [st["exp_avg"] for st in opt.state.values()], list(ema.model.parameters()))]
assert max(abs(h - 0.5) for h in held) < 0.02, held  # parameters, moments and EMA: half on each of 2 ranks
units = sum(hasattr(m, "unshard") for m in task.model.modules())
assert units == 3, units  # each DiT block and the root
full = parallel.full_state(task.model.state_dict())
gathered = [parallel.full_state({"m": st["exp_avg"]}) for st in opt.state.values()]
copy = parallel.full_module(ema.model)
if w.main:
    assert all(torch.equal(full[k], before[k]) for k in before)
    assert all(torch.equal(g["m"], m) for g, m in zip(gathered, moments))
    assert all(torch.equal(v, before[k]) for k, v in copy.state_dict().items())
else:
    assert not any(isinstance(v, torch.Tensor) and v.dim() for v in full.values()) and copy is None
task.step()  # the sharded model trains
print("sharded", w.rank)
"""


def test_fsdp_shards_parameters_moments_and_ema_over_the_ranks(tmp_path):
    """Parallel.distribute on a small DiT at 2 ranks: each keeps half the parameters, Adam moments and EMA weights,
    each DiT block is a unit, and the gathered state is rank 0's state before sharding."""
    script = tmp_path / "shard.py"
    script.write_text(SHARDING)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(proc.stdout.split()) == ["0", "1", "sharded", "sharded"]


def test_an_fsdp_run_resumes_in_one_process_and_a_single_process_run_under_fsdp(fsdp_runs):
    """r4 (2 FSDP ranks, then one process) continues r3 as one process would, since r3 is one process's state
    (tested above); b4 (one process, then 2 FSDP ranks) must give its weights."""
    root, _ = fsdp_runs
    assert_same_weights(state(root / "b4"), state(root / "r4"))
    assert [json.loads(x)["step"] for x in (root / "r4" / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert checkpoint.read_metadata(root / "r4" / STATE_FILE)["step"] == 4


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the worker of torchrun process `parent` with RANK=rank."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(d.name)
    return None


def _launch_and_signal(args, out: Path, sig: int) -> tuple[int, str]:
    """Start a 2-rank run, send `sig` to rank 1 alone once a step is logged; (torchrun's exit status, stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "ldmkit"]
    proc = subprocess.Popen([*cmd, *map(str, args), "--out", str(out)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text()):
            time.sleep(0.2)
        pid = _rank_pid(proc.pid, 1)
        assert pid is not None, "rank 1 not found"
        os.kill(pid, sig)
        _, err = proc.communicate(timeout=120)
        return proc.returncode, err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_an_interrupt_to_one_rank_stops_every_rank_after_the_same_step_and_saves(images, tmp_path):
    args = ["train-autoencoder", "--data", images, *AE_ARGS, "--steps", "500", "--set", "train.ckpt_every=0"]
    rc, err = _launch_and_signal(args, tmp_path / "r", signal.SIGINT)
    assert rc != 0 and "interrupted: stopped at step" in err
    saved = checkpoint.read_metadata(tmp_path / "r" / STATE_FILE)["step"]
    assert 0 < saved < 500
    steps = [json.loads(x)["step"] for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, saved + 1))


@pytest.mark.slow
def test_a_rank_killed_mid_run_stops_the_job_and_leaves_a_state_that_resumes(images, tmp_path):
    args = ["train-autoencoder", "--data", images, *AE_ARGS, "--steps", "500", "--set", "train.ckpt_every=1"]
    rc, _ = _launch_and_signal(args, tmp_path / "r", signal.SIGKILL)
    assert rc != 0
    saved = checkpoint.read_metadata(tmp_path / "r" / STATE_FILE)["step"]  # a whole checkpoint, never a torn one
    assert 0 < saved < 500 and not list((tmp_path / "r").glob(".*.tmp"))
    resume = ["train-autoencoder", "--data", str(images), *AE_ARGS, "--steps", str(saved + 1), "--resume"]
    assert main([*resume, "--out", str(tmp_path / "r")]) == 0
    assert checkpoint.read_metadata(tmp_path / "r" / STATE_FILE)["step"] == saved + 1


def test_ranks_started_with_different_settings_are_refused_on_every_rank(images, tmp_path):
    """Two nodes whose torchrun commands differ: here two processes started by hand as ranks 0 and 1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, lr in ((0, "1e-3"), (1, "2e-3")):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
        env["MASTER_PORT"] = str(port)
        args = ["train-autoencoder", "--data", images, *AE_ARGS, "--steps", "2", "--set", f"train.lr={lr}"]
        cmd = [sys.executable, "-m", "ldmkit", *map(str, args), "--out", str(tmp_path / f"r{rank}")]
        procs.append(subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env))
    errs = [p.communicate(timeout=120)[1] for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode == 2, err
        assert "different settings (train.lr: 0.001 on rank 0, 0.002 on rank 1)" in err


LEAVING = """
import torch
from torch import nn
from ldmkit.distributed import process_group

def run():
    with process_group("cpu") as (world, device):
        ddp = nn.parallel.DistributedDataParallel(nn.Linear(4, 4))
        ddp(torch.ones(2, 4)).sum().backward()
        world.on_main(lambda: list(range(100)))  # the last collective: a broadcast from rank 0
    return ddp  # freed after the group was left, as a run's DDP wrappers are

run()
print("left")
"""


def test_ranks_leave_the_job_cleanly_right_after_a_collective_on_a_busy_cpu(tmp_path):
    """A job's end on a loaded CPU: the gloo workers run late, and a DDP wrapper that outlives the group used to
    hang its rank (the group's destructor waiting, lock held, for a worker that needs the lock), or a rank that
    left right after the last collective aborted. Several launches beside busy processes: each exits at once."""
    script = tmp_path / "leave.py"
    script.write_text(LEAVING)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    try:
        for launch in range(5):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            except subprocess.TimeoutExpired:
                pytest.fail(f"launch {launch}: a rank did not exit within 60 s after leaving the job")
            assert proc.returncode == 0, f"launch {launch}: " + proc.stderr[-2000:]
            assert proc.stdout.count("left") == 2, proc.stdout  # both ranks got to the end
    finally:
        for h in hogs:
            h.kill()
            h.wait()
