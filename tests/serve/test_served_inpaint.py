"""A served inpainting (AUTOMATIC1111's img2img with a mask) keeps its promise with the server's watermark on: the
pixels outside the mask come back bit for bit, the mark goes only into the regenerated region, and a region too
small to carry it leaves the image unmarked, which the image's record and the audit row say."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from ldmkit.governance import watermark
from ldmkit.serve.audit import Audit
from ldmkit.serve.store import open_store
from tests.serve_helpers import LiveServer


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = LiveServer(tmp_path_factory.mktemp("db") / "ldmkit.db", no_auth=True)  # the watermark is on by default
    yield server
    server.close()


def _b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _picture() -> np.ndarray:
    """A smooth 64x64 colour picture (64, 64, 3)."""
    rng = np.random.default_rng(0)
    small = rng.integers(40, 216, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((64, 64), Image.Resampling.BICUBIC))


def _inpaint(live, box):
    """(the returned pixels, the kept pixels of the mask, the input, the PNG's record) of an inpainting of box
    (top, bottom, left, right)."""
    picture = _picture()
    mask = np.zeros((64, 64), np.uint8)
    mask[box[0] : box[1], box[2] : box[3]] = 255
    body = {
        "prompt": "red apple",
        "init_images": [_b64(Image.fromarray(picture))],
        "mask": _b64(Image.fromarray(mask)),
        "denoising_strength": 1.0,
        "steps": 2,
        "seed": 1,
    }
    r = live.client().post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    with Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))) as im:
        record = json.loads(im.text["ldmkit"])
        got = np.asarray(im.convert("RGB"))
    return got, mask == 0, picture, record


def test_a_served_inpainting_keeps_the_unmasked_pixels_and_marks_the_region(live):
    """The server marked the whole image, so the pixels the mask keeps changed."""
    got, kept, picture, record = _inpaint(live, (12, 52, 8, 56))
    assert np.array_equal(got[kept], picture[kept])  # bit for bit
    assert not np.array_equal(got[~kept], picture[~kept])  # the region was regenerated
    assert watermark.read(got).tag.hex() == record["request_id"][:12] and "note" not in record


def test_a_region_too_small_for_the_mark_goes_out_unmarked_and_says_so(live):
    got, kept, picture, record = _inpaint(live, (28, 36, 28, 36))  # an 8x8 hole cannot carry 72 bits
    assert np.array_equal(got[kept], picture[kept])
    assert watermark.read(got).tag is None
    assert record["watermark"] is None and "not watermarked" in record["note"]
    row = [r for r in Audit(open_store(str(live.run.serve.database))).tail(50) if r["request_id"]]
    assert "not watermarked" in row[-1]["reason"]
