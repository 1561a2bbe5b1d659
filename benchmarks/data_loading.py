"""How fast do a user's own image folders load: the prepared-image cache against decoding every item every time.

    .venv/bin/python benchmarks/data_loading.py                  # 2,000 images of each kind (the full setting)
    .venv/bin/python benchmarks/data_loading.py --quick          # 200 of each, for a smoke run
    .venv/bin/python benchmarks/data_loading.py --n 500 --baseline-n 200 --resolutions 64

Two generated folders (deterministic synthetic pictures, written once under --work and reused by later runs):
`jpeg-12mp`, 4000x3000 JPEGs at quality 90 (a smooth random field with fine grain, about 4 MB each, as camera
photos), and `png-1mp-alpha`, 1152x864 RGBA PNGs with a varying alpha channel. For each folder and training
resolution:
- baseline: what the common training scripts do, decoding and resizing every item in `__getitem__` (PIL open,
  convert to RGB, bilinear resize of the shorter side, centre crop) with a 2-worker DataLoader, batches of 64;
- first pass: building the prepared-image cache from nothing (header checks, decode with JPEG draft and reduce,
  writing the memory-mapped shards), with 2 decoding processes;
- steady state: every later epoch, the training loop's own loader (`training.batches.step_images`, batches of 64
  as float tensors in [-1, 1]) reading the cache with 0 and with 2 worker processes.
The source files are in the OS page cache for both the baseline and the first pass (a warm second run).
Then the autoencoder's training step (the `demo-autoencoder` model with 3 channels at 64 px, batch 16) is timed on
the 12-megapixel folder through the cache against the same step on the same pixels held in memory; both runs see
identical batches, so their losses must be equal. Writes benchmarks/out/data_loading.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import default_out, write_json  # noqa: E402

from ldmkit.config import AutoencoderRun, DataConfig, load_run  # noqa: E402
from ldmkit.data.folder import ImageFolder  # noqa: E402
from ldmkit.training.autoencoder import AutoencoderTask  # noqa: E402
from ldmkit.training.batches import step_images, to_device  # noqa: E402
from ldmkit.training.loop import train  # noqa: E402

BATCH = 64  # images per loader batch
KINDS = {  # folder name -> (width, height, suffix)
    "jpeg-12mp": (4000, 3000, "jpg"),
    "png-1mp-alpha": (1152, 864, "png"),
}
TARGET_STEADY = 2000.0  # images/s at 64 px from the cache
TARGET_FIRST = 5.0  # first pass / baseline on the 12-megapixel JPEGs
TARGET_AE = 0.10  # AE step time with the cache at most this much above the in-memory one

# --- the generated folders --------------------------------------------------------------------------------------

_TEXTURES: dict[str, np.ndarray] = {}


def _texture(kind: str) -> np.ndarray:
    """The (H, W, C) uint8 field every picture of a kind is cut from: random colour blobs upsampled, plus grain."""
    if kind not in _TEXTURES:
        w, h, _ = KINDS[kind]
        c = 3 if kind.startswith("jpeg") else 4
        rng = np.random.default_rng(1234 + len(kind))
        blobs = rng.integers(0, 256, (h // 48 + 1, w // 48 + 1, c), dtype=np.uint8)
        field = np.asarray(Image.fromarray(blobs).resize((w, h), Image.Resampling.BICUBIC)).astype(np.int16)
        field[..., :3] += rng.integers(-10, 11, (h, w, 1), dtype=np.int16)  # luminance grain
        _TEXTURES[kind] = np.clip(field, 0, 255).astype(np.uint8)
    return _TEXTURES[kind]


def _write_one(job: tuple[str, str, int]) -> None:
    """Picture i of a kind: its texture rolled by an offset and re-tinted by a per-channel lookup table."""
    kind, folder, i = job
    w, h, suffix = KINDS[kind]
    path = Path(folder) / f"{i:05d}.{suffix}"
    if path.is_file():
        return
    rng = np.random.default_rng(i)
    arr = np.roll(_texture(kind), (int(rng.integers(h)), int(rng.integers(w))), axis=(0, 1))
    img = Image.fromarray(arr)
    gains = rng.uniform(0.6, 1.4, len(img.getbands()))
    lut = [min(255, int(v * g)) for g in gains for v in range(256)]
    img = img.point(lut)
    tmp = path.with_name(f".{path.name}.tmp")  # a folder interrupted while generated never holds a torn file
    if suffix == "jpg":
        img.save(tmp, "JPEG", quality=90)
    else:
        img.save(tmp, "PNG", compress_level=3)
    os.replace(tmp, path)


def make_folders(work: Path, n: int) -> dict[str, Path]:
    """The generated folders with at least n pictures each (files already there are kept)."""
    out = {}
    for kind in KINDS:
        folder = work / "images" / kind
        folder.mkdir(parents=True, exist_ok=True)
        jobs = [(kind, str(folder), i) for i in range(n) if not (folder / f"{i:05d}.{KINDS[kind][2]}").is_file()]
        if jobs:
            t0 = time.time()
            print(f"generating {len(jobs)} pictures in {folder} ...", file=sys.stderr, flush=True)
            with multiprocessing.get_context("fork").Pool(2) as pool:
                for _ in pool.imap_unordered(_write_one, jobs, chunksize=8):
                    pass
            print(f"  {time.time() - t0:.0f} s", file=sys.stderr)
        out[kind] = folder
    return out


# --- the three ways of loading ----------------------------------------------------------------------------------


class DecodeEachTime(torch.utils.data.Dataset):
    """The baseline: each item decoded and resized from its file when asked for, as common training scripts do."""

    def __init__(self, folder: Path, n: int, resolution: int):
        self.files = sorted(folder.iterdir())[:n]
        self.r = resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        r = self.r
        with Image.open(self.files[i]) as img:
            img = img.convert("RGB")
            w, h = img.size
            s = r / min(w, h)
            img = img.resize((max(r, round(w * s)), max(r, round(h * s))), Image.Resampling.BILINEAR)
            left, top = (img.width - r) // 2, (img.height - r) // 2
            img = img.crop((left, top, left + r, top + r))
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # (3, R, R) uint8
        return x.float().div(127.5).sub(1.0)


def baseline(folder: Path, n: int, resolution: int) -> float:
    """Images/s of the baseline over n items with 2 workers."""
    ds = DecodeEachTime(folder, n, resolution)
    t0 = time.time()
    seen = sum(len(x) for x in torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=2))
    return seen / (time.time() - t0)


def data_cfg(folder: Path, n: int, resolution: int) -> DataConfig:
    return DataConfig(dataset=str(folder), resolution=resolution, channels=3, limit=n, holdout=0)


def first_pass(folder: Path, n: int, resolution: int) -> tuple[float, ImageFolder]:
    """Images/s of building the cache from nothing (its folder removed first), header checks included."""
    cfg = data_cfg(folder, n, resolution)
    shutil.rmtree(ImageFolder(cfg).cache.path, ignore_errors=True)
    t0 = time.time()
    ds = ImageFolder(cfg)
    report = ds.prepare(workers=2)
    secs = time.time() - t0
    assert report.decoded == n and not report.skipped, report.line()
    return n / secs, ds


def steady(folder: Path, n: int, resolution: int, workers: int, images: int) -> float:
    """Images/s of the training loader reading the cache, after its first batch (worker start-up excluded)."""
    ds = ImageFolder(data_cfg(folder, n, resolution))
    assert ds.prepare().decoded == 0
    steps = max(2, images // BATCH) + 1
    it = step_images(ds, 0, BATCH, 0, steps, workers, torch.device("cpu"))
    next(it)
    t0 = time.time()
    for x in it:
        assert x.shape == (BATCH, 3, resolution, resolution)
    return (steps - 1) * BATCH / (time.time() - t0)


# --- the autoencoder's step -------------------------------------------------------------------------------------


class InMemory(torch.utils.data.Dataset):
    """Images held as one float tensor (N, C, H, W) in [-1, 1]: no files, no loading processes."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": -1, "caption": "", "index": i}


