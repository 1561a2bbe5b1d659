"""Edits and governance that keep their promises: the watermark never changes the pixels an inpaint or outpaint
keeps, an edit that changes nothing carries no generation record, and the record names the model by its name and
weights hash, never by a local path."""

import json
import uuid

import numpy as np
import pytest
from PIL import Image

from ldmkit.checkpoint import file_sha256
from ldmkit.data.images import load_image
from ldmkit.governance import watermark
from ldmkit.governance.screen import OutputScreen, finisher
from ldmkit.pipelines.generate import generate_to_file
from ldmkit.pipelines.inpaint import InpaintOptions, inpaint_to_file
from ldmkit.pipelines.outpaint import Border, outpaint_to_file
from ldmkit.pipelines.request import SampleRequest


def _png(path, arr):
    Image.fromarray(arr).save(path)
    return path


def _picture(tmp_path, side=64, seed=0):
    """A smooth grey picture (a marked region must hold a low-frequency change) of side x side pixels."""
    rng = np.random.default_rng(seed)
    small = rng.integers(40, 216, (4, 4), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC))
    return _png(tmp_path / "in.png", arr), arr


def _mask(tmp_path, side, box):
    arr = np.zeros((side, side), np.uint8)
    arr[box[0] : box[1], box[2] : box[3]] = 255
    return _png(tmp_path / "mask.png", arr), arr > 0


def _marking(reports):
    run_id = uuid.uuid4().hex
    return finisher(OutputScreen(mark=True), run_id, reports.append), watermark.tag_of(run_id)


REQ = SampleRequest(n=1, labels=[1], steps=2, sampler="euler", seed=3)


def test_inpaint_watermark_goes_only_into_the_regenerated_region(tmp_path, tiny_ldm):
    """--watermark changed 1,507 kept pixels of a real mask; now the kept pixels are the input's bit for bit and
    the mark, confined to the regenerated box, still reads."""
    image, arr = _picture(tmp_path)
    mask, where = _mask(tmp_path, 64, (12, 52, 8, 56))
    reports = []
    finish, tag = _marking(reports)
    [p] = inpaint_to_file(tiny_ldm, REQ, image, mask, tmp_path / "o.png", finish=finish, progress=False)
    got = np.asarray(load_image(p, 1))
    assert (got[~where] == arr[~where]).all()
    assert watermark.read(got).tag == tag and not reports
    assert json.loads(Image.open(p).text["ldmkit"])["watermark"] == tag.hex()


def test_a_region_too_small_for_the_mark_is_left_unmarked_and_said_so(tmp_path, tiny_ldm):
    image, arr = _picture(tmp_path)
    mask, where = _mask(tmp_path, 64, (28, 36, 28, 36))  # an 8x8 hole cannot carry 72 bits
    reports = []
    finish, _ = _marking(reports)
    [p] = inpaint_to_file(tiny_ldm, REQ, image, mask, tmp_path / "o.png", finish=finish, progress=False)
    got = np.asarray(load_image(p, 1))
    assert (got[~where] == arr[~where]).all()
    assert len(reports) == 1 and "not watermarked" in reports[0]
    assert "watermark" not in json.loads(Image.open(p).text["ldmkit"])


def test_an_all_black_mask_writes_the_input_without_record_or_mark(tmp_path, tiny_ldm):
    """With an all-black mask --watermark changed 2,370 of 4,096 pixels of an output said to be the input."""
    image, arr = _picture(tmp_path)
    mask, _ = _mask(tmp_path, 64, (0, 0, 0, 0))
    finish, _ = _marking([])
    with pytest.warns(UserWarning, match="written unchanged, with no generation record"):
        [p] = inpaint_to_file(tiny_ldm, REQ, image, mask, tmp_path / "o.png", finish=finish, progress=False)
    assert np.array_equal(np.asarray(load_image(p, 1)), arr)
    assert "ldmkit" not in Image.open(p).text


def test_outpaint_watermark_keeps_the_original_pixels(tmp_path, tiny_ldm):
    image, arr = _picture(tmp_path, side=32)
    reports = []
    finish, tag = _marking(reports)
    [p] = outpaint_to_file(tiny_ldm, REQ, image, Border.of(16), tmp_path / "o.png", InpaintOptions(), False, finish)
    got = np.asarray(load_image(p, 1))
    assert got.shape == (64, 64) and (got[16:48, 16:48] == arr).all()
    assert watermark.read(got).tag == tag or "not watermarked" in reports[0]


def test_the_record_names_the_model_and_its_hash_never_a_local_path(tmp_path, tiny_ldm):
    """Every PNG embedded the absolute path of the model file (a user's name and folders)."""
    image, _ = _picture(tmp_path)
    mask, _ = _mask(tmp_path, 64, (12, 52, 8, 56))
    written = generate_to_file(tiny_ldm, SampleRequest(n=2, steps=1), tmp_path / "g.png", progress=False)
    written += inpaint_to_file(tiny_ldm, REQ, image, mask, tmp_path / "i.png", progress=False)
    for p in written:
        text = Image.open(p).text["ldmkit"]
        record = json.loads(text)
        assert record["model"] == tiny_ldm.parent.name and record["weights_sha256"] == file_sha256(tiny_ldm)
        assert "checkpoint" not in record and str(tiny_ldm.parent) not in text
