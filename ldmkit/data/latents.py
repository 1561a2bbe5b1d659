"""The latent cache: a data set encoded once by a frozen autoencoder, reused by every epoch of denoiser training.

For a KL autoencoder the posterior mean and std are stored, so training still samples z ~ q(z|x) each time; for a
VQ autoencoder the pre-quantisation latents. Labels and captions travel with the latents. The cache file is keyed
by the autoencoder file's content hash, the data set's content key (`dataset_fingerprint`: its files with sizes and
modification times, captions included, and the settings that change pixels) and the data configuration, so a
retrained autoencoder, replaced images or another resolution never reuse stale latents.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import checkpoint
from ..config import DataConfig, to_dict
from ..nn.frames import fold, is_clip, unfold
from .common import cache_home, dataset_fingerprint


def cache_dir() -> Path:
    return cache_home()


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@dataclass
class LatentCache:
    mean: torch.Tensor  # (N, C, h, w) unscaled latents (posterior mean for KL); (N, F, C, h, w) for clips
    std: torch.Tensor | None  # the same shape: posterior std (KL) or None (VQ: deterministic)
    labels: torch.Tensor  # (N,) int64, -1 where there is no label
    captions: list[str]  # "" where there is no caption
    class_names: list[str]

    def __len__(self) -> int:
        return self.mean.shape[0]

    def draw(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Latents of items idx, sampled from the stored posterior with `gen`."""
        z = self.mean[idx]
        if self.std is not None:
            z = z + self.std[idx] * torch.randn(z.shape, generator=gen)
        return z


@torch.no_grad()
def encode_dataset(
    autoencoder,
    ae_path: str | Path,
    dataset,
    data_cfg: DataConfig,
    device,
    batch: int = 64,
    progress: bool = True,
    cache: bool = True,
) -> LatentCache:
    """Encode `dataset` (or load the cached result for this autoencoder file, data contents and configuration).

    A data set without a content key (`dataset_fingerprint` is None: a large set of a class without fingerprint())
    is encoded every time, never cached.
    """
    content = dataset_fingerprint(dataset) if cache else None
    cache = content is not None
    settings = {k: v for k, v in to_dict(data_cfg).items() if k != "caption_dropout"}  # dropout: a training choice
    key = hashlib.sha256(json.dumps([file_digest(ae_path), content, settings, len(dataset)]).encode()).hexdigest()[:20]
    path = cache_dir() / "latents" / f"{key}.safetensors"
    if cache and path.exists():
        try:
            tensors, meta = checkpoint.load(path, "latent-cache")
            return LatentCache(
                tensors["mean"], tensors.get("std"), tensors["labels"], meta["captions"], meta["class_names"]
            )
        except checkpoint.CheckpointError:
            path.unlink(missing_ok=True)  # a damaged cache is rebuilt
    autoencoder.eval()
    means, stds, labels, captions = [], [], [], []
    kl = hasattr(autoencoder, "encode")
    for i in tqdm(range(0, len(dataset), batch), desc="encoding latents", disable=not progress, unit="batch"):
        items = [dataset[j] for j in range(i, min(i + batch, len(dataset)))]
        x = torch.stack([it["image"] for it in items]).to(device)  # (B, C, H, W), or clips (B, F, C, H, W)
        frames = x.shape[1] if is_clip(x) else 0
        x = fold(x) if frames else x  # each frame encoded as an image

        def back(z: torch.Tensor, frames=frames) -> torch.Tensor:
            return (unfold(z, frames) if frames else z).float().cpu()

        if kl:
            post = autoencoder.encode(x)
            means.append(back(post.mean))
            stds.append(back(post.std))
        else:
            means.append(back(autoencoder.latents(x)))
        labels += [int(it["label"]) for it in items]
        captions += [it["caption"] for it in items]
    out = LatentCache(
        torch.cat(means),
        torch.cat(stds) if stds else None,
        torch.tensor(labels, dtype=torch.long),
        captions,
        list(getattr(dataset, "class_names", []) or []),
    )
    if cache:
        tensors = {"mean": out.mean, "labels": out.labels} | ({"std": out.std} if out.std is not None else {})
        checkpoint.save(
            path, tensors, "latent-cache", to_dict(data_cfg), captions=captions, class_names=out.class_names
        )
    return out
