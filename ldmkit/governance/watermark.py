"""An invisible watermark that carries a 48-bit tag (the first 12 hex digits of a request id) in an image's pixels.

Method: dither-modulation quantisation (QIM; Chen and Wornell, "Quantization index modulation", 2001) of keyed
projections of low-frequency DCT coefficients of the luminance inside a central window, sampled at a canonical size.
- The window spans [LO, HI] of each side (the middle 76%); its luminance, sampled CANON x CANON times by a triangle
  filter integrated over the pixels inside the window only, has the orthonormal 2-D DCT-II coefficients C.
- The 48 tag bits and a 24-bit CRC are 72 bits; bit k owns a keyed random group of GROUP of the lowest-frequency
  coefficients (u, v <= BAND, DC excluded) and a keyed +-1 pattern p_k over them.
- Embedding moves the projection x_k = <C_k, p_k> / sqrt(GROUP) to the nearest point of the lattice
  DELTA * (Z + bit / 2) and adds the change (the window's DCT basis functions at every pixel, fading to zero a few
  pixels past the window's edge, FADE of the border) equally to R, G and B; the border is otherwise untouched.
- Reading first assumes the whole image: the window is again the middle 76% of each side, so a rescale changes
  nothing but the sampling. A resized copy (RESIZES: 0.75x and 0.5x, bilinear and bicubic, for each side it may have
  had) is then read through the least-squares inverse of that resize, which recovers what the resize kept.
- Enlargement of a small image: up to ENLARGED (84) pixels a side the sampling kernel is one pixel wide, not a
  fixed share of the window, so a copy enlarged by any factor is sampled otherwise; every marked side n from
  MIN_SIDE to ENLARGED and each of nearest, bilinear, bicubic and Lanczos are tried through the exact inverse of that
  enlargement (an enlargement loses nothing), accepted at SYNC as the crop search is.
- Cropping: a crop that removes at most CROP (10%) of a side, wherever it is taken, keeps the whole window, so the
  mark is still there, only at an unknown place. Reading then searches, per axis, every marked side n (from the
  received side m up to (m + 1) / (1 - CROP)) and every cut c before the kept part (0 to n - m pixels): the window of
  that hypothesis is [LO * n - c, HI * n - c], and at the right one the samples are exactly those of embedding.
  QIM projections are exact only at the exact geometry (a quarter of a pixel off at 64x64 and the host's own
  coefficients move by about the lattice step), so the search runs at one-pixel steps. It ranks the hypotheses by how
  close all 72 projections lie to the lattice (a window without the mark scores 0.5 with a spread of 0.034, a marked
  one about 0.9) and checks the CRC only of the best few that reach SYNC: the false-reading rate stays that of the
  CRC alone. Up to SQUARE_SEARCH pixels the two axes are searched independently (784 hypotheses at 58x58); above,
  both share the marked side's scale (the crop kept the aspect ratio), and from about 384 pixels the search first
  runs on 2 x 2 blocks at a 2-pixel stride, then at every pixel around its REFINE best hypotheses.
- A crop resized back to the marked size (small images only, up to SQUARE_SEARCH): every kept side k and cut c per
  axis, read through the least-squares inverse of the bicubic blow-up from k to the received side. Large images are
  not searched so (the hypotheses grow with the side squared); the plain crop search still fits most of them, since
  a fraction of a pixel there is a small fraction of a canonical sample.

Why not PyPI `invisible-watermark`: its DWT-DCT method needs images of at least 256x256 pixels, while the shipped
models draw 32x32 and 64x64 images. This one works from MIN_SIDE pixels. Limits (benchmarks/watermark.py measures
each): a crop of more than a tenth of a side cuts into the window; a crop resized to another size than the marked
one, or a crop combined with JPEG or a resize, is not searched for; reading an unmarked image tries every
hypothesis, about 0.1 s at 64x64 and about a second at 256x256 and larger.
Anyone holding the key can read or remove the mark: it is a provenance label, not a security boundary.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from ..errors import InputError

TAG_BITS = 48
CHECK_BITS = 24  # CRC-32 truncated: an unmarked image passes by chance once in 16 million readings per hypothesis
BITS = TAG_BITS + CHECK_BITS
CANON = 64  # samples per side of the window the mark lives in
BAND = 14  # highest DCT frequency index used (of CANON): about 0.11 cycles per canonical sample
K = BAND + 1
GROUP = 3  # coefficients per bit
ROUNDS = 6  # embedding passes at most
DELTA = 80.0  # lattice step of a projection (pixel units of the orthonormal DCT): strength against visibility
LO, HI = 0.12, 0.88  # the window, as fractions of each side
CROP = 0.1  # the largest share of a side a crop may remove and still be read
MIN_SIDE = 28  # smallest image side marked and read (a 32x32 image cropped by 10% is 29 pixels)
SQUARE_SEARCH = 96  # above this side the crop search assumes the crop kept the aspect ratio
CHECKED = 3  # crop hypotheses kept per grid of the search (the best by lattice fit)
SYNC = 0.7  # lattice fit a crop hypothesis needs before its CRC is checked (chance: 0.5, sd 0.034)
REFINE = 8  # coarse hypotheses of a large image searched again at every pixel around them
FADE = 0.3  # share of the border over which the mark fades out past the window's edge
LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class Reading:
    tag: bytes | None  # the 6-byte tag, or None when no valid watermark was found
    bits: np.ndarray  # the 72 decoded bits of the most likely reading (0/1)
    gain: float  # the resize hypothesis that decoded (1, 0.75, 0.5, or > 1 for an enlargement); 0 when none did
    margin: float  # mean distance of the projections from the decision boundary, as a fraction of DELTA / 4
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)  # pixels found cut from the left, top, right and bottom


def tag_of(request_id: str) -> bytes:
    """The watermark tag of a request id: its first 12 hex digits as 6 bytes."""
    head = str(request_id)[:12]
    try:
        if len(head) != 12:
            raise ValueError
        return bytes.fromhex(head)
    except ValueError:
        raise InputError(f"request id {str(request_id)[:40]!r} does not start with 12 hex digits") from None


def _check_bits(tag: bytes) -> np.ndarray:
    crc = zlib.crc32(b"ldmkit-watermark" + tag) & ((1 << CHECK_BITS) - 1)
    return np.array([(crc >> i) & 1 for i in range(CHECK_BITS)], dtype=np.int64)


def payload_bits(tag: bytes) -> np.ndarray:
    """The 72 bits a tag is written as: its 48 bits, then 24 check bits."""
    bits = np.unpackbits(np.frombuffer(tag, dtype=np.uint8)).astype(np.int64)
    return np.concatenate([bits, _check_bits(tag)])


@lru_cache(maxsize=1)
def _dct() -> np.ndarray:
    """The orthonormal DCT-II matrix of size CANON: coefficients = D @ X @ D.T, X = D.T @ C @ D."""
    n = np.arange(CANON)
    d = np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * CANON)) * np.sqrt(2 / CANON)
    d[0] /= np.sqrt(2)
    return d


@lru_cache(maxsize=8)
def _layout(key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, signs) of each bit's coefficients, (BITS, GROUP) each, drawn from `key`."""
    u, v = np.meshgrid(np.arange(K), np.arange(K), indexing="ij")
    cells = np.stack([u.ravel(), v.ravel()], 1)[1:]  # (K * K - 1, 2): every frequency but DC
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    radius = (cells**2).sum(1) + rng.random(len(cells))  # the lowest frequencies, ties broken by the key
    lowest = cells[np.argsort(radius)[: BITS * GROUP]]
    chosen = lowest[rng.permutation(len(lowest))].reshape(BITS, GROUP, 2)
    signs = rng.choice([-1.0, 1.0], size=(BITS, GROUP))
    return chosen[..., 0], chosen[..., 1], signs


