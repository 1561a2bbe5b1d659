"""The training-data similarity screen: does a generated image copy one of the model's training images?

Generative models can reproduce training images (Carlini et al. 2023; Somepalli et al. 2023). The index keeps, per
training image, a grayscale thumbnail (uint8, side 32 to THUMB: the images' own size up to THUMB, so that a crop
box of a thumbnail still holds at least COMPARE pixels) and a compact descriptor; a query runs in three stages:
1. retrieval: every entry keeps a RETRIEVE x RETRIEVE grayscale descriptor (standardised: zero mean, unit norm,
   so brightness and contrast changes cancel) of its central box CENTRE, the part of the image that every crop of
   at least 80% of the side still holds. The query, and its mirror, is described under every box where that
   central part can lie in it, for crop sides from 80% to 100% (QUERY_SCALES) at offsets RETRIEVE_STEP apart: the
   query side searches the crop, so the index stores one descriptor per image. Each entry scores its best box; a
   coarse pass (twice the offset step) keeps the best SHORTLIST entries for the fine one, and the best TOP_K go on;
2. alignment: each candidate, mirrored too, is resampled at every crop scale s in SCALES (the side of the crop box,
   0.75 to 1) onto the query's COMPARE-pixel grid, and the normalised cross-correlation (NCC) of the detail (image
   minus its blur) against the query's is taken at every whole-pixel offset at once (template matching);
3. verification: the best box of the REFINE best views is refined by a pattern search over finer scales and
   sub-pixel offsets, each box sampled and filtered on its own at COMPARE x COMPARE; the highest detail NCC is the
   similarity, and its view's training image the match. A small query (square, up to JPEG_SIDE pixels) is also
   compared with JPEG round trips of the candidate at JPEG_QUALITIES, at the query's own size: the block edges of
   a small JPEG copy survive the resizing to COMPARE and are detail that the clean training image lacks.
A copy, mirrored, cropped to 80%, recoloured or JPEG-compressed keeps an NCC close to 1 under its own crop box;
an image that merely resembles the training image (same kind of object, another pose) does not line up pixel for
pixel, which a global descriptor alone cannot tell (benchmarks/memorisation.py measures both).

Hand-made rather than a learned copy-detection network: nothing may be downloaded, and the TF-Inception network
that ships offline costs about 0.1 s an image on the CPU, too much to index 60,000 images or to screen every output.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..checkpoint import atomic_write
from ..config import DataConfig
from ..data import build_dataset
from ..data.common import cache_home
from ..errors import InputError, MissingFileError
from ..shipped import SHIPPED, model_config, resolve_model

VERSION = 2  # 2: thumbnails up to 64 pixels (1: always 32)
THUMB = 64  # largest side of the stored thumbnails (a multiple of 16, as is every side used)
RETRIEVE = 16  # side of the retrieval descriptor
COMPARE = 32  # side of the query's grid, at which candidates are aligned and verified
DETAIL_BLUR = 2.0  # verification compares detail: the image minus its Gaussian blur of this radius (COMPARE pixels)
TOP_K = 16
SHORTLIST = 1024  # entries the coarse retrieval pass keeps for the fine one
MIDLIST = 256  # entries the fine pass keeps for the detail NCC around their box
CENTRE = 0.6  # side of the indexed central box, as a share of the image's side: inside every crop of side >= 0.8
QUERY_SCALES = (0.8, 0.85, 0.9, 0.95, 1.0)  # crop sides the retrieval searches
RETRIEVE_STEP = 0.025  # offset step of the fine retrieval pass, as a share of the query's side
REFINE = 3  # views (candidate, mirrored or not) whose best box is refined below a pixel
MARGIN = 3  # alignment leaves out this many pixels at each edge, where a crop's detail differs from the whole's
DEFAULT_THRESHOLD = 0.975  # detail NCC at or above which an output counts as a copy of a training image
SCALES = [round(0.75 + 0.0125 * i, 4) for i in range(21)]  # crop sides searched, as a share of the image's side
REFINE_LEVELS = 4  # halvings of the refinement steps
JPEG_QUALITIES = tuple(range(30, 100, 5))  # JPEG round trips of the aligned candidate compared too (_requantised)
JPEG_SIDE = 128  # largest query side whose JPEG blocks survive the resizing to COMPARE
FLAT_ENERGY = 1.0  # least detail energy (squared grey levels, summed) of an alignment window: flat is not a match


@dataclass(frozen=True)
class Match:
    name: str  # the training image's name (its file, or data set/split/index)
    index: int  # its position in the index
    similarity: float  # NCC in [-1, 1]; copies score close to 1


def _gray(image) -> np.ndarray:
    """uint8 (H, W) or (H, W, C), or a float tensor (C, H, W) in [-1, 1] -> float32 gray (H, W) in [0, 255]."""
    if isinstance(image, torch.Tensor):
        x = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).numpy()  # (C, H, W)
        return (x.mean(0) if x.shape[0] != 3 else np.tensordot([0.299, 0.587, 0.114], x, 1)).astype(np.float32)
    a = np.asarray(image)
    if a.ndim == 3:
        a = (
            a[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            if a.shape[2] >= 3
            else a[..., 0]
        )
    return a.astype(np.float32)


def _resized(gray: np.ndarray, side: int) -> np.ndarray:
    return np.array(Image.fromarray(gray, "F").resize((side, side), Image.Resampling.BOX), np.float32)


def thumb_side(height: int, width: int) -> int:
    """The thumbnail side for images of this size: their shorter side rounded down to a multiple of 16, from
    COMPARE up to THUMB (a 64-pixel emoji keeps 64, so that an 80% crop box still holds more than COMPARE pixels)."""
    return int(min(THUMB, max(COMPARE, min(height, width) // 16 * 16)))


def _standard(x: np.ndarray) -> np.ndarray:
    """Rows of x (N, D) with zero mean and unit norm (flat rows stay zero)."""
    x = x - x.mean(1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def _descriptors(images: np.ndarray, boxes) -> np.ndarray:
    """(N, T, T) images -> (N * len(boxes), RETRIEVE**2) standardised descriptors of each crop box (side, x, y as
    shares of the image's side), image-major. Vectorised: the images are box-filtered to COMPARE x COMPARE (the
    antialiasing of the downsampling), then each box is sampled bilinearly at RETRIEVE x RETRIEVE."""
    if not len(images):
        return np.zeros((0, RETRIEVE * RETRIEVE), np.float32)
    lin = (torch.arange(RETRIEVE, dtype=torch.float32) + 0.5) / RETRIEVE  # cell centres in [0, 1]
    b = torch.tensor(boxes, dtype=torch.float32).view(-1, 3)  # (V, 3)
    gx, gy = (b[:, 1:2] + b[:, :1] * lin) * 2 - 1, (b[:, 2:3] + b[:, :1] * lin) * 2 - 1  # (V, R) in [-1, 1]
    grid = torch.stack((gx[:, None, :].expand(-1, RETRIEVE, -1), gy[:, :, None].expand(-1, -1, RETRIEVE)), -1)
    out = []
    for start in range(0, len(images), 4096):
        x = torch.from_numpy(np.array(images[start : start + 4096], np.float32))[:, None]  # (n, 1, T, T)
        x = torch.nn.functional.adaptive_avg_pool2d(x, COMPARE)  # (n, 1, COMPARE, COMPARE)
        v = torch.nn.functional.grid_sample(
            x.repeat_interleave(len(b), 0), grid.repeat(len(x), 1, 1, 1), mode="bilinear", align_corners=False
        )  # (n * V, 1, R, R), image-major
        out.append(_standard(v.flatten(1).numpy()))
    return np.concatenate(out)


@lru_cache(maxsize=4)
def _query_boxes(step: float) -> tuple[tuple[float, float, float], ...]:
    """Every box of the query where the indexed central box can lie: for a crop of side s (QUERY_SCALES) at offset
    o in [0, 1 - s] of the training image, the central box [c0, c0 + CENTRE] lies at (c0 - o) / s in the query, with
    side CENTRE / s; offsets `step` apart (shares of the query's side), both axes."""
    c0 = (1 - CENTRE) / 2
    out = []
    for s in QUERY_SCALES:
        lo, hi = (c0 - (1 - s)) / s, c0 / s
        offsets = np.linspace(lo, hi, max(1, int(round((hi - lo) / step)) + 1))
        out += [(CENTRE / s, float(x), float(y)) for y in offsets for x in offsets]
    return tuple(out)


def _index_descriptors(thumbs: np.ndarray) -> torch.Tensor:
    """The retrieval descriptors of each entry: its central box and its whole image, (2, N, RETRIEVE**2) float32."""
    c0 = (1 - CENTRE) / 2
    both = _descriptors(thumbs, [(CENTRE, c0, c0), (1.0, 0.0, 0.0)])
    return torch.from_numpy(both).view(len(thumbs), 2, RETRIEVE * RETRIEVE)


@lru_cache(maxsize=64)
def _blur_matrix(n: int) -> torch.Tensor:
    """(n, n) matrix of a Gaussian blur of radius DETAIL_BLUR along one axis, edges reflected (blurred = B @ x)."""
    r = int(np.ceil(3 * DETAIL_BLUR))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / DETAIL_BLUR) ** 2)
    k /= k.sum()
    m = np.zeros((n, n), np.float32)
    for i in range(n):
        for t, w in zip(range(i - r, i + r + 1), k):
            j = abs(t) if t < 0 else (2 * (n - 1) - t if t >= n else t)  # reflected, as numpy's "reflect"
            m[i, min(max(j, 0), n - 1)] += w
    return torch.from_numpy(m)


