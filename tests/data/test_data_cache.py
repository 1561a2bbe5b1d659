"""The prepared-image cache and the fast decode: the same pixels as decoding each time, decoded once, per-file
invalidation, damaged and huge files with their real reasons, crashes, full disks and concurrent builders."""

import errno
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from ldmkit.config import DataConfig
from ldmkit.data import prepared
from ldmkit.data.decode import prepare_pixels
from ldmkit.data.folder import ImageFolder
from ldmkit.errors import DiskSpaceError, InputError
from tests.factory import AUTOENCODER, set_options

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LDMKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _noise_folder(root: Path, n: int = 12, seed: int = 0) -> Path:
    """n random RGB PNGs of varied sizes (none square), so crops and resizes show."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 256, (30 + 3 * i, 44, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"{i:02d}.png")
    return root


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(**{"dataset": str(root), "resolution": 16, "channels": 3, "holdout": 0, **kw})


def _items(ds, seed=0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.stack([ds[i]["image"] for i in range(len(ds))])


def _touch_later(path: Path):
    t = path.stat().st_mtime_ns + 2_000_000_000
    os.utime(path, ns=(t, t))


@pytest.mark.parametrize("kw", [{}, {"crop": "random", "flip": True}, {"channels": 1}])
def test_cached_items_are_the_decoded_items(tmp_path, cache, kw):
    root = _noise_folder(tmp_path / "noise")
    ds = ImageFolder(_cfg(root, **kw))
    decoded = _items(ds)  # no cache yet: every item decoded when asked for
    report = ds.prepare()
    assert report.decoded == len(ds) == 12
    assert torch.equal(_items(ds), decoded)
    assert decoded.shape == (12, kw.get("channels", 3), 16, 16)
    # a batch draws its crops and flips from its generator only: same seed, same batch; the global RNG is untouched
    state = torch.get_rng_state()
    a = ds.load_batch(range(12), torch.Generator().manual_seed(5))
    assert torch.equal(a, ds.load_batch(range(12), torch.Generator().manual_seed(5)))
    assert torch.equal(torch.get_rng_state(), state)
    assert a.dtype == torch.uint8 and a.shape == decoded.shape
    if kw.get("flip"):
        assert not torch.equal(a, ds.load_batch(range(12), torch.Generator().manual_seed(6)))
    else:  # centre crops: the batch holds the items' pixels exactly
        assert torch.equal(a.float().div(127.5).sub(1.0), decoded)


def test_later_runs_read_the_cache_and_only_changed_files_are_decoded_again(tmp_path, cache):
    root = _noise_folder(tmp_path / "noise")
    assert ImageFolder(_cfg(root)).prepare().decoded == 12
    again = ImageFolder(_cfg(root))
    assert again.prepare().decoded == 0  # a later run: nothing decoded
    before = _items(again)
    Image.new("RGB", (40, 40), (255, 0, 0)).save(root / "03.png")  # one file replaced
    _touch_later(root / "03.png")
    (root / "07.png").unlink()  # one removed
    ds = ImageFolder(_cfg(root))
    assert ds.prepare().decoded == 1 and len(ds) == 11
    now = _items(ds)
    assert torch.allclose(now[3], torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 16, 16))
    assert torch.equal(now[:3], before[:3]) and torch.equal(now[4:7], before[4:7]) and torch.equal(now[7:], before[8:])
    index = json.loads((ds.cache.path / "index.json").read_text())
    assert "07.png" not in index["entries"] and len(index["entries"]) == 11
    # another resolution, crop mode or channel count is another cache; data.limit shares it
    assert ImageFolder(_cfg(root, resolution=8)).prepare().decoded == 11
    assert ImageFolder(_cfg(root, limit=4)).prepare().decoded == 0


def test_damaged_files_are_skipped_with_their_name_and_reason_in_every_run(tmp_path, cache):
    root = _noise_folder(tmp_path / "noise", n=4)
    data = (root / "01.png").read_bytes()
    (root / "01.png").write_bytes(data[: len(data) // 3])  # a valid header, pixel data cut short
    (root / "02.png").write_bytes(b"not an image")
    for run in range(2):  # the second run reads the stored failure instead of decoding again
        with pytest.warns(UserWarning) as seen:
            ds = ImageFolder(_cfg(root))
            report = ds.prepare()
        text = "\n".join(str(w.message) for w in seen)
        assert "02.png: its header cannot be read (UnidentifiedImageError" in text
        assert "01.png: it cannot be decoded (OSError" in text and "truncated" in text
        assert len(ds) == 3 and list(report.skipped) == ["01.png"] and report.decoded == (3 if run == 0 else 0)
        assert "2 images ready" in report.line() and "skipped: 2 unreadable" in report.line()  # both bad files
        items = _items(ds)
        assert torch.equal(items[1], items[2])  # the damaged file's item is the next readable one
    (root / "01.png").write_bytes(data)  # repaired: decoded again, no warning
    _touch_later(root / "01.png")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ds = ImageFolder(_cfg(root))
        assert ds.prepare().decoded == 1 and not ds.prepare().skipped
    assert [str(w.message) for w in seen if "01.png" in str(w.message)] == []


def test_huge_images_get_the_real_reason_and_no_pillow_warning(tmp_path, cache, monkeypatch):
    """Pillow's decompression-bomb limit is replaced by data.max_pixels: below it no DecompressionBombWarning, above
    it the file is skipped saying so (it used to be "its header cannot be read"). Pillow's limit is scaled down
    here so that small files stand for huge ones."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # Pillow refuses above 1000 pixels, warns above 500
    root = tmp_path / "big"
    root.mkdir()
    Image.new("RGB", (60, 40), (0, 0, 255)).save(root / "a.png")  # 2,400 pixels
    Image.new("RGB", (80, 80), (0, 255, 0)).save(root / "b.jpg")  # 6,400 pixels; 400 decoded at 1/4 for 8 px
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = ImageFolder(_cfg(root, resolution=8))
        ds.prepare()
        assert len(ds) == 2 and torch.allclose(ds[0]["image"][:, 4, 4], torch.tensor([-1.0, -1.0, 1.0]))
    assert Image.MAX_IMAGE_PIXELS == 500  # lifted only while a header is read
    with pytest.warns(UserWarning) as seen:
        ds = ImageFolder(_cfg(root, resolution=8, max_pixels=2000))
    (msg,) = [str(w.message) for w in seen]
    assert "a.png: it is 60x40 = 2,400 pixels (a PNG file cannot be decoded smaller)" in msg
    assert "above data.max_pixels=2,000" in msg
    assert "raise data.max_pixels to 2400" in msg
    assert len(ds) == 1 and ds.files[0].name == "b.jpg"  # the JPEG decodes at 1/2 scale, under the limit
    with pytest.warns(UserWarning, match=r"b.jpg: it is 80x80 = 6,400 pixels \(still 1,600 decoded at 1/2 scale"):
        with pytest.raises(InputError, match="none of the 2 images"):
            ImageFolder(_cfg(root, resolution=16, max_pixels=1000))  # 16 px needs 1/2 scale at most


