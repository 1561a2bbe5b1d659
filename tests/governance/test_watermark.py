"""The invisible watermark: the tag survives re-saving, JPEG, resizing and 10% crops; unmarked images (cropped or
not) read as unmarked."""

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
    unmarked = [resized(np.asarray(Image.fromarray(a).convert("RGB")), 64) for a in images[1000:1060]]
    assert sum(wm.read(a).tag is not None for a in unmarked) == 0
    marked = wm.embed(resized(pictures[1], 64), TAG)
    assert wm.read(marked, key="another").tag is None
    assert wm.read(marked).tag == TAG


def test_tag_of_a_request_id():
    assert wm.tag_of("0123456789abcdef0123456789abcdef") == TAG
    with pytest.raises(InputError, match="12 hex digits"):
        wm.tag_of("not-hex-at-all")


def cut(a: np.ndarray, left: int, top: int, right: int, bottom: int) -> np.ndarray:
    h, w = a.shape[:2]
    return a[top : h - bottom, left : w - right]


@pytest.mark.parametrize("side", [32, 64])
def test_a_crop_of_a_tenth_of_each_side_reads_its_tag_and_where_it_was_cut(pictures, side):
    rng = np.random.default_rng(side)
    drop = side - round(0.9 * side)  # 3 of 32, 6 of 64
    for i, a in enumerate(pictures[:8]):
        marked = wm.embed(resized(a, side), TAG)
        left, top = [(0, 0), (drop, drop), (0, drop), (drop, 0)][i] if i < 4 else rng.integers(0, drop + 1, 2)
        crop = (int(left), int(top), int(drop - left), int(drop - top))
        reading = wm.read(cut(marked, *crop))
        assert reading.tag == TAG and reading.crop == crop
    one_side = wm.embed(resized(pictures[9], side), TAG)[:, drop:]  # only the left tenth removed
    assert wm.read(one_side).tag == TAG


def test_a_crop_of_a_larger_image_reads_its_tag(pictures):
    marked = wm.embed(resized(pictures[2], 128), TAG)
    assert wm.read(cut(marked, 3, 9, 10, 4)).tag == TAG  # 115 of 128 pixels kept on each axis


@pytest.mark.slow
def test_a_crop_of_a_512_pixel_image_reads_its_tag(pictures):
    marked = wm.embed(resized(pictures[3], 512), TAG)
    assert wm.read(cut(marked, 17, 40, 34, 11)).tag == TAG


def test_unmarked_images_and_their_crops_never_read_as_marked(pictures):
    images, _ = load_arrays("test")
    rng = np.random.default_rng(1)
    for a in images[2000:2060]:
        a = resized(np.asarray(Image.fromarray(a).convert("RGB")), 64)
        left, top = rng.integers(0, 7, 2)
        for b in (a, cut(a, left, top, 6 - left, 6 - top)):
            reading = wm.read(b)
            assert reading.tag is None and reading.margin < wm.SYNC  # no crop hypothesis even fits the lattice
    marked = wm.read(cut(wm.embed(resized(pictures[4], 64), TAG), 2, 5, 4, 1))
    assert marked.tag == TAG and marked.margin > wm.SYNC  # while the marked crop's window does


def test_a_crop_resized_back_to_the_original_size_reads_its_tag(pictures):
    for i, a in enumerate(pictures[10:14]):
        marked = wm.embed(resized(a, 64), TAG)
        left, top = (i, 6 - i) if i % 2 else (6 - i, i)
        back = resized(cut(marked, left, top, 6 - left, 6 - top), 64)  # 58x58 blown up to 64x64 (bicubic)
        reading = wm.read(back)
        assert reading.tag == TAG and reading.crop == (left, top, 6 - left, 6 - top)


@pytest.mark.parametrize("how", [Image.Resampling.NEAREST, Image.Resampling.BICUBIC])
def test_a_small_image_enlarged_two_to_four_times_reads_its_tag(pictures, how):
    """32x32 marks were not read from copies enlarged 2x, 3x or 4x: up to 84 pixels the window is sampled with a
    one-pixel kernel, which an enlarged copy no longer has, so the reader now undoes each enlargement exactly."""
    for a in pictures[:3]:
        marked = wm.embed(resized(a, 32), TAG)
        for factor in (2, 3, 4):
            big = np.asarray(Image.fromarray(marked).resize((32 * factor, 32 * factor), how))
            reading = wm.read(big)
            assert reading.tag == TAG, (factor, how)
            assert reading.gain > 1  # read as an enlarged copy
