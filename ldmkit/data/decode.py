"""Decoding an image file straight to training pixels: fast for large files, bounded by data.max_pixels.

`prepare_pixels` turns a file into the uint8 square a data set stores for one item: the shorter side resized to
`size` (LANCZOS) and the centre `size` x `size` square kept. Large files are never decoded at full size when the
format allows less: a JPEG is decoded by its DCT at 1/2, 1/4 or 1/8 scale (Pillow's `draft`), and any image still
more than twice the needed size is first shrunk by an integer factor with a box filter (Pillow's `reduce`), so the
final LANCZOS step works from at most 4x the output size. The geometry is kept exact through these steps (the
final resize takes the centre square as a sub-pixel box), so the result matches a full-size decode and LANCZOS
resize to within rounding on natural images.

`max_pixels` replaces Pillow's own decompression-bomb limit (89 megapixels, with a DecompressionBombWarning above
it and an error above twice that): a file whose decode would hold more pixels than max_pixels is refused with
that reason (`TooLarge`), any other size is decoded without Pillow's warning.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from .common import human_bytes
from .images import to_mode

REDUCING_GAP = 2.0  # decode (draft) and reduce to at least this multiple of the output size before LANCZOS
_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK")  # modes Image.reduce takes (others: after to_mode)
_OPEN_LOCK = threading.Lock()
ORIENTATION = 0x0112  # the EXIF orientation tag, and the transposition each of its values asks for
_T = Image.Transpose
_TRANSPOSE = {
    2: _T.FLIP_LEFT_RIGHT,
    3: _T.ROTATE_180,
    4: _T.FLIP_TOP_BOTTOM,
    5: _T.TRANSPOSE,
    6: _T.ROTATE_270,
    7: _T.TRANSVERSE,
    8: _T.ROTATE_90,
}
_SWAPS = (_T.TRANSPOSE, _T.ROTATE_270, _T.TRANSVERSE, _T.ROTATE_90)  # the ones that swap width and height


class TooLarge(ValueError):
    """A file that decodes to more pixels than data.max_pixels; the message gives the sizes."""


def open_unlimited(path: str | Path) -> Image.Image:
    """Image.open without Pillow's decompression-bomb check (the caller applies data.max_pixels instead). Only the
    header is read. Pillow checks only while opening, so its limit is lifted for that moment alone."""
    with _OPEN_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _draft_scale(img: Image.Image, need: int) -> int:
    """The DCT scale (1, 2, 4 or 8) a JPEG can be decoded at with its shorter side still >= need pixels."""
    if img.format != "JPEG":
        return 1
    k = min(img.size) // max(1, need)
    return next((s for s in (8, 4, 2) if k >= s), 1)


def decoded_pixels(img: Image.Image, size: int) -> int:
    """How many pixels decoding `img` (opened, not loaded) for an output of `size` holds at once."""
    w, h = img.size
    s = _draft_scale(img, math.ceil(size * REDUCING_GAP))
    return math.ceil(w / s) * math.ceil(h / s)


def check_size(img: Image.Image, size: int, max_pixels: int) -> None:
    """TooLarge when decoding `img` for an output of `size` would hold more than max_pixels pixels."""
    n = decoded_pixels(img, size)
    if max_pixels > 0 and n > max_pixels:
        w, h = img.size
        fmt = img.format or "this"
        scale = _draft_scale(img, math.ceil(size * REDUCING_GAP))
        how = f"still {n:,} decoded at 1/{scale} scale" if fmt == "JPEG" else f"a {fmt} file cannot be decoded smaller"
        raise TooLarge(
            f"it is {w}x{h} = {w * h:,} pixels ({how}), above data.max_pixels={max_pixels:,}; "
            f"raise data.max_pixels to {n} (decoding takes about {human_bytes(n * 4)} of memory per loading process) "
            f"or downscale the file"
        )


def prepare_pixels(path: str | Path, size: int, channels: int, max_pixels: int) -> np.ndarray:
    """The uint8 (size, size, channels) training square of the image file `path` (see the module docstring).
    Raises TooLarge above max_pixels, OSError / ValueError (and others from Pillow) for a damaged file."""
    with open_unlimited(path) as img:
        img.seek(0)  # the first frame of an animation
        check_size(img, size, max_pixels)
        w, h = img.size
        need = math.ceil(size * REDUCING_GAP)  # shorter side to decode and reduce to, at least
        s = _draft_scale(img, need)
        if s > 1:  # JPEG: decode at 1/s by the DCT
            img.draft(None, (math.ceil(w / s), math.ceil(h / s)))
        img.load()
        turn = _TRANSPOSE.get(img.getexif().get(ORIENTATION, 1))
        out, f = img, float(s)  # the current image and its scale: it shows the file's w x h pixels as w/f x h/f
        if out.mode in _REDUCIBLE:  # shrink before converting: compositing a huge RGBA on white costs 3 copies
            out, f = _reduce(out, need, f)
        if turn is not None:
            out = out.transpose(turn)  # camera photos: apply the EXIF rotation (as ImageOps.exif_transpose)
            w, h = (h, w) if turn in _SWAPS else (w, h)
        out, f = _reduce(to_mode(out, channels), need, f)  # modes reduce does not take (P, I;16) come here
        vw, vh = w / f, h / f  # the file's pixels in the current image (a last partial row or column excluded)
        side = min(vw, vh)
        box = ((vw - side) / 2, (vh - side) / 2, (vw + side) / 2, (vh + side) / 2)  # the centre square
        out = out.resize((size, size), Image.Resampling.LANCZOS, box=box)
        return np.asarray(out, dtype=np.uint8).reshape(size, size, channels)


def _reduce(img: Image.Image, need: int, f: float) -> tuple[Image.Image, float]:
    """(`img` shrunk by the largest integer factor k that keeps its shorter side >= need, f * k); box filter, RGBA
    and LA premultiplied by Pillow. Unchanged when k is 1."""
    k = min(img.size) // need
    return (img.reduce(k), f * k) if k >= 2 else (img, f)


def probe(path: str | Path, size: int, max_pixels: int) -> str | None:
    """Why the file at `path` cannot be used for an output of `size` (its header alone is read), or None if it can."""
    try:
        with open_unlimited(path) as img:
            w, h = img.size
            if w <= 0 or h <= 0:
                return f"its header gives it no pixels ({w}x{h})"
            check_size(img, size, max_pixels)
    except TooLarge as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - any failure to parse the header means "unreadable"
        return f"its header cannot be read ({type(e).__name__}: {e})"
    return None
