"""Caches keyed by content: the latent cache and the FID reference statistics recompute after the images change,
differ between folders of the same name, and are reused while the data stays the same."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.autoencoder.files import load_autoencoder
from ldmkit.config import DataConfig
from ldmkit.data import Subset, dataset_fingerprint, split_holdout
from ldmkit.data.folder import ImageFolder
from ldmkit.data.latents import encode_dataset
from ldmkit.evaluation.fid import reference_stats
from tests.conftest import TensorDataset


def _gray(path: Path, value: int, size: int = 16):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size), value, np.uint8)
    arr[: size // 2] = 255 - value  # two halves, so no two test images are alike
    Image.fromarray(arr, "L").save(path)


def _folder(root: Path, values=(10, 60, 120, 200)) -> Path:
    for i, v in enumerate(values):
        _gray(root / f"{i}.png", v)
    return root


def _replace(path: Path, value: int):
    """New pixels under the same name, with a later modification time (coarse clocks would hide the rewrite)."""
    before = path.stat().st_mtime_ns
    _gray(path, value)
    os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(**{"dataset": str(root), "resolution": 16, "channels": 1, "holdout": 0, **kw})


class _CountingEncoder:
    """Wraps an autoencoder and counts the images it encodes."""

    def __init__(self, ae):
        self.ae, self.images = ae, 0

    def eval(self):
        return self

    def encode(self, x):
        self.images += x.shape[0]
        return self.ae.encode(x)


class _Flatten:
    """A stand-in feature extractor: the pixels themselves; counts the images it sees."""

    def __init__(self):
        self.images = 0

    def __call__(self, x):
        self.images += x.shape[0]
        return x.flatten(1).double().numpy()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LDMKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_folder_fingerprint_follows_files_captions_and_settings(tmp_path):
    root = _folder(tmp_path / "a" / "pets")
    fp = ImageFolder(_cfg(root)).fingerprint()
    assert fp == ImageFolder(_cfg(root)).fingerprint() == dataset_fingerprint(ImageFolder(_cfg(root)))
    other = _folder(tmp_path / "b" / "pets")  # same name, same pixels, another folder
    assert ImageFolder(_cfg(other)).fingerprint() != fp
    for kw in ({"resolution": 8}, {"channels": 3}, {"flip": True}, {"crop": "random"}, {"limit": 3}):
        assert ImageFolder(_cfg(root, **kw)).fingerprint() != fp, kw
    (root / "1.txt").write_text("a caption")  # a sidecar caption changes the cached captions
    with_caption = ImageFolder(_cfg(root)).fingerprint()
    assert with_caption != fp
    (root / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "zero"}\n')
    assert ImageFolder(_cfg(root)).fingerprint() != with_caption
    ds = ImageFolder(_cfg(root))
    before = ds.fingerprint()
    _replace(root / "2.png", 77)
    assert ds.fingerprint() != before  # read when asked: the folder is read lazily too


def test_subset_and_tensor_fingerprints(tmp_path, blobs):
    ds = ImageFolder(_cfg(_folder(tmp_path / "pets")))
    train, held = split_holdout(ds, 1)
    assert train.fingerprint() != held.fingerprint() != ds.fingerprint()
    assert Subset(ds, [0, 1, 2]).fingerprint() == train.fingerprint()
    assert dataset_fingerprint(torch.utils.data.Subset(ds, [0, 1])) == dataset_fingerprint(Subset(ds, [0, 1]))
    # no fingerprint(): the items' contents are hashed, without touching the global random state
    a = dataset_fingerprint(blobs)
    state = torch.get_rng_state()
    assert dataset_fingerprint(TensorDataset(blobs.images.clone(), blobs.labels)) == a
    assert torch.equal(torch.get_rng_state(), state)
    changed = blobs.images.clone()
    changed[5, 0, 0, 0] = 0.5
    assert dataset_fingerprint(TensorDataset(changed, blobs.labels)) != a
    assert dataset_fingerprint(TensorDataset(blobs.images, blobs.labels.flip(0))) != a
    assert dataset_fingerprint(blobs.images) != a  # a bare tensor of images works too


def test_latent_cache_follows_the_images(tiny_ae, tmp_path, cache):
    ae, _ = load_autoencoder(tiny_ae)
    root = _folder(tmp_path / "one" / "pets")
    enc = _CountingEncoder(ae)

    def encode(folder):
        return encode_dataset(enc, tiny_ae, ImageFolder(_cfg(folder)), _cfg(folder), "cpu", progress=False)

    first = encode(root)
    assert enc.images == 4
    again = encode(root)
    assert enc.images == 4 and torch.equal(again.mean, first.mean)  # unchanged data: served from the cache
    _replace(root / "2.png", 250)
    new = encode(root)
    assert enc.images == 8  # re-encoded after the image was replaced
    assert torch.equal(new.mean[:2], first.mean[:2]) and not torch.equal(new.mean[2], first.mean[2])
    twin = _folder(tmp_path / "two" / "pets", values=(30, 90, 150, 240))  # another folder of the same name
    other = encode(twin)
    assert enc.images == 12 and not torch.equal(other.mean, new.mean)
    assert len(list((cache / "latents").glob("*.safetensors"))) == 3


def test_latent_cache_of_tensor_data(tiny_ae, blobs, cache):
    ae, _ = load_autoencoder(tiny_ae)
    enc = _CountingEncoder(ae)
    cfg = DataConfig(dataset="blobs", resolution=16, channels=1)
    encode_dataset(enc, tiny_ae, blobs, cfg, "cpu", progress=False)
    encode_dataset(enc, tiny_ae, TensorDataset(blobs.images.clone(), blobs.labels), cfg, "cpu", progress=False)
    assert enc.images == 64  # the same contents: a cache hit
    changed = blobs.images.clone()
    changed[0] = 1.0
    encode_dataset(enc, tiny_ae, TensorDataset(changed, blobs.labels), cfg, "cpu", progress=False)
    assert enc.images == 128  # other contents under the same data settings: encoded again


def test_fid_reference_cache_follows_the_images(tmp_path):
    root = _folder(tmp_path / "one" / "pets")
    net, fid_dir = _Flatten(), tmp_path / "cache"

    def stats(folder):
        return reference_stats(str(folder.name), ImageFolder(_cfg(folder)), 4, fid_dir, features=net, progress=False)

    first = stats(root)
    assert net.images == 4
    assert np.array_equal(stats(root).mu, first.mu) and net.images == 4  # unchanged: a cache hit
    _replace(root / "0.png", 250)
    replaced = stats(root)
    assert net.images == 8 and not np.array_equal(replaced.mu, first.mu)
    twin = _folder(tmp_path / "two" / "pets", values=(30, 90, 150, 240))
    assert not np.array_equal(stats(twin).mu, replaced.mu) and net.images == 12
    assert len(list((fid_dir / "fid").glob("pets-train-n4-1x16x16-*.npz"))) == 3
