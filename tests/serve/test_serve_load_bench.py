"""benchmarks/serve_load.py compares the images two servers send by their pixels, not by their PNG files."""

import io
import sys

import numpy as np
from PIL import Image, PngImagePlugin

from tests.serve_helpers import ROOT


def png(pixels: np.ndarray, request_id: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("ldmkit", f'{{"request_id": "{request_id}"}}')  # as every served PNG embeds its own
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_the_same_pixels_in_two_served_pngs_compare_equal_and_other_pixels_do_not():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serve_load

    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    a, b = png(pixels, "a" * 32), png(pixels, "b" * 32)
    assert a != b  # the files differ
    assert np.array_equal(serve_load.decoded(a), serve_load.decoded(b))
    changed = pixels.copy()
    changed[0, 0, 0] ^= 1
    assert not np.array_equal(serve_load.decoded(png(changed, "a" * 32)), serve_load.decoded(a))
