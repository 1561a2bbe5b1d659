"""An invisible watermark that carries a 48-bit tag (the first 12 hex digits of a request id) in an image's pixels.

Method: dither-modulation quantisation (QIM; Chen and Wornell, "Quantization index modulation", 2001) of keyed
projections of low-frequency DCT coefficients of the luminance, taken at a canonical size.
- The luminance is resized to CANON x CANON; its orthonormal 2-D DCT-II gives coefficients C.
- The 48 tag bits and a 24-bit CRC are 72 bits; bit k owns a keyed random group of GROUP low-frequency coefficients
  (frequencies u, v <= BAND, DC excluded) and a keyed +-1 pattern p_k over them.
- Embedding moves the projection x_k = <C_k, p_k> / sqrt(GROUP) to the nearest point of the lattice
  DELTA * (Z + bit / 2), and adds the change, brought back to the image's size, equally to R, G and B.
- Reading resizes whatever it gets to CANON x CANON again (so any rescale is undone), decodes every bit by the
  nearest lattice, and accepts a tag only when the CRC matches. Because resizing a small image dims its upper
  frequencies, reading also tries the coefficient gains of 0.75x and 0.5x resizes (bilinear and bicubic), measured
  once on the DCT basis.

Why not PyPI `invisible-watermark`: its DWT-DCT method needs images of at least 256x256 pixels, while the shipped
models draw 32x32 and 64x64 images. This one works from MIN_SIDE pixels and costs about a millisecond an image.
Low frequencies survive JPEG, resizing and re-saving; they do not survive cropping, which shifts every frequency
(benchmarks/watermark.py measures each). Anyone holding the key can read or remove the mark: it is a provenance
label, not a security boundary.
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
CANON = 64  # side of the canonical luminance the mark lives in
BAND = 14  # highest DCT frequency index used (of CANON): about 0.11 cycles per canonical pixel
GROUP = 3  # coefficients per bit
ROUNDS = 6  # embedding passes at most
DELTA = 64.0  # lattice step of a projection (pixel units of the orthonormal DCT): strength against visibility
MIN_SIDE = 32  # smallest image side marked and read
LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class Reading:
    tag: bytes | None  # the 6-byte tag, or None when no valid watermark was found
    bits: np.ndarray  # the 72 decoded bits of the most likely reading (0/1)
    gain: float  # the resize hypothesis that decoded (1, 0.75 or 0.5); 0 when none did
    margin: float  # mean distance of the projections from the decision boundary, as a fraction of DELTA / 4


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
    u, v = np.meshgrid(np.arange(BAND + 1), np.arange(BAND + 1), indexing="ij")
    keep = (u + v) > 0
    cells = np.stack([u[keep], v[keep]], 1)  # (M, 2)
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    chosen = cells[rng.permutation(len(cells))[: BITS * GROUP]].reshape(BITS, GROUP, 2)
    signs = rng.choice([-1.0, 1.0], size=(BITS, GROUP))
    return chosen[..., 0], chosen[..., 1], signs


def _luma(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim == 2:
        return pixels.astype(np.float64)
    return pixels[..., :3].astype(np.float64) @ LUMA


RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


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


def _projections(coef: np.ndarray, key: str) -> np.ndarray:
    rows, cols, signs = _layout(key)
    return (coef[rows, cols] * signs).sum(1) / np.sqrt(GROUP)  # (BITS,)


def embed(pixels: np.ndarray, tag: bytes, key: str = "ldmkit") -> np.ndarray:
    """pixels (H, W) or (H, W, 3) uint8 with `tag` (6 bytes) hidden in them; same shape and dtype."""
    _check_image(pixels)
    if not isinstance(tag, (bytes, bytearray)) or len(tag) != TAG_BITS // 8:
        raise InputError(f"a watermark tag is {TAG_BITS // 8} bytes (watermark.tag_of(request_id)), not {tag!r}")
    h, w = pixels.shape[:2]
    d = _dct()
    bits = payload_bits(bytes(tag))
    offset = bits * DELTA / 2
    rows, cols, signs = _layout(key)
    out = pixels
    for _ in range(ROUNDS):  # clipping at black and white and the rounding take some change back: measure again
        x = _projections(d @ _resize(_luma(out), (CANON, CANON)) @ d.T, key)
        target = np.round((x - offset) / DELTA) * DELTA + offset  # the nearest point of the bit's lattice
        if np.all(np.abs(target - x) < DELTA / 16):
            break
        change = np.zeros((CANON, CANON))
        np.add.at(change, (rows, cols), ((target - x)[:, None] * signs) / np.sqrt(GROUP))
        residual = _resize(d.T @ change @ d, (w, h))  # (H, W): the change of luminance at the image's size
        moved = out.astype(np.float64) + (residual[..., None] if pixels.ndim == 3 else residual)
        out = np.clip(np.round(moved), 0, 255).astype(np.uint8)
    return out


@lru_cache(maxsize=8)
def _gains(key: str) -> dict[float, np.ndarray]:
    """For a resize by factor r and back: the gain of each bit's coefficients, measured on the DCT basis."""
    d = _dct()
    rows, cols, _ = _layout(key)
    out = {(1.0, "none"): np.ones((BITS, GROUP))}
    for r, how in ((0.75, "bilinear"), (0.5, "bilinear"), (0.75, "bicubic"), (0.5, "bicubic")):
        g = np.empty((BITS, GROUP))
        small = max(2, round(CANON * r))
        for k in range(BITS):
            for j in range(GROUP):
                basis = np.outer(d[rows[k, j]], d[cols[k, j]])  # unit-energy basis image
                back = _resize(_resize(basis, (small, small), RESAMPLE[how]), (CANON, CANON))
                g[k, j] = float((back * basis).sum())
        out[r, how] = g
    return out


def read(pixels: np.ndarray, key: str = "ldmkit") -> Reading:
    """The tag hidden in `pixels` (H, W) or (H, W, 3) uint8, or a Reading with tag None when there is none."""
    _check_image(pixels)
    d = _dct()
    coef = d @ _resize(_luma(pixels), (CANON, CANON)) @ d.T
    rows, cols, signs = _layout(key)
    best = None
    for (r, _), gain in _gains(key).items():
        x = (coef[rows, cols] / np.maximum(gain, 0.05) * signs).sum(1) / np.sqrt(GROUP)
        bits = np.round(x / (DELTA / 2)).astype(np.int64) % 2  # the nearer of the two lattices
        margin = float(np.mean(1 - 4 * np.abs(x / (DELTA / 2) - np.round(x / (DELTA / 2))) / 2))
        tag = np.packbits(bits[:TAG_BITS].astype(np.uint8)).tobytes()
        if np.array_equal(bits[TAG_BITS:], _check_bits(tag)):
            return Reading(tag, bits, r, margin)
        if best is None or margin > best.margin:
            best = Reading(None, bits, 0.0, margin)
    return best
