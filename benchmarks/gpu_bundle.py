"""`make gpu-check-bundle`: the folder a lent GPU machine carries for benchmarks/gpu_check.py (default .whl/).

A call to the GPU machine carries the working tree (tracked and untracked-not-ignored files) plus the carried folders,
at most 64 MiB in all. Into the room the tree leaves, this writes
  - the diffusers wheel of the version installed here, downloaded once with pip and trimmed of diffusers/pipelines
    and diffusers/modular_pipelines (the check builds UNet2DConditionModel and AutoencoderKL only; the models import
    nothing from them), its RECORD rewritten so that it is still a valid wheel;
  - fashion-mnist/: the first N Fashion-MNIST training images and labels as IDX files (the format of Debian's
    dataset-fashion-mnist, which ldmkit reads), N the most that fits, in thousands.
It prints what it wrote and what did not fit.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 64 * 2**20  # what one call of the GPU machine carries
MARGIN = 2**20  # left free for files others add to the tree before the call
DROPPED = ("diffusers/pipelines/", "diffusers/modular_pipelines/")


def travelling_bytes() -> int:
    """Bytes of the working tree that a call carries: tracked files and untracked files git does not ignore."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    paths = {ROOT / p for p in out.decode().split("\0") if p}
    return sum(p.stat().st_size for p in paths if p.is_file())


def trimmed_wheel(src: Path, dest: Path) -> Path:
    """A copy of the diffusers wheel `src` without its pipelines, with a RECORD that lists what it holds."""
    out = dest / src.name
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        lines = []
        for info in zin.infolist():
            if info.filename.startswith(DROPPED) or info.filename == record_name:
                continue
            data = zin.read(info)
            zout.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{info.filename},sha256={digest},{len(data)}")
        zout.writestr(record_name, "\n".join(lines + [f"{record_name},,"]) + "\n")
    return out


def idx_bytes(array: np.ndarray) -> bytes:
    """An uint8 array as an IDX file: 0, 0, type 0x08, ndim, big-endian int32 sizes, then the values."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_data(dest: Path, room: int) -> str:
    """The first N training images that fit in `room` bytes, as IDX files in dest/fashion-mnist; what was done."""
    from ldmkit.data.fashion_mnist import load_arrays

    try:
        images, labels = load_arrays("train")
    except Exception as e:  # the Debian package is missing here
        return f"no Fashion-MNIST data written: {e}"
    folder = dest / "fashion-mnist"
    shutil.rmtree(folder, ignore_errors=True)
    sample = len(gzip.compress(idx_bytes(images[:5000]), 9)) / 5000  # bytes per image, compressed
    n = int(room / (sample + 1) // 1000 * 1000)
    while n >= 1000:
        files = {
            "train-images-idx3-ubyte.gz": gzip.compress(idx_bytes(images[:n]), 9),
            "train-labels-idx1-ubyte.gz": gzip.compress(idx_bytes(labels[:n].astype(np.uint8)), 9),
        }
        if sum(len(b) for b in files.values()) <= room:
            folder.mkdir(parents=True)
            for name, data in files.items():
                (folder / name).write_bytes(data)
            return f"fashion-mnist/: the first {n:,} of {len(images):,} training images"
        n -= 1000
    return (
        f"no Fashion-MNIST data written: {room / 2**20:.1f} MiB left holds fewer than 1,000 images; the quality part "
        f"will be skipped on the GPU machine"
    )


def make(dest: Path) -> int:
    sys.path.insert(0, str(ROOT))
    dest.mkdir(parents=True, exist_ok=True)
    version = importlib.metadata.version("diffusers")
    for old in dest.glob("diffusers-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp]
        subprocess.run(cmd + [f"diffusers=={version}"], check=True)
        wheel = trimmed_wheel(next(Path(tmp).glob("diffusers-*.whl")), dest)
    shutil.rmtree(dest / "fashion-mnist", ignore_errors=True)
    tree = travelling_bytes()
    others = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    room = LIMIT - tree - others - MARGIN
    data = write_data(dest, room) if room > 0 else "no Fashion-MNIST data written: no room left"
    total = tree + sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB (diffusers {version} without its pipelines)")
    print(data)
    mib = f"{tree / 2**20:.1f} MiB + {dest.name}/ = {total / 2**20:.1f} MiB"
    print(f"working tree {mib} of the {LIMIT / 2**20:.0f} MiB a call carries")
    return 0
