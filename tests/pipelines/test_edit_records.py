"""An edit's generation record names its input image and mask by file name and SHA-256, never by the path the user
gave (an absolute path names the user and their folders); the output rule still refuses to write over an input,
which it learns from the command's arguments, not from the record."""

import json

import numpy as np
import pytest
from PIL import Image

from ldmkit.checkpoint import file_sha256
from ldmkit.errors import InputError
from ldmkit.pipelines.img2img import img2img_to_file
from ldmkit.pipelines.inpaint import inpaint_to_file
from ldmkit.pipelines.outpaint import Border, outpaint_to_file
from ldmkit.pipelines.request import SampleRequest

REQ = SampleRequest(n=1, labels=[1], steps=1, sampler="euler", seed=3)


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "home" / "someone" / "pictures"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    image, mask = folder / "cat.png", folder / "cat-mask.png"
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(image)
    hole = np.zeros((16, 16), np.uint8)
    hole[4:12, 4:12] = 255
    Image.fromarray(hole).save(mask)
    return image.absolute(), mask.absolute()


def _record(path) -> tuple[dict, str]:
    with Image.open(path) as im:
        text = im.text["ldmkit"]
    return json.loads(text), text


def test_edit_records_hold_the_inputs_names_and_hashes_not_their_paths(tmp_path, tiny_ldm, inputs):
    image, mask = inputs
    written = {
        "img2img": img2img_to_file(tiny_ldm, image, REQ, 0.5, tmp_path / "a.png", progress=False),
        "inpaint": inpaint_to_file(tiny_ldm, REQ, image, mask, tmp_path / "b.png", progress=False),
        "outpaint": outpaint_to_file(tiny_ldm, REQ, image, Border.of(8), tmp_path / "c.png", progress=False),
    }
    for command, [path] in written.items():
        record, text = _record(path)
        assert record["image"] == {"name": "cat.png", "sha256": file_sha256(image)}, command
        assert str(image.parent) not in text and "someone" not in text, command
    record, _ = _record(written["inpaint"][0])
    assert record["mask"] == {"name": "cat-mask.png", "sha256": file_sha256(mask)}


def test_a_library_edit_still_refuses_to_write_over_its_inputs(tiny_ldm, inputs):
    image, mask = inputs
    before = image.read_bytes(), mask.read_bytes()
    with pytest.raises(InputError, match="is an input of this command"):
        img2img_to_file(tiny_ldm, image, REQ, 0.5, image, progress=False)
    with pytest.raises(InputError, match="is an input of this command"):
        inpaint_to_file(tiny_ldm, REQ, image, mask, mask, progress=False)
    with pytest.raises(InputError, match="is an input of this command"):
        outpaint_to_file(tiny_ldm, REQ, image, Border.of(8), image, progress=False)
    assert (image.read_bytes(), mask.read_bytes()) == before
