"""The invisible watermark: the tag survives re-saving, JPEG and resizing; unmarked images read as unmarked."""

import io

import numpy as np
import pytest
from PIL import Image

from ldmkit.data.fashion_mnist import load_arrays
from ldmkit.errors import InputError
from ldmkit.governance import watermark as wm

TAG = bytes.fromhex("0123456789ab")


@pytest.fixture(scope="module")
def pictures():
    images, _ = load_arrays("test")
    return [np.asarray(Image.fromarray(a).convert("RGB")) for a in images[:40]]


def resized(a: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((side, side), Image.Resampling.BICUBIC))


def jpeg(a: np.ndarray, quality: int = 75) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf))


def psnr(a, b) -> float:
    return 10 * np.log10(255**2 / np.mean((a.astype(float) - b.astype(float)) ** 2))


@pytest.mark.parametrize("side", [64, 256])
def test_the_tag_survives_png_jpeg_and_half_size(pictures, side):
    for a in pictures[:12]:
        a = resized(a, side)
        marked = wm.embed(a, TAG)
        assert marked.shape == a.shape and marked.dtype == np.uint8
        assert psnr(a, marked) > 35
        buf = io.BytesIO()
        Image.fromarray(marked).save(buf, "PNG")
        assert wm.read(np.asarray(Image.open(buf))).tag == TAG
        assert wm.read(jpeg(marked)).tag == TAG
        assert wm.read(resized(marked, side // 2)).tag == TAG


def test_grey_and_small_images(pictures):
    grey = resized(pictures[0], 32)[..., 0]
    marked = wm.embed(grey, TAG)
    assert marked.ndim == 2 and wm.read(marked).tag == TAG
    flat = np.full((64, 64, 3), 255, np.uint8)  # a blank white image: clipping, no crash, no NaN
    assert wm.read(wm.embed(flat, TAG)).tag in (TAG, None)
    with pytest.raises(InputError, match="too small"):
        wm.embed(np.zeros((16, 16, 3), np.uint8), TAG)
    with pytest.raises(InputError, match="6 bytes"):
        wm.embed(resized(pictures[0], 64), b"short")


def test_unmarked_images_and_other_keys_read_as_unmarked(pictures):
    images, _ = load_arrays("test")
    unmarked = [resized(np.asarray(Image.fromarray(a).convert("RGB")), 64) for a in images[1000:1200]]
    assert sum(wm.read(a).tag is not None for a in unmarked) == 0
    marked = wm.embed(resized(pictures[1], 64), TAG)
    assert wm.read(marked, key="another").tag is None
    assert wm.read(marked).tag == TAG


def test_tag_of_a_request_id():
    assert wm.tag_of("0123456789abcdef0123456789abcdef") == TAG
    with pytest.raises(InputError, match="12 hex digits"):
        wm.tag_of("not-hex-at-all")