def _luma(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim == 2:
        return pixels.astype(np.float64)
    return pixels[..., :3].astype(np.float64) @ LUMA


RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def _resize(plane: np.ndarray, size: tuple[int, int], how=Image.Resampling.BILINEAR) -> np.ndarray:
    """A float plane resized to size (width, height), with antialiasing."""
    img = Image.fromarray(plane.astype(np.float32), "F")
    return np.asarray(img.resize(size, how), dtype=np.float64)


def _check_image(pixels: np.ndarray) -> None:
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise InputError("the watermark takes uint8 pixels of shape (H, W) or (H, W, 3)")
    if min(pixels.shape[:2]) < MIN_SIDE:
        raise InputError(
            f"image of {pixels.shape[1]}x{pixels.shape[0]} pixels is too small to mark; {MIN_SIDE} is the least"
        )


def _window(side: int, cut: int = 0) -> tuple[float, float]:
    """(start, width) in pixels of the window of an axis whose marked side was `side`, `cut` pixels cut before."""
    return LO * side - cut, (HI - LO) * side


def _ramp(u: np.ndarray) -> np.ndarray:
    """The integral from -inf to u of the unit triangle max(0, 1 - |x|)."""
    u = np.clip(u, -1, 1)
    return np.where(u < 0, (u + 1) ** 2 / 2, 1 - (1 - u) ** 2 / 2)


def _analysis(m: int, start: float, width: float) -> np.ndarray:
    """(K, m): the rows giving the K lowest DCT coefficients of the window [start, start + width] of an axis of m
    pixels, sampled CANON times: each sample integrates a triangle over the pixels (piecewise constant) inside the
    window only, so a resized copy gives nearly the same samples and a crop that keeps the window exactly the same."""
    r = max(1.0, width / CANON)  # the triangle's half-width in pixels
    t = start + (np.arange(CANON)[:, None] + 0.5) * width / CANON  # (CANON, 1): sample positions
    lo = np.clip(np.arange(m)[None, :], start, start + width)  # (1, m): each pixel's part inside the window
    hi = np.clip(np.arange(m)[None, :] + 1.0, start, start + width)
    weight = _ramp((hi - t) / r) - _ramp((lo - t) / r)  # (CANON, m)
    weight /= np.maximum(weight.sum(1, keepdims=True), 1e-12)
    return _dct()[:K] @ weight


def _synthesis(m: int) -> np.ndarray:
    """(m, K): the window's DCT basis functions at the pixels of an axis of m pixels, continued past the window's
    edges and fading linearly to zero over FADE of the border (no step at the window's edge)."""
    start, width = _window(m)
    c = np.arange(m) + 0.5
    tau = (c - start) * CANON / width - 0.5  # pixel centres in samples of the window
    u = np.arange(K)
    basis = np.cos(np.pi * u[None, :] * (2 * tau[:, None] + 1) / (2 * CANON)) * np.sqrt(2 / CANON)
    basis[:, 0] /= np.sqrt(2)
    outside = np.maximum(start - c, c - start - width)  # > 0 in the border
    return basis * np.clip(1 - outside / (FADE * start), 0, 1)[:, None]


@lru_cache(maxsize=8)
def _projector(key: str) -> np.ndarray:
    """(K * K, BITS): x = coefficients (flattened) @ this."""
    rows, cols, signs = _layout(key)
    out = np.zeros((K * K, BITS))
    np.add.at(out, (rows * K + cols, np.arange(BITS)[:, None]), signs / np.sqrt(GROUP))
    return out


def _projections(coef: np.ndarray, key: str) -> np.ndarray:
    """x_k of coefficients (..., K, K): (..., BITS)."""
    return coef.reshape(*coef.shape[:-2], K * K) @ _projector(key)


def embed(pixels: np.ndarray, tag: bytes, key: str = "ldmkit") -> np.ndarray:
    """pixels (H, W) or (H, W, 3) uint8 with `tag` (6 bytes) hidden in them; same shape and dtype."""
    _check_image(pixels)
    if not isinstance(tag, (bytes, bytearray)) or len(tag) != TAG_BITS // 8:
        raise InputError(f"a watermark tag is {TAG_BITS // 8} bytes (watermark.tag_of(request_id)), not {tag!r}")
    h, w = pixels.shape[:2]
    bits = payload_bits(bytes(tag))
    offset = bits * DELTA / 2
    rows, cols, signs = _layout(key)
    py, px = _rows(h), _rows(w)  # (K, H), (K, W)
    sy, sx = _synthesis(h), _synthesis(w)  # (H, K), (W, K)
    out = pixels
    for _ in range(ROUNDS):  # clipping at black and white and the rounding take some change back: measure again
        x = _projections(py @ _luma(out) @ px.T, key)
        target = np.round((x - offset) / DELTA) * DELTA + offset  # the nearest point of the bit's lattice
        if np.all(np.abs(target - x) < DELTA / 16):
            break
        change = np.zeros((K, K))
        np.add.at(change, (rows, cols), ((target - x)[:, None] * signs) / np.sqrt(GROUP))
        residual = sy @ change @ sx.T  # (H, W): the change of luminance
        moved = out.astype(np.float64) + (residual[..., None] if pixels.ndim == 3 else residual)
        out = np.clip(np.round(moved), 0, 255).astype(np.uint8)
    return out


WITHIN_PSNR = 32.0  # dB: the least PSNR of a mark confined to a region (a whole-image mark has about 38 to 40)


def embed_within(pixels: np.ndarray, tag: bytes, region: np.ndarray, key: str = "ldmkit") -> np.ndarray | None:
    """pixels (H, W) or (H, W, 3) uint8 with `tag` hidden by changing only the pixels where `region` (H, W) is
    true: every other pixel is returned bit for bit. None when the region cannot carry a mark that reads back at a
    PSNR of at least WITHIN_PSNR (too little of it lies in the window: a 16x16 hole in a 64x64 image, or a border
    of 8 pixels around it, cannot; a quarter of the window can, at about 33 dB).

    The 72 projections respond linearly to a change of the luminance; restricted to the region, the bit directions
    of `embed` (each bit's basis functions, zero outside the region) move them by a matrix A (BITS, BITS), so the
    change that puts every projection on its lattice is their combination with coefficients A^-1 (target - x),
    computed again after each rounding as `embed` does."""
    _check_image(pixels)
    if not isinstance(tag, (bytes, bytearray)) or len(tag) != TAG_BITS // 8:
        raise InputError(f"a watermark tag is {TAG_BITS // 8} bytes (watermark.tag_of(request_id)), not {tag!r}")
    tag = bytes(tag)
    region = np.asarray(region, dtype=bool)
    if region.shape != pixels.shape[:2]:
        raise InputError(f"the region is {region.shape} but the image {pixels.shape[:2]}; give one of the image's size")
    h, w = pixels.shape[:2]
    offset = payload_bits(tag) * DELTA / 2
    rows, cols, signs = _layout(key)
    py, px, sy, sx = _rows(h), _rows(w), _synthesis(h), _synthesis(w)  # (K, H), (K, W), (H, K), (W, K)
    inside = region.astype(np.float64)
    # how the coefficients (u', v') respond to the region's part of basis function (u, v): (K, K, K, K)
    ty = (py.T[:, :, None] * sy[:, None, :]).reshape(h, K * K)  # (H, K u' * K u)
    tx = (px.T[:, :, None] * sx[:, None, :]).reshape(w, K * K)  # (W, K v' * K v)
    resp = (ty.T @ inside @ tx).reshape(K, K, K, K).transpose(0, 2, 1, 3)  # (u', v', u, v)
    unit = np.zeros((BITS, K, K))  # each bit's direction in coefficients
    np.add.at(unit, (np.arange(BITS)[:, None], rows, cols), signs / np.sqrt(GROUP))
    moved_coef = np.einsum("abuv,kuv->kab", resp, unit)  # (BITS, K, K): coefficients each direction moves
    a = _projections(moved_coef, key).T  # (BITS projections, BITS directions)
    out = pixels
    for _ in range(ROUNDS):
        x = _projections(py @ _luma(out) @ px.T, key)
        target = np.round((x - offset) / DELTA) * DELTA + offset
        if np.all(np.abs(target - x) < DELTA / 16):
            break
        c = np.linalg.lstsq(a, target - x, rcond=1e-6)[0]
        residual = (sy @ np.einsum("k,kuv->uv", c, unit) @ sx.T) * inside  # (H, W): zero outside the region
        moved = out.astype(np.float64) + (residual[..., None] if pixels.ndim == 3 else residual)
        out = np.where(region[..., None] if pixels.ndim == 3 else region, np.clip(np.round(moved), 0, 255), out)
        out = out.astype(np.uint8)
    mse = np.mean((out.astype(np.float64) - pixels) ** 2)
    if mse > 255**2 / 10 ** (WITHIN_PSNR / 10) or _decode(_projections(py @ _luma(out) @ px.T, key), 1.0).tag != tag:
        return None
    return out


RESIZES = ((0.75, "bilinear"), (0.5, "bilinear"), (0.75, "bicubic"), (0.5, "bicubic"))  # tried when reading


@lru_cache(maxsize=64)
def _undo(n: int, m: int, how: str) -> np.ndarray:
    """(K, m): rows that give the window coefficients of an axis of n pixels from the same axis resized to m pixels
    by `how`: the window's rows times the least-squares inverse of the resize (exact for what the resize keeps)."""
    eye = np.eye(n, dtype=np.float32)
    resize = _resize(eye, (m, n), RESAMPLE[how])  # (n, m): row i is pixel i's contribution to the resized axis
    gram = resize.T @ resize  # (m, m); Q = P @ resize @ gram^-1 minimises |Q @ resize.T - P|
    gram += 1e-6 * np.trace(gram) / m * np.eye(m)
    return np.linalg.solve(gram, (_rows(n) @ resize).T).T


ENLARGED = 84  # the largest marked side whose sampling kernel is one pixel (below CANON samples a window)


@lru_cache(maxsize=1024)
def _unenlarge(n: int, m: int, how: str) -> np.ndarray:
    """(K, m): the window coefficients of an axis of n pixels from the same axis enlarged to m > n pixels by `how`:
    the window's rows times the exact inverse of the enlargement, (E E^T)^-1 E with E (n, m) the enlargement."""
    enlarge = _resize(np.eye(n, dtype=np.float32), (m, n), RESAMPLE[how])  # (n, m): pixel i's part of each output
    gram = enlarge @ enlarge.T  # (n, n), full rank: an enlargement loses nothing
    gram += 1e-9 * np.trace(gram) / n * np.eye(n)
    return _rows(n) @ np.linalg.solve(gram, enlarge)


def _enlarged(lum: np.ndarray, key: str) -> Reading | None:
    """The reading of an image that may be a small marked one enlarged (by any factor, nearest, bilinear, bicubic or
    Lanczos), accepted when its CRC holds and its projections reach SYNC. Up to ENLARGED pixels the window is
    sampled with a kernel of one pixel, not a fixed share of the window, so an enlarged copy is sampled otherwise
    than the original: each marked side n and method is undone exactly instead."""
    h, w = lum.shape
    best = None
    for ny in range(MIN_SIDE, min(h - 1, ENLARGED) + 1):
        nx = round(ny * w / h)
        if not MIN_SIDE <= nx < w:
            continue
        for how in RESAMPLE:
            x = _projections(_unenlarge(ny, h, how) @ lum @ _unenlarge(nx, w, how).T, key)
            reading = _decode(x, h / ny)
            if reading.tag is not None and reading.margin >= SYNC:
                return reading
            if best is None or reading.margin > best.margin:
                best = Reading(None, reading.bits, 0.0, reading.margin)
    return best


def _resized_sides(m: int, r: float) -> list[int]:
    """Sides n that a resize by r may have brought to m pixels (n * r rounded or truncated)."""
    return [n for n in range(int(np.ceil((m - 0.5) / r)), int(np.floor((m + 1) / r - 1e-9)) + 1) if n >= MIN_SIDE]


def _decode(x: np.ndarray, gain: float, crop: tuple[int, int, int, int] = (0, 0, 0, 0)) -> Reading:
    """The Reading of projections x (BITS,): the nearer of the two lattices per bit, accepted when the CRC holds."""
    q = x / (DELTA / 2)
    bits = np.round(q).astype(np.int64) % 2
    margin = float(np.mean(1 - 2 * np.abs(q - np.round(q))))
    tag = np.packbits(bits[:TAG_BITS].astype(np.uint8)).tobytes()
    ok = np.array_equal(bits[TAG_BITS:], _check_bits(tag))
    return Reading(tag if ok else None, bits, gain if ok else 0.0, margin, crop)


def _margins(q: np.ndarray) -> np.ndarray:
    """Mean closeness of projections (in units of DELTA / 2) to the lattice, over the last axis."""
    return np.mean(1 - 2 * np.abs(q - np.round(q)), -1)


def _sides(m: int) -> range:
    """Marked sides an axis of m pixels may have been cut from (a crop removing up to CROP, rounded)."""
    return range(m, int(np.floor((m + 1) / (1 - CROP))) + 1)


@lru_cache(maxsize=512)
def _rows(n: int) -> np.ndarray:
    """(K, n): the analysis rows of the window of an axis of n pixels."""
    return _analysis(n, *_window(n))


def _shifted(hyps: list[tuple[int, int]], m: int, q: int = 1) -> np.ndarray:
    """(T, K, m): rows of the windows of hypotheses (n, c) on an axis of m pixels (or of m blocks of q pixels).

    The window of marked side n seen after cutting c pixels reads the same pixels as before the cut: its rows are
    those of the whole side, shifted by c (and summed over each block of q pixels)."""
    return np.stack([_rows(n)[:, c : c + m * q].reshape(K, m, q).sum(2) for n, c in hyps])


@lru_cache(maxsize=64)
def _unresize(k: int, m: int, how: str) -> np.ndarray:
    """(k, m): the least-squares inverse of resizing an axis of k pixels to m pixels by `how`."""
    resize = _resize(np.eye(k, dtype=np.float32), (m, k), RESAMPLE[how]).T  # (m, k)
    gram = resize.T @ resize
    gram += 1e-6 * np.trace(gram) / k * np.eye(k)
    return np.linalg.solve(gram, resize.T)


def _resized_back(m: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Rows and (before, after) cuts of every crop of up to CROP of an axis of m pixels, then resized back to m
    (bicubic): the window's rows over the kept part times the inverse of that resize."""
    hyps = [(k, c) for k in range(int(np.floor((1 - CROP) * m)) - 1, m) for c in range(m - k + 1)]
    rows = np.stack([_rows(m)[:, c : c + k] @ _unresize(k, m, "bicubic") for k, c in hyps])
    return rows, [(c, m - k - c) for k, c in hyps]


def _best(lum: np.ndarray, py: np.ndarray, px: np.ndarray, ycuts: list, xcuts: list, key: str, coarse: bool = False):
    """The CHECKED hypotheses of the grid of rows py (Ty, K, H) x columns px (Tx, K, W) that lie closest to the
    lattice, as (margin, Reading) with the crop (left, top, right, bottom) of ycuts and xcuts ((before, after) each).
    The CRC is checked only where the margin reaches SYNC, which a window without the mark practically never does."""
    h, w = lum.shape
    a = (py.reshape(-1, h) @ lum).reshape(len(py), K, w)
    coef = (a.reshape(-1, w) @ px.reshape(-1, w).T).reshape(len(py), K, len(px), K).transpose(0, 2, 1, 3)
    x = _projections(coef, key)  # (Ty, Tx, BITS)
    margins = _margins(x / (DELTA / 2))
    out = []
    for i in np.argsort(margins, axis=None)[::-1][:CHECKED]:
        iy, ix = np.unravel_index(i, margins.shape)
        crop = (xcuts[ix][0], ycuts[iy][0], xcuts[ix][1], ycuts[iy][1])
        reading = _decode(x[iy, ix], 1.0, crop)
        if coarse or margins[iy, ix] < SYNC:
            reading = Reading(None, reading.bits, 0.0, reading.margin, crop)
        out.append((float(margins[iy, ix]), reading))
    return out


def _search(lum: np.ndarray, key: str) -> Reading:
    """The crop hypothesis that decodes (the first found), else the one closest to the lattice."""
    h, w = lum.shape
    seen: list[tuple[float, Reading]] = []

    def found(ys: list, xs: list, q: int = 1) -> Reading | None:
        if not ys or not xs:
            return None
        hq, wq = h // q, w // q
        best = _best(
            lum if q == 1 else blocks,
            _shifted(ys, hq, q),
            _shifted(xs, wq, q),
            [(c, n - h - c) for n, c in ys],
            [(c, n - w - c) for n, c in xs],
            key,
            coarse=q > 1,
        )
        seen.extend(best)
        return next((r for _, r in best if r.tag is not None), None)

    if max(h, w) <= SQUARE_SEARCH:  # every marked side and cut on each axis independently
        ys = [(n, c) for n in _sides(h) for c in range(n - h + 1)]
        hit = found(ys, [(n, c) for n in _sides(w) for c in range(n - w + 1)])
        if hit:
            return hit
        (py, ycuts), (px, xcuts) = _resized_back(h), _resized_back(w)  # a crop resized back to the marked size
        seen.extend(best := _best(lum, py, px, ycuts, xcuts, key))
        hit = next((r for _, r in best if r.tag is not None), None)
        return hit or max(seen, key=lambda s: s[0])[1]
    # one scale for both axes (the crop kept the aspect ratio); large images at a stride q on q x q blocks first
    q = max(1, round(max(h, w) / 256))
    blocks = lum[: h // q * q, : w // q * q].reshape(h // q, q, w // q, q).mean((1, 3))
    for n in _sides(h)[::q]:
        nx = round(n * w / h)
        hit = found([(n, c) for c in range(0, n - h + 1, q)], [(nx, c) for c in range(0, nx - w + 1, q)], q)
        if hit:
            return hit
    if q > 1:  # then every pixel around the best coarse hypotheses
        near = range(1 - q, q)
        for _, coarse in sorted(seen, key=lambda s: -s[0])[:REFINE]:
            cx, cy, _, bottom = coarse.crop
            for n in (h + cy + bottom + d for d in near):
                nx = round(n * w / h)
                if n in _sides(h):
                    ys = [(n, cy + d) for d in near if 0 <= cy + d <= n - h]
                    hit = found(ys, [(nx, cx + d) for d in near if 0 <= cx + d <= nx - w])
                    if hit:
                        return hit
    return max(seen, key=lambda s: s[0])[1]


def read(pixels: np.ndarray, key: str = "ldmkit") -> Reading:
    """The tag hidden in `pixels` (H, W) or (H, W, 3) uint8, or a Reading with tag None when there is none.

    The whole image is tried first, then resized copies of it (RESIZES), then enlarged copies of a small image (up
    to ENLARGED pixels a side), then every crop of up to CROP of each side."""
    _check_image(pixels)
    lum = _luma(pixels)
    h, w = lum.shape
    best = _decode(_projections(_rows(h) @ lum @ _rows(w).T, key), 1.0)
    if best.tag is not None:
        return best
    for r, how in RESIZES:  # a resized copy: undo the resize, for each side it may have had
        for ny in _resized_sides(h, r):
            for nx in [ny] if h == w else _resized_sides(w, r):
                reading = _decode(_projections(_undo(ny, h, how) @ lum @ _undo(nx, w, how).T, key), r)
                if reading.tag is not None:
                    return reading
                if reading.margin > best.margin:
                    best = reading
    enlarged = _enlarged(lum, key)
    if enlarged is not None and enlarged.tag is not None:
        return enlarged
    found = _search(lum, key)
    return found if found.tag is not None or found.margin > best.margin else best