def _detail(t: torch.Tensor) -> torch.Tensor:
    """What is compared: images (N, 1, H, W) minus their Gaussian blur (radius DETAIL_BLUR, edges reflected): their
    fine structure, which copies share and look-alikes do not. The blur is separable: B_H @ x @ B_W^T."""
    return t - _blur_matrix(t.shape[-2]) @ t @ _blur_matrix(t.shape[-1]).T


def _unit(t: torch.Tensor) -> torch.Tensor:
    """Rows (N, D) with zero mean and unit norm."""
    t = t - t.mean(1, keepdim=True)
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-6)


def _sample(
    thumbs: torch.Tensor, s: torch.Tensor, ox: torch.Tensor, oy: torch.Tensor, n: int, grid: int = COMPARE
) -> torch.Tensor:
    """Crop boxes of thumbnails (B, 1, T, T), box b of side s[b] at (ox[b], oy[b]) (shares of the side), each sampled
    bilinearly on an n x n grid of 1/grid of the box's side apart: (B, 1, n, n). n > grid covers a search's offsets."""
    lin = (torch.arange(n, dtype=torch.float32) + 0.5) / grid  # (n,) pixel centres on the query's grid
    gx = (ox[:, None] + s[:, None] * lin) * 2 - 1  # (B, n)
    gy = (oy[:, None] + s[:, None] * lin) * 2 - 1
    at = torch.stack((gx[:, None, :].expand(-1, n, -1), gy[:, :, None].expand(-1, -1, n)), -1)  # (B, n, n, 2)
    return torch.nn.functional.grid_sample(thumbs, at, mode="bilinear", padding_mode="border", align_corners=False)