def test_large_jpegs_are_decoded_small_and_upright(tmp_path, monkeypatch):
    """A 2400x1600 photo for 32 px is decoded at 1/8 (300x200) by the DCT, and matches a full-size decode with
    LANCZOS; the EXIF orientation is applied as ImageOps.exif_transpose does."""
    y, x = np.mgrid[0:1600, 0:2400]
    wave = 128 + 100 * np.sin(x / 150) * np.cos(y / 200)
    arr = np.stack([x * 255 // 2399, y * 255 // 1599, wave], -1).astype(np.uint8)  # smooth, asymmetric
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    Image.fromarray(arr).save(tmp_path / "photo.jpg", quality=95, exif=exif.tobytes())
    sizes = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        out = draft(self, mode, size)
        sizes.append(self.size)
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    got = prepare_pixels(tmp_path / "photo.jpg", 32, 3, 0).astype(int)
    assert sizes == [(300, 200)]
    from PIL import ImageOps

    with Image.open(tmp_path / "photo.jpg") as im:
        upright = ImageOps.exif_transpose(im.convert("RGB"))  # 1600 x 2400 (portrait)
    assert upright.size == (1600, 2400)
    exact = np.asarray(upright.resize((32, 32), Image.Resampling.LANCZOS, box=(0, 400, 1600, 2000))).astype(int)
    assert np.abs(got - exact).mean() < 2.0 and np.abs(got - exact).max() < 12


def test_a_full_disk_leaves_no_half_written_cache_and_says_what_it_needs(tmp_path, cache, monkeypatch):
    root = _noise_folder(tmp_path / "noise")
    ds = ImageFolder(_cfg(root))
    real = prepared.shutil.disk_usage
    monkeypatch.setattr(prepared.shutil, "disk_usage", lambda p: real(p)._replace(free=10 * 2**20))
    with pytest.raises(DiskSpaceError, match=r"needs 64\.\d MiB more for 12 images of 16x16x3 pixels.*LDMKIT_CACHE"):
        ds.prepare()
    assert not list(cache.rglob("*.u8")) and not list(cache.rglob("index.json"))
    monkeypatch.setattr(prepared.shutil, "disk_usage", real)
    # the disk fills up while the second shard is written: the first stays committed, nothing else is left
    monkeypatch.setattr(prepared, "COMMIT_BYTES", 4 * 16 * 16 * 3)  # 4 rows a shard
    put, calls = prepared.PreparedCache._put, []

    def fill(f, pixels):
        calls.append(1)
        if len(calls) == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        put(f, pixels)

    monkeypatch.setattr(prepared.PreparedCache, "_put", staticmethod(fill))
    with pytest.raises(DiskSpaceError, match="needs .* more for 8 images"):
        ds.prepare()
    folder = ds.cache.path
    assert not list(folder.glob(".*.tmp"))
    (shard,) = folder.glob("*.u8")
    assert shard.stat().st_size == 4 * 16 * 16 * 3
    assert len(json.loads((folder / "index.json").read_text())["entries"]) == 4
    monkeypatch.setattr(prepared.PreparedCache, "_put", staticmethod(put))
    fresh = ImageFolder(_cfg(root))
    assert fresh.prepare().decoded == 8  # the committed rows are kept
    assert torch.equal(_items(fresh), _items(ImageFolder(_cfg(root))))


_CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, {root!r})
    from ldmkit.config import DataConfig
    from ldmkit.data import prepared
    from ldmkit.data.folder import ImageFolder

    mode = sys.argv[1]
    if mode == "kill":  # 4 rows a shard; killed -9 while writing the 7th row
        prepared.COMMIT_BYTES = 4 * 16 * 16 * 3
        put, calls = prepared.PreparedCache._put, []
        def put_then_die(f, pixels):
            calls.append(1)
            if len(calls) == 7:
                os.kill(os.getpid(), signal.SIGKILL)
            put(f, pixels)
        prepared.PreparedCache._put = staticmethod(put_then_die)
    else:  # a slow decoder, so that two builders overlap
        slow = prepared.prepare_pixels
        def sleepy(*a):
            time.sleep(0.05)
            return slow(*a)
        prepared.prepare_pixels = sleepy
    cfg = DataConfig(dataset={folder!r}, resolution=16, channels=3, holdout=0)
    print("decoded", ImageFolder(cfg).prepare().decoded, flush=True)
    """
)


def _child(tmp_path, cache, root, mode) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(root=str(ROOT), folder=str(root)))
    env = {**os.environ, "LDMKIT_CACHE": str(cache)}
    return subprocess.Popen([sys.executable, str(script), mode], env=env, stdout=subprocess.PIPE, text=True)


def test_kill_9_during_the_build_keeps_the_committed_part_and_nothing_torn(tmp_path, cache):
    root = _noise_folder(tmp_path / "noise")
    child = _child(tmp_path, cache, root, "kill")
    child.communicate(timeout=120)
    assert child.returncode == -9
    ds = ImageFolder(_cfg(root))
    folder = ds.cache.path
    assert list(folder.glob(".*.tmp"))  # the killed writer's temporary file
    index = json.loads((folder / "index.json").read_text())  # the committed index is whole
    assert len(index["entries"]) == 4 and all((folder / e["shard"]).is_file() for e in index["entries"].values())
    assert ds.prepare().decoded == 8
    assert not list(folder.glob(".*.tmp"))
    fresh = ImageFolder(_cfg(root))
    torch.manual_seed(0)
    decoded = torch.stack([torch.from_numpy(prepare_pixels(root / f, 16, 3, 0).copy()) for f in fresh.files])
    fresh.prepare()
    cached = torch.stack([torch.from_numpy(np.array(fresh._pixels(j))) for j in range(12)])
    assert torch.equal(cached, decoded)


def test_two_processes_building_one_cache_decode_each_file_once(tmp_path, cache):
    root = _noise_folder(tmp_path / "noise", n=16)
    children = [_child(tmp_path, cache, root, "slow") for _ in range(2)]
    outs = [c.communicate(timeout=120)[0] for c in children]
    assert [c.returncode for c in children] == [0, 0]
    counts = sorted(int(o.split()[-1]) for o in outs)
    assert counts == [0, 16]  # one built it, the other waited and found it complete
    ds = ImageFolder(_cfg(root))
    assert ds.prepare().decoded == 0 and len(list(ds.cache.path.glob("*.u8"))) == 1


def test_a_prepared_folder_pickles_small_and_maps_the_cache_again(tmp_path, cache):
    """Loading processes started by spawn get the folder pickled: without its memory maps (which would copy the
    whole cache into the pickle), reopened there."""
    root = _noise_folder(tmp_path / "noise", n=40)
    ds = ImageFolder(_cfg(root))
    ds.prepare()
    blob = pickle.dumps(ds)
    assert len(blob) < 40 * 16 * 16 * 3  # less than the pixels it serves
    assert torch.equal(_items(pickle.loads(blob)), _items(ds))


def test_compaction_rewrites_a_cache_of_mostly_stale_rows(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(prepared, "COMPACT_MIN_DEAD", 4)
    root = _noise_folder(tmp_path / "noise", n=8)
    ImageFolder(_cfg(root)).prepare()
    for f in sorted(root.glob("*.png"))[:5]:  # 5 of 8 replaced: 5 dead rows against 8 live ones
        Image.new("RGB", (20, 30), (0, 0, 0)).save(f)
        _touch_later(f)
    ds = ImageFolder(_cfg(root))
    ds.prepare()
    assert len(list(ds.cache.path.glob("*.u8"))) == 2
    for f in sorted(root.glob("*.png"))[:5]:  # 10 dead rows against 8 live ones: compacted into one shard
        Image.new("RGB", (20, 30), (255, 255, 255)).save(f)
        _touch_later(f)
    ds = ImageFolder(_cfg(root))
    ds.prepare()
    (shard,) = ds.cache.path.glob("*.u8")
    assert shard.stat().st_size == 8 * 16 * 16 * 3
    assert torch.all(_items(ds)[:5] == 1) and torch.equal(_items(ds)[5:], _items(ImageFolder(_cfg(root)))[5:])


def test_progress_shows_a_bar_and_a_summary_line(tmp_path, cache, capsys):
    root = _noise_folder(tmp_path / "noise", n=3)
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.warns(UserWarning, match="bad.png"):
        ImageFolder(_cfg(root)).prepare(progress=True)
    err = capsys.readouterr().err
    assert "preparing images" in err and "img/s" in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("image cache")]
    assert "3 images ready, 3 decoded now in" in line and "images/s" in line and "on disk" in line


# --- training from the cache --------------------------------------------------------------------------------------


def _folder_run(root: Path, workers: int, steps: int = 6):
    from dataclasses import replace

    from tests.training.test_training import tiny_ae_run

    run = tiny_ae_run(steps=steps)
    data = _cfg(root, channels=1, crop="random", flip=True)
    return replace(run, data=data, train=replace(run.train, num_workers=workers))


def test_training_on_a_folder_resumes_exactly_with_loading_processes(tmp_path, cache):
    """Crops, flips and order are a function of (seed, step): two loading processes, none, and a run stopped and
    resumed with a different count all end with the same weights."""
    from ldmkit import checkpoint
    from ldmkit.training.autoencoder import AutoencoderTask
    from ldmkit.training.loop import STATE_FILE, train

    cpu = torch.device("cpu")
    root = _noise_folder(tmp_path / "noise", n=24)
    ds = ImageFolder(_folder_run(root, 0).data)
    ds.prepare(workers=2)

    def run(out, workers, **kw):
        r = _folder_run(root, workers)
        torch.manual_seed(0)
        train(AutoencoderTask(r, ds, cpu), r.train, tmp_path / out, cpu, progress=False, **kw)
        return checkpoint.load(tmp_path / out / STATE_FILE, "train-state")[0]

    two = run("two", 2)
    none = run("none", 0)
    run("resumed", 2, stop_after=3)
    resumed = run("resumed", 0, resume=True)
    for k in two:
        assert torch.equal(two[k], none[k]) and torch.equal(two[k], resumed[k]), k


def test_ctrl_c_with_loading_processes_saves_the_state(tmp_path, cache):
    """Ctrl-C reaches the loading processes too (one process group); they must leave it to the loop, which saves
    its state at the end of the step, instead of dying and taking the step's batch with them."""
    import signal
    import time

    root = _noise_folder(tmp_path / "noise", n=24)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ldmkit.cli", "train-autoencoder", "--config", "demo-autoencoder", "--data", str(root)]
    cmd += ["--resolution", "16", "--steps", "100000", "--batch-size", "4", "--out", str(out), "--device", "cpu"]
    cmd += set_options("model", AUTOENCODER) + set_options("loss", dict(perceptual_weight=0))
    cmd += set_options("train", dict(num_workers=2, log_every=1)) + set_options("data", dict(holdout=0))
    env = {**os.environ, "LDMKIT_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and log.read_text().count("\n") >= 3):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to the whole group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "state saved" in err and "continue with --resume" in err
    assert (out / "train-state.safetensors").is_file()


# --- what a careless or hostile user does to the folder and the cache ----------------------------------------------


def test_a_shard_deleted_or_cut_short_by_hand_is_decoded_again(tmp_path, cache):
    """Removing cache files to free space, or a copy that cut one short, must cost a rebuild of those rows, not
    every later run (it used to fail each time, or blame the image file with an IndexError)."""
    root = _noise_folder(tmp_path / "noise", n=6)
    ds = ImageFolder(_cfg(root))
    ds.prepare()
    expected = _items(ds)
    (shard,) = ds.cache.path.glob("*.u8")
    os.truncate(shard, 2 * 16 * 16 * 3)  # rows 0 and 1 whole, the rest gone
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cut = ImageFolder(_cfg(root))
        assert cut.prepare().decoded == 4
        assert torch.equal(_items(cut), expected)
    for p in cut.cache.path.glob("*.u8"):
        p.unlink()
    gone = ImageFolder(_cfg(root))
    assert gone.prepare().decoded == 6
    assert torch.equal(_items(gone), expected)


def test_a_file_missing_while_the_cache_is_built_is_tried_again_next_run(tmp_path, cache, monkeypatch):
    """A file moved away and back during a build (a rename keeps its size and time) must not stay skipped in every
    later run: a failure to reach the file is reported but not recorded, unlike a damaged file."""
    root = _noise_folder(tmp_path / "noise", n=4)
    real = prepared.prepare_pixels

    def moved_away(path, *a):
        if Path(path).name == "02.png":
            os.rename(path, root / "02.moved")
            try:
                return real(path, *a)
            finally:
                os.rename(root / "02.moved", path)
        return real(path, *a)

    monkeypatch.setattr(prepared, "prepare_pixels", moved_away)
    with pytest.warns(UserWarning, match="02.png: it cannot be decoded.*No such file"):
        first = ImageFolder(_cfg(root))
        assert list(first.prepare().skipped) == ["02.png"]
    monkeypatch.setattr(prepared, "prepare_pixels", real)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = ImageFolder(_cfg(root))
        report = again.prepare()
    assert report.decoded == 1 and not report.skipped
    assert torch.equal(_items(again), _items(ImageFolder(_cfg(root))))


def test_the_summary_counts_every_file_left_out(tmp_path, cache):
    """A 0-byte file, a truncated JPEG and a file with a damaged body: the summary line counts all three, whether
    they failed at the header check or at the decode."""
    root = _noise_folder(tmp_path / "noise", n=3)
    (root / "empty.png").write_bytes(b"")
    noise = np.random.default_rng(3).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "photo.jpg", quality=90)
    data = (tmp_path / "photo.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])  # header whole, scan cut off
    (root / "head.jpg").write_bytes(data[:20])  # header cut off
    for run in range(2):
        with pytest.warns(UserWarning) as seen:
            ds = ImageFolder(_cfg(root))
            report = ds.prepare()
        text = "\n".join(str(w.message) for w in seen)
        assert "empty.png: its header cannot be read" in text and "head.jpg: its header cannot be read" in text
        assert "cut.jpg: it cannot be decoded (OSError: image file is truncated" in text
        assert f"3 images ready, {3 if run == 0 else 0} decoded now" in report.line()
        assert "skipped: 3 unreadable" in report.line()


def test_ldmkit_cache_pointing_at_a_file_or_set_empty(tmp_path, monkeypatch):
    root = _noise_folder(tmp_path / "noise", n=2)
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("LDMKIT_CACHE", str(tmp_path / "a-file"))
    with pytest.raises(InputError, match=r"LDMKIT_CACHE=.*a-file is a file, not a folder; .*LDMKIT_CACHE"):
        ImageFolder(_cfg(root)).prepare()
    monkeypatch.setenv("LDMKIT_CACHE", "")  # set but empty: the default, not the current folder
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    ds = ImageFolder(_cfg(root))
    ds.prepare()
    assert ds.cache.path.parent == tmp_path / "home" / ".cache" / "ldmkit" / "images"
    assert not (tmp_path / "images").exists()


def _refuse_writes(monkeypatch):
    """The cache folder as a read-only mount or another user's folder would behave (the tests may run as root, whom
    permissions do not stop): creating or writing files there fails with EACCES."""
    real_open = os.open

    def open_(path, flags, *a, **kw):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and "images" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **kw)

    def no_write(path, write):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(prepared.os, "open", open_)
    monkeypatch.setattr(prepared, "atomic_write", no_write)


def test_a_read_only_cache_is_read_and_a_build_there_says_what_to_change(tmp_path, cache, monkeypatch):
    root = _noise_folder(tmp_path / "noise", n=4)
    ImageFolder(_cfg(root)).prepare()
    expected = _items(ImageFolder(_cfg(root)))
    _refuse_writes(monkeypatch)
    ds = ImageFolder(_cfg(root))  # complete: read as it is, no lock or file written
    assert ds.prepare().decoded == 0
    assert torch.equal(_items(ds), expected)
    Image.new("RGB", (20, 20), (0, 0, 0)).save(root / "new.png")
    with pytest.raises(InputError, match=r"cannot write the image cache .* \(PermissionError.*LDMKIT_CACHE"):
        ImageFolder(_cfg(root)).prepare()


def test_ctrl_c_during_the_build_keeps_what_was_decoded(tmp_path, cache, monkeypatch):
    """Ctrl-C in the middle of a build commits the rows decoded so far (it used to lose everything since the last
    commit, up to COMMIT_S seconds of decoding), then stops saying so; the next run decodes only the rest."""
    root = _noise_folder(tmp_path / "noise", n=12)
    real, calls = prepared.prepare_pixels, []

    def interrupted(*a):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(prepared, "prepare_pixels", interrupted)
    with pytest.raises(KeyboardInterrupt, match="4 of 12 images are in the image cache"):
        ImageFolder(_cfg(root)).prepare()
    monkeypatch.setattr(prepared, "prepare_pixels", real)
    ds = ImageFolder(_cfg(root))
    assert ds.prepare().decoded == 8
    assert torch.equal(_items(ds), _items(ImageFolder(_cfg(root))))


def test_a_second_builder_waits_for_the_first_and_says_so(tmp_path, cache, capsys):
    root = _noise_folder(tmp_path / "noise", n=4)
    ds = ImageFolder(_cfg(root))
    ds.cache.path.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_CACHE, str(ds.cache.path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert holder.stdout.readline().strip() == "locked"
    release = threading.Timer(0.5, lambda: (holder.stdin.write("\n"), holder.stdin.flush()))
    release.start()
    try:
        assert ds.prepare(progress=True).decoded == 4
    finally:
        release.join()
        assert holder.wait(timeout=30) == 0
    assert f"waiting for another process that is building the image cache {ds.cache.path}" in capsys.readouterr().err


HOLD_CACHE = (
    "import sys\nfrom ldmkit.locks import FolderLock\nwith FolderLock(sys.argv[1], wait=True):\n"
    "    print('locked', flush=True)\n    sys.stdin.readline()\n"
)