def ae_step_times(dataset, folder: Path, n: int, steps: int, workers: int) -> tuple[list[float], list[float]]:
    """(seconds of each training step after 3 warm-up steps, the loss of every step) of the demo autoencoder on
    `dataset`, 3 channels at 64 px, batch 16, as `ldmkit train-autoencoder` runs it."""
    over = [f"data.dataset={folder}", "data.resolution=64", "data.channels=3", "model.in_channels=3"]
    over += [f"data.limit={n}", "data.holdout=0", f"train.steps={steps}", "train.batch_size=16"]
    over += ["train.log_every=1", "train.ckpt_every=0", f"train.num_workers={workers}", "train.device=cpu"]
    run = load_run(AutoencoderRun, "demo-autoencoder", over)
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        res = train(AutoencoderTask(run, dataset, cpu), run.train, out, cpu, progress=False)
    secs = [run.train.batch_size / h["images_per_s"] for h in res.history]
    return secs[3:], [h["loss"] for h in res.history]


def ae_compare(folder: Path, n: int, steps: int, rounds: int = 2) -> dict:
    """Median step time through the cache (default workers, and none) against in memory, alternating runs so
    that the load of other processes on the machine falls on all three alike."""
    ds = ImageFolder(data_cfg(folder, n, 64))
    ds.prepare(workers=2)
    uint8 = ds.load_batch(range(len(ds)), torch.Generator().manual_seed(0))  # centre crops: the cached pixels
    mem = InMemory(to_device(uint8, torch.device("cpu")))
    times: dict[str, list[float]] = {"in memory": [], "cache, 2 workers": [], "cache, 0 workers": []}
    losses: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, data, workers in (("in memory", mem, 0), ("cache, 2 workers", ds, 2), ("cache, 0 workers", ds, 0)):
            secs, loss = ae_step_times(data, folder, n, steps, workers)
            times[name] += secs
            losses[name] = loss
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "step_s": {k: round(v, 4) for k, v in med.items()},
        "steps_timed": {k: len(v) for k, v in times.items()},
        "same_losses": all(v == losses["in memory"] for v in losses.values()),
        "overhead": {k: round(v / med["in memory"] - 1, 4) for k, v in med.items()},
    }