def _window_sums(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sums of every k x k window of x (B, 1, H, W), from its integral image: (B, H - k + 1, W - k + 1)."""
    c = torch.nn.functional.pad(x[:, 0].cumsum(1).cumsum(2), (1, 0, 1, 0))
    return c[:, k:, k:] - c[:, :-k, k:] - c[:, k:, :-k] + c[:, :-k, :-k]


def _align(probe: torch.Tensor, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Template matching: for each view (B, 1, T, T), the crop box (s, ox, oy) whose detail best matches the query's
    probe (COMPARE, COMPARE), searched over SCALES and half-pixel offsets on the query's grid (the NCC of the
    interior, MARGIN pixels in from each edge): best NCC (B,) and boxes (B, 3)."""
    b, k = MARGIN, COMPARE - 2 * MARGIN
    q = _unit(_detail(probe[None, None])[0, 0, b:-b, b:-b].reshape(1, -1)).view(1, 1, k, k)
    phases = torch.tensor([(0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (0.5, 0.5)])  # (P, 2) in COMPARE pixels
    best, boxes = torch.full((len(views),), -2.0), torch.zeros(len(views), 3)
    for s in SCALES:
        n = COMPARE + int(COMPARE * (1 - s) / s + 1e-6)  # the candidate resampled by 1/s: (n, n) on the query's grid
        p = phases if s < 1 else phases[:1]
        ph = p.repeat(len(views), 1) * s / COMPARE  # (B * P, 2) as shares of the side
        sampled = _sample(views.repeat_interleave(len(p), 0), torch.full((len(ph),), s), ph[:, 0], ph[:, 1], n)
        d = _detail(sampled)[:, :, b : n - b, b : n - b]  # (B * P, 1, n - 2b, same)
        m = n - 2 * b  # cross-correlation through the FFT: no wrap-around for windows inside the image
        num = torch.fft.irfft2(torch.fft.rfft2(d[:, 0]) * torch.fft.rfft2(q[0, 0], s=(m, m)).conj(), s=(m, m))
        num = num[:, : m - k + 1, : m - k + 1]  # (B * P, side, side): sum of probe x window
        s1, s2 = _window_sums(d, k), _window_sums(d * d, k)
        # the probe has zero mean and unit norm; the energy of a window without detail (a flat area) is rounding
        # error, and the FFT's rounding error divided by it scored flat windows far above 1: FLAT_ENERGY floors it
        energy = (s2 - s1 * s1 / k**2).clamp_min(FLAT_ENERGY)
        ncc = (num / energy.sqrt()).flatten(1)
        top, at = ncc.max(1)
        side = n - COMPARE + 1
        box = torch.stack(
            [torch.full_like(top, s), (at % side) * s / COMPARE + ph[:, 0], (at // side) * s / COMPARE + ph[:, 1]], 1
        )  # (B * P, 3)
        top, j = top.view(len(views), len(p)).max(1)
        box = box.view(len(views), len(p), 3)[torch.arange(len(views)), j]
        better = top > best
        best, boxes = torch.where(better, top, best), torch.where(better[:, None], box, boxes)
    return best, boxes


def _box_ncc(probe_detail: torch.Tensor, views: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The detail NCC of the query (its unit detail, COMPARE**2) with views (B, 1, T, T) under boxes (B, R, 3) given
    as (side, centre x, centre y), each box sampled and filtered on its own at COMPARE x COMPARE: (B, R)."""
    s = boxes[..., 0].clamp(0.5, 1.0)
    ox = (boxes[..., 1] - s / 2).clamp(min=0.0).minimum(1 - s)
    oy = (boxes[..., 2] - s / 2).clamp(min=0.0).minimum(1 - s)
    r = boxes.shape[1]
    sampled = _sample(views.repeat_interleave(r, 0), s.flatten(), ox.flatten(), oy.flatten(), COMPARE)
    return (_unit(_detail(sampled).flatten(1)) @ probe_detail).view(len(views), r)


def _refine(probe: torch.Tensor, views: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Pattern search around each aligned box (B, 3): the best of the 27 boxes one step away in scale and offset
    becomes the centre until none is better, then the steps halve (REFINE_LEVELS times, from a 0.0125 scale step and
    a one-pixel offset step): the best detail NCC of the whole probe (B,)."""
    q = _unit(_detail(probe[None, None]).reshape(1, -1))[0]
    centre = torch.stack([boxes[:, 0], boxes[:, 1] + boxes[:, 0] / 2, boxes[:, 2] + boxes[:, 0] / 2], 1)  # (B, 3)
    best = _box_ncc(q, views, centre[:, None])[:, 0]
    grid = torch.cartesian_prod(*[torch.tensor([-1.0, 0.0, 1.0])] * 3)  # (27, 3)
    for level in range(REFINE_LEVELS):
        step = torch.tensor([0.0125, 1.0, 1.0]) / 2**level  # scale, and offsets in COMPARE pixels
        for _ in range(3):
            moves = grid * step
            tried = (
                centre[:, None]
                + moves[None]
                * torch.stack([torch.ones_like(centre[:, 0]), centre[:, 0] / COMPARE, centre[:, 0] / COMPARE], 1)[
                    :, None
                ]
            )  # (B, 27, 3)
            ncc = _box_ncc(q, views, tried)
            top, at = ncc.max(1)
            better = top > best + 1e-6
            if not better.any():
                break
            best = torch.where(better, top, best)
            centre = torch.where(better[:, None], tried[torch.arange(len(views)), at], centre)
    return best, centre


def _requantised(probe: torch.Tensor, side: int, views: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """The detail NCC of the probe (COMPARE, COMPARE) with each view (B, 1, T, T) after a JPEG round trip at each of
    JPEG_QUALITIES, at the query's own side (its 8x8 blocks): (B,). A small JPEG copy keeps block edges in its
    detail that the clean training image lacks; the same round trip of the training image puts them back. The view
    is cut under its refined box (B, 3: side, centre x, centre y) and under that box snapped to whole thumbnail
    pixels (block edges only line up on the copy's own pixel grid). Only for square queries of at most JPEG_SIDE
    pixels: a larger one's blocks are averaged away by the resizing to COMPARE."""
    q = _unit(_detail(probe[None, None]).reshape(1, -1))[0]
    t = views.shape[-1]
    s = centres[:, 0].clamp(0.5, 1.0)
    ox, oy = (
        (centres[:, 1] - s / 2).clamp(min=0.0).minimum(1 - s),
        (centres[:, 2] - s / 2).clamp(min=0.0).minimum(1 - s),
    )
    snap_s = (s * t).round() / t
    snap_x, snap_y = (ox * t).round().clamp(max=t - snap_s * t) / t, (oy * t).round().clamp(max=t - snap_s * t) / t
    crops = _sample(
        views.repeat(2, 1, 1, 1), torch.cat([s, snap_s]), torch.cat([ox, snap_x]), torch.cat([oy, snap_y]), side, side
    )
    crops = crops[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()  # (2B, side, side): refined boxes, then snapped
    best = torch.full((len(crops),), -2.0)
    for b, crop in enumerate(crops):
        for quality in JPEG_QUALITIES:
            buf = io.BytesIO()
            Image.fromarray(crop, "L").save(buf, "JPEG", quality=quality)
            back = np.array(Image.open(buf), np.float32)
            d = _unit(_detail(torch.from_numpy(_resized(back, COMPARE))[None, None]).reshape(1, -1))[0]
            best[b] = max(best[b], float(d @ q))
    return best.view(2, -1).amax(0)


class SimilarityIndex:
    """Thumbnails and descriptors of a model's training images; query() finds each image's nearest one."""

    def __init__(self, thumbs: np.ndarray | None = None, names: list[str] | None = None, source: str = ""):
        self.thumbs = np.zeros((0, THUMB, THUMB), np.uint8) if thumbs is None else thumbs  # (N, T, T)
        self.names = list(names or [])
        self.source = source  # what it was built from
        self.path: Path | None = None  # the file it was read from or last written to
        self.desc, self.whole = _index_descriptors(self.thumbs).unbind(1)  # (N, RETRIEVE**2) each

    def __len__(self) -> int:
        return len(self.names)

    def build(self, images: Iterable, names: list[str], progress: bool = True) -> SimilarityIndex:
        """Index `images` (uint8 (H, W[, C]) arrays or (C, H, W) tensors in [-1, 1]) under `names`; the thumbnail
        side follows the first image (thumb_side)."""
        thumbs, side = [], 0
        for im in tqdm(images, total=len(names), desc="similarity index", disable=not progress):
            gray = _gray(im)
            side = side or thumb_side(*gray.shape)
            thumbs.append(np.clip(np.round(_resized(gray, side)), 0, 255).astype(np.uint8))
        if len(thumbs) != len(names):
            raise InputError(f"{len(thumbs)} images but {len(names)} names; give one name per image")
        self.thumbs = np.stack(thumbs) if thumbs else self.thumbs
        self.names = list(names)
        self.desc, self.whole = _index_descriptors(self.thumbs).unbind(1)
        return self

    def query(self, pixels) -> list[Match]:
        """The nearest training image of each query image (uint8 (B, H, W, 3), or a list of arrays of any size)."""
        if not len(self):
            raise InputError("the similarity index is empty; build it from the model's training images")
        grays = [_gray(p) for p in pixels]
        probes = np.stack([_resized(g, COMPARE) for g in grays])  # (B, COMPARE, COMPARE)
        k = min(TOP_K, len(self))
        out = []
        for b in range(len(probes)):
            cands = self._retrieve(probes[b], k)
            probe = torch.from_numpy(probes[b])
            views = torch.from_numpy(self.thumbs[cands].astype(np.float32))[:, None]  # (k, 1, T, T)
            views = torch.cat([views, views.flip(-1)])  # (2k, 1, T, T): each candidate and its mirror
            # 2. alignment of every view, 3. verification of the best REFINE views
            coarse, boxes = _align(probe, views)
            pick = coarse.topk(min(REFINE, len(views))).indices
            fine, centres = _refine(probe, views[pick], boxes[pick])  # (R,)
            h, w = grays[b].shape
            if JPEG_QUALITIES and h == w <= JPEG_SIDE:
                fine = torch.maximum(fine, _requantised(probe, h, views[pick], centres))
            c = int(cands[int(pick[int(fine.argmax())]) % len(cands)])
            out.append(Match(self.names[c], c, float(fine.max())))
        return out

    def _retrieve(self, probe: np.ndarray, k: int) -> np.ndarray:
        """Stage 1: the k best entries for the probe (COMPARE, COMPARE). A coarse descriptor pass over every entry
        keeps the SHORTLIST best, a fine pass the MIDLIST best, and for these it finds the best query box, hence
        where the probe lies in the entry (its crop box) and whether mirrored. Three quarters of the k are the
        entries whose detail best correlates with the probe's around that box (stage 3's NCC over the 27 boxes one
        pixel and one scale step around it), the rest the best by descriptor (a plain object has little detail)."""
        both = np.stack([probe, probe[:, ::-1]])
        coarse = torch.from_numpy(_descriptors(both, _query_boxes(2 * RETRIEVE_STEP)))
        short = (coarse @ self.desc.T).amax(0).topk(min(SHORTLIST, len(self))).indices
        boxes = torch.tensor(_query_boxes(RETRIEVE_STEP))  # (V, 3): side, x, y in the query
        fine = torch.from_numpy(_descriptors(both, boxes.tolist())) @ self.desc[short].T  # (2V, S)
        best, at = fine.max(0)
        mid = best.topk(min(MIDLIST, len(short))).indices
        short, at = short[mid], at[mid]
        mirrored, box = at // len(boxes), boxes[at % len(boxes)]
        side = CENTRE / box[:, 0]  # the crop's side in the entry: the probe spans it
        c0 = (1 - CENTRE) / 2
        crop = torch.stack([side, c0 - box[:, 1] * side + side / 2, c0 - box[:, 2] * side + side / 2], 1)
        moves = torch.cartesian_prod(*[torch.tensor([-1.0, 0.0, 1.0])] * 3) * torch.tensor([0.0125, 0.5, 0.5])
        around = (
            crop[:, None]
            + moves[None] * torch.stack([torch.ones_like(side), side / COMPARE, side / COMPARE], 1)[:, None]
        )  # (M, 27, 3)
        views = torch.from_numpy(self.thumbs[short.numpy()].astype(np.float32))[:, None]
        ncc = torch.full((len(short),), -2.0)
        for m, p in enumerate(both):
            sel = mirrored == m
            if sel.any():
                q = _unit(_detail(torch.from_numpy(p.copy())[None, None]).reshape(1, -1))[0]
                ncc[sel] = _box_ncc(q, views[sel], around[sel]).amax(1)
        keep = short[ncc.topk(min(k, len(short))).indices].tolist()[: k - 2 * (k // 5)]
        keep += [i for i in short.tolist() if i not in keep][: k // 5]  # short is in descriptor order
        whole = torch.from_numpy(_descriptors(both, [(1.0, 0.0, 0.0)])) @ self.whole.T  # (2, N)
        keep += [i for i in whole.amax(0).topk(min(k, len(self))).indices.tolist() if i not in keep][: k - len(keep)]
        return np.array(keep)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez_compressed(
                    f, version=VERSION, thumbs=self.thumbs, names=np.array(self.names), source=np.array(self.source)
                )

        atomic_write(path, write)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> SimilarityIndex:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"similarity index {path} does not exist; build it with `ldmkit index build`")
        try:
            with np.load(path, allow_pickle=False) as z:
                version, thumbs, names, source = (
                    int(z["version"]),
                    z["thumbs"],
                    [str(n) for n in z["names"]],
                    str(z["source"]),
                )
        except (ValueError, KeyError, OSError) as e:
            raise InputError(
                f"{path} is not an ldmkit similarity index ({e}); build it with `ldmkit index build`"
            ) from None
        if version != VERSION:
            again = f"ldmkit index build {source or 'MODEL_OR_DATA'} --out {path}"
            raise InputError(
                f"{path} is a version {version} similarity index; this ldmkit reads version {VERSION} (larger "
                f"thumbnails, which its crop search needs): build it again with `{again}`"
            )
        side = thumbs.shape[1] if thumbs.ndim == 3 else 0
        if thumbs.ndim != 3 or thumbs.shape[2] != side or side % 16 or not COMPARE <= side <= THUMB:
            raise InputError(f"{path} is damaged (thumbnails {thumbs.shape}); build it again with `ldmkit index build`")
        if len(thumbs) != len(names):
            raise InputError(f"{path} is damaged ({len(thumbs)} thumbnails, {len(names)} names); build it again")
        index = cls(thumbs, names, source)
        index.path = path
        return index


def index_path_for(model_path: str | Path) -> Path:
    """Where a model's index lives: `weights/emoji.safetensors` -> `weights/emoji.index.npz`."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name.removesuffix(".safetensors") + ".index.npz")


def load_index(
    model_path: str | Path, why: str = "the policy screens outputs against training data"
) -> SimilarityIndex:
    """The training-data index beside a model's weights, else, for a model trained on a built-in data set, the one
    built from that set (see built_in_index); a clear error saying how to build it when there is neither, after
    `why` (what needs it, as the user asked for it)."""
    path = index_path_for(model_path)
    if path.is_file():
        return SimilarityIndex.load(path)
    index = built_in_index(model_path)
    if index is None:
        raise MissingFileError(
            f"{why}, but {model_path} has no index {path}; build it with: ldmkit index build {model_path} --out {path}"
        )
    return index


BUILT_IN_SETS = ("fashion-mnist", "emoji")  # made on this machine from Debian packages, the same everywhere


def built_in_index(model_path: str | Path) -> SimilarityIndex | None:
    """The index of a model trained on a built-in data set (as the shipped ones are), or None for any other model.

    Its training images are on every machine, so no index ships: it is built on first use (emoji's 3,789 images take
    about 5 seconds) into $LDMKIT_CACHE/index, keyed by the data's configuration, and later calls read it from
    there. Models trained on the same set share it."""
    try:
        data = training_data(str(model_path))
    except InputError:
        return None
    if data.dataset not in BUILT_IN_SETS:
        return None
    data = indexed_data(data)
    key = hashlib.sha256(json.dumps(asdict(data), sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_home() / "index" / f"{data.dataset}-{key}.index.npz"
    if path.is_file():
        return SimilarityIndex.load(path)
    print(
        f"note: building the similarity index of {data.dataset} (the training data of {model_path}) into {path}; "
        "later runs reuse it",
        file=sys.stderr,
    )
    return build_index(str(model_path), path, progress=sys.stderr.isatty())


def indexed_data(data: DataConfig) -> DataConfig:
    """What an index holds of a data configuration: every image, held-out ones too, centre-cropped, unflipped."""
    return replace(data, limit=0, holdout=0, crop="center", flip=False)


def training_data(source: str) -> DataConfig:
    """The data a source names: a shipped model's or checkpoint's training data, a built-in data set, or a folder."""
    if source in SHIPPED or source.endswith(".safetensors"):
        data = model_config(resolve_model(source)).get("data")  # a LoRA that is a model: its base's data
        if not isinstance(data, dict):
            raise InputError(f"{source} does not say what it was trained on; index its data set or folder instead")
        known = {k: v for k, v in data.items() if k in DataConfig.__dataclass_fields__}
        return DataConfig(**known)
    if source in ("fashion-mnist", "emoji") or os.path.isdir(source):
        return DataConfig(dataset=source)
    raise InputError(f"{source!r} is neither a model (a shipped name or .safetensors) nor a data set or folder")


def build_index(source: str, out: str | Path, progress: bool = True) -> SimilarityIndex:
    """Index every training image of `source` (see training_data) and write the index to `out`."""
    data = training_data(source)
    ds = build_dataset(indexed_data(data))
    paths = getattr(ds, "files", None)
    names = (
        [str(p) for p in paths] if paths is not None else [f"{data.dataset}/{data.split}/{i}" for i in range(len(ds))]
    )
    images = (ds[i]["image"] for i in range(len(ds)))
    index = SimilarityIndex(source=source).build(images, names, progress)
    index.save(out)
    return index
