"""`ldmkit evaluate`: the numbers the field reports, for either kind of checkpoint.

- an "ldm" model: n images are generated (class-conditional: every class in turn; text: the reference set's
  captions in turn; unconditional: no condition) and compared with n reference images by FID and KID;
- an "autoencoder": n reference images are reconstructed and scored by PSNR, SSIM and reconstruction FID (rFID:
  FID between the reconstructions and the originals).

The reference statistics are cached (see `fid.reference_stats`), so a second evaluation against the same set only
pays for the generated images.

Under torchrun the n generated images are split over the ranks (rank r draws a contiguous block, image i always
with seed + i and the i-th condition), each rank computes their Inception features, and rank 0 gathers them in
order: the same images and the same numbers as one process.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import checkpoint
from ..autoencoder.files import load_autoencoder
from ..checkpoint import check_output_path
from ..config import DataConfig
from ..data import build_dataset, stack_images
from ..data.images import to_pil
from ..distributed import World, process_group
from ..errors import InputError
from ..pipelines.generate import generate
from ..pipelines.request import SampleRequest
from ..runtime import resolve_device
from ..shipped import load_model, model_source
from .fid import FeatureStats, InceptionFeatures, compute_stats, reference_indices, reference_stats
from .metrics import reconstruction_metrics


def _reference_data(data_cfg: DataConfig, dataset: str | None, split: str, n: int):
    """The reference data set at the model's resolution and channels, and n clipped to its size."""
    cfg = replace(
        data_cfg, dataset=dataset or data_cfg.dataset, split=split, limit=0, holdout=0, crop="center", flip=False
    )
    ds = build_dataset(cfg)
    if n < 2:
        raise InputError(f"--n {n}: FID needs at least 2 images (10,000 is the usual figure)")
    if n > len(ds):
        raise InputError(f"--n {n} is more than the {len(ds)} images of {cfg.dataset!r} ({split}); use --n {len(ds)}")
    return cfg, ds


def _kid(a: FeatureStats, b: FeatureStats) -> tuple[float, float]:
    size = min(1000, a.n, b.n)
    return a.kid(b, subsets=100, subset_size=size)


def _generated(
    ldm,
    ds,
    idx: list[int],
    sampler: str,
    steps: int,
    cfg: float,
    seed: int,
    batch: int,
    progress: bool,
    share: range | None = None,
):
    """Generated images in batches of `batch` (image i always drawn with seed + i); a text model is prompted with
    the captions of the reference images `idx`, so both sets share their caption distribution. share: the images
    to draw (a block of 0..len(idx)-1, this rank's), default all."""
    captions = [ds.captions[i] for i in idx] if ldm.text_encoder is not None and ds.captions else None
    share = share if share is not None else range(len(idx))
    n = share.stop
    for s in tqdm(range(share.start, n, batch), desc="generating", disable=not progress):
        e = min(n, s + batch)
        labels = [i % ldm.num_classes for i in range(s, e)] if ldm.num_classes else None
        prompts = captions[s:e] if captions else None
        req = SampleRequest(
            n=e - s,
            labels=labels,
            prompts=prompts,
            sampler=sampler,
            steps=steps,
            cfg=cfg,
            seed=seed + s,
            batch_size=batch,
        )
        yield generate(ldm, req)[0]


def evaluate(
    path: str | Path,
    *,
    dataset: str | None = None,
    split: str = "test",
    n: int = 10000,
    sampler: str = "dpmpp_2m",
    steps: int = 25,
    cfg: float = 3.0,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 50,
    progress: bool = True,
    memorisation=None,
    copy_threshold: float = 1.0,
) -> dict:
    """Metrics of a checkpoint against `dataset` (default: the one it was trained on), `split`, n images.
    memorisation: the model's training-data index (governance.similarity.SimilarityIndex: query(images) ->
    matches with a .similarity); the result then also holds the share of generated images at or above
    copy_threshold, and the highest similarity."""
    kind = checkpoint.read_metadata(model_source(path)[0])["kind"]  # a LoRA naming its base: the model it makes
    if kind == "ldm":
        with process_group(device, "--device") as (world, dev):
            return _evaluate_model(
                path, world, dev, dataset, split, n, sampler, steps, cfg, seed, batch_size, progress, memorisation,
                copy_threshold,
            )  # fmt: skip
    dev = resolve_device(device)
    features = InceptionFeatures(device=dev, batch_size=batch_size)
    start = time.time()
    if kind == "autoencoder":
        model, run = load_autoencoder(path, dev)
        data_cfg, ds = _reference_data(run.data, dataset, split, n)
        ref = reference_stats(
            data_cfg.dataset, ds, n, split=split, features=features, progress=progress, keep_features=True
        )
        subset = torch.utils.data.Subset(ds, reference_indices(len(ds), n))
        result = reconstruction_metrics(model, subset, dev, batch=batch_size, progress=progress)
        recon = compute_stats(
            _reconstructions(model, subset, dev, batch_size), features, keep_features=True, progress=progress
        )
        result = {"psnr": result["psnr"], "ssim": result["ssim"], "rfid": recon.fid(ref)}
    else:
        raise InputError(
            f"{path} is a {kind!r} checkpoint; evaluate takes a model (`ldmkit train`) or an "
            f"autoencoder (`ldmkit train-autoencoder`)"
        )
    return {
        "checkpoint": str(path),
        "kind": kind,
        "data": data_cfg.dataset,
        "split": split,
        "n": n,
        "resolution": data_cfg.resolution,
        **result,
        "seconds": round(time.time() - start, 1),
    }