# --- the run ----------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="images of each kind (default 2000, the full setting)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: --n 200 and fewer AE steps")
    ap.add_argument("--baseline-n", type=int, default=None, help="items the baseline decodes (default: --n)")
    ap.add_argument("--resolutions", default="64,256")
    ap.add_argument("--ae-steps", type=int, default=None, help="AE steps per timed run (default 23, quick 8)")
    ap.add_argument("--work", default="benchmarks/out/data_loading", help="generated folders and the cache")
    args = ap.parse_args()
    n = 200 if args.quick and args.n == 2000 else args.n
    base_n = min(n, args.baseline_n or n)
    ae_steps = args.ae_steps or (8 if args.quick else 23)
    resolutions = [int(r) for r in args.resolutions.split(",")]
    work = Path(args.work).resolve()
    os.environ["LDMKIT_CACHE"] = str(work / "cache")  # the cache this run builds and removes, not the user's
    folders = make_folders(work, n)
    t_start = time.time()  # the measurements alone, without generating the folders

    rows = []
    for kind, folder in folders.items():
        for r in resolutions:
            print(f"{kind} at {r} px ...", file=sys.stderr, flush=True)
            row = {"folder": kind, "resolution": r, "n": n, "baseline_n": base_n}
            row["baseline"] = baseline(folder, base_n, r)
            row["first_pass"], _ = first_pass(folder, n, r)
            row["steady_0"] = steady(folder, n, r, 0, max(2 * n, 8192))
            row["steady_2"] = steady(folder, n, r, 2, max(2 * n, 8192))
            row["first_vs_baseline"] = row["first_pass"] / row["baseline"]
            row["steady_vs_baseline"] = max(row["steady_0"], row["steady_2"]) / row["baseline"]
            rows.append(row)
    print("autoencoder step ...", file=sys.stderr, flush=True)
    ae = ae_compare(folders["jpeg-12mp"], n, ae_steps)

    cpu = platform.processor() or platform.machine()
    print(f"\ndata_loading on {cpu}, {os.cpu_count()} cores, torch {torch.__version__}; images/s, batches of {BATCH}")
    head = f"{'folder':<15}{'px':>5}{'baseline':>10}{'first pass':>12}{'x':>7}{'steady 0w':>11}{'steady 2w':>11}"
    print(head)
    for w in rows:
        print(
            f"{w['folder']:<15}{w['resolution']:>5}{w['baseline']:>10.1f}{w['first_pass']:>12.1f}"
            f"{w['first_vs_baseline']:>7.1f}{w['steady_0']:>11.0f}{w['steady_2']:>11.0f}"
        )
    print("\nautoencoder step (64 px, batch 16)   seconds   vs in memory")
    for k, v in ae["step_s"].items():
        print(f"  {k:<35}{v:>7.3f}{ae['overhead'][k]:>+12.1%}")
    print(f"  identical losses in all three: {ae['same_losses']}")
    wall = time.time() - t_start
    print(f"measured in {wall / 60:.1f} min (folders generated before)")

    at64 = [max(w["steady_0"], w["steady_2"]) for w in rows if w["resolution"] == 64]
    jpeg = [w["first_vs_baseline"] for w in rows if w["folder"] == "jpeg-12mp"]
    targets = {
        "steady_64px_at_least_2000": bool(at64) and min(at64) >= TARGET_STEADY,
        "first_pass_at_least_5x_baseline_on_jpeg": bool(jpeg) and min(jpeg) >= TARGET_FIRST,
        "ae_step_with_cache_within_10pct": ae["overhead"]["cache, 2 workers"] <= TARGET_AE,
    }
    print("\ntargets: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in targets.items()))
    result = {
        "date": str(date.today()),
        "machine": f"{cpu}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "batch": BATCH,
        "rows": [{k: round(v, 2) if isinstance(v, float) else v for k, v in w.items()} for w in rows],
        "autoencoder": ae,
        "minutes": round(wall / 60, 1),
        "targets": targets,
    }
    write_json(default_out("data_loading"), result)


if __name__ == "__main__":
    main()