def _evaluate_model(
    path, world: World, dev, dataset, split, n, sampler, steps, cfg, seed, batch_size, progress, memorisation,
    copy_threshold,
) -> dict:  # fmt: skip
    """evaluate() for an "ldm" checkpoint, on this rank's share of the generated images."""
    start = time.time()
    progress = progress and world.main
    features = InceptionFeatures(device=dev, batch_size=batch_size)
    ldm = load_model(path, dev)
    data_cfg, ds = _reference_data(ldm.run.data, dataset, split, n)
    idx = reference_indices(len(ds), n)
    share = world.shard(n)
    images = _generated(ldm, ds, idx, sampler, steps, cfg, seed, batch_size, progress, share)
    similarities: list[float] = []
    if memorisation is not None:
        images = _screened(images, memorisation, similarities)
    feats = [features(x) for x in images]  # this rank's (b, 2048) batches, in order
    every = world.gather((feats, similarities))  # rank order is image order

    def metrics() -> dict:
        ref = reference_stats(
            data_cfg.dataset, ds, n, split=split, features=features, progress=progress, keep_features=True
        )
        gen = FeatureStats.from_batches([f for fs, _ in every for f in fs], keep_features=True)
        kid_mean, kid_std = _kid(gen, ref)
        result = {
            "fid": gen.fid(ref),
            "kid": kid_mean,
            "kid_std": kid_std,
            "sampler": sampler,
            "steps": steps,
            "cfg": cfg,
            "seed": seed,
        }
        if memorisation is not None:
            sims = np.array([v for _, ss in every for v in ss])
            result |= {
                "memorisation": float((sims >= copy_threshold).mean()),
                "memorisation_threshold": copy_threshold,
                "memorisation_max_similarity": float(sims.max()),
            }
        if world.active:
            result["ranks"] = world.size
        return {
            "checkpoint": str(path),
            "kind": "ldm",
            "data": data_cfg.dataset,
            "split": split,
            "n": n,
            "resolution": data_cfg.resolution,
            **result,
            "seconds": round(time.time() - start, 1),
        }

    return world.on_main(metrics)


def _screened(batches, index, similarities: list[float]):
    """The batches of generated images, unchanged, each also compared with the training-data index."""
    for x in batches:
        similarities += [m.similarity for m in index.query([np.asarray(p.convert("RGB")) for p in _pils(x)])]
        yield x


def _pils(x: torch.Tensor) -> list:
    out = to_pil(x)
    return out if isinstance(out, list) else [out]


@torch.no_grad()
def _reconstructions(model, subset, device, batch: int):
    for i in range(0, len(subset), batch):
        x = stack_images(subset, range(i, min(i + batch, len(subset)))).to(device)
        yield model(x, sample=False)[0].float().clamp(-1, 1).cpu()


def format_table(result: dict) -> str:
    """A two-column text table of a result dict."""
    rows = [(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in result.items()]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def result_path(checkpoint_path: str | Path, data: str, split: str, n: int, out: str | Path | None = None) -> Path:
    """Where `ldmkit evaluate` writes its JSON: `out`, or eval-DATA-SPLIT-nN.json beside the checkpoint."""
    return Path(out) if out else Path(checkpoint_path).with_name(f"eval-{Path(data).name}-{split}-n{n}.json")


def write_result(result: dict, out: str | Path) -> Path:
    out = check_output_path(out, "--out")
    try:
        checkpoint.atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    except OSError as e:
        raise InputError(f"--out {out} cannot be written ({e.strerror or e}); choose another --out") from None
    return out
