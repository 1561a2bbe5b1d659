"""A grid of several generated images keeps each image's watermark readable: the grid's record says where each tile
lies (its box, index and seed), and `ldmkit provenance` reads the mark tile by tile, or finds the tiles from the
grid's white gutters when the record was stripped."""

import json

import numpy as np
import pytest
from PIL import Image

from ldmkit.cli import main
from ldmkit.data.images import grid_layout, grid_layouts
from ldmkit.governance import watermark
from ldmkit.governance.provenance import inspect_image
from tests.factory import save_tiny_ldm, tiny_denoiser_run, tiny_unet


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def model32(tmp_path_factory, tiny_ae):
    """An untrained class-conditional model (2 classes) drawing 32x32 images: big enough to carry the mark."""
    unet = tiny_unet(
        in_channels=2, out_channels=2, channel_mult=(1, 2), mid_attention=True, num_heads=(2,), num_classes=2
    )
    run = tiny_denoiser_run(tiny_ae, unet=unet, data=dict(resolution=32), class_names=("a", "b"))
    return save_tiny_ldm(tmp_path_factory.mktemp("ldm32") / "model.safetensors", run)


def _generate(model, out, *more):
    argv = ["generate", "--model", str(model), "--label", "1", "--steps", "1", "--quiet", "--out", str(out), *more]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def marked_grid(tmp_path_factory, model32):
    """A grid of 3 images of 32x32 generated with --watermark."""
    return _generate(model32, tmp_path_factory.mktemp("grid") / "grid.png", "--n", "3", "--watermark")


def test_a_watermarked_grid_of_three_is_read_tile_by_tile(capsys, marked_grid):
    """provenance on a --watermark grid said "watermark: none found"."""
    with Image.open(marked_grid) as im:
        record, size = json.loads(im.text["ldmkit"]), im.size
    tag = record["request_id"][:12]
    code, printed, _ = run(capsys, "provenance", str(marked_grid))
    assert "watermark: none found" not in printed and f"watermark: request {tag}..." in printed
    for i, t in enumerate(record["tiles"]):
        box = tuple(t["box"][k] for k in ("left", "top", "right", "bottom"))
        assert f"tile {i}, seed {t['seed']} at {box}: watermark request {tag}..." in printed
    code, printed, _ = run(capsys, "provenance", str(marked_grid), "--json")
    report = json.loads(printed)
    assert code == 0 and report["watermark"] == tag and report["consistent"] is True
    assert [t["watermark"] for t in report["tiles"]] == [tag] * 3
    # the record says which image and seed each tile is, and where it lies
    assert [t["index"] for t in record["tiles"]] == [0, 1, 2]
    assert [t["seed"] for t in record["tiles"]] == [record["seed"] + i for i in range(3)]
    boxes = [[t["box"][k] for k in ("left", "top", "right", "bottom")] for t in record["tiles"]]
    assert boxes == [[2, 2, 34, 34], [36, 2, 68, 34], [70, 2, 102, 34]]
    assert size == grid_layout(3, 32, 32, labels=["x"] * 3).size == (104, 48)


def test_a_grid_whose_record_was_stripped_is_searched_tile_by_tile(tmp_path, marked_grid):
    with Image.open(marked_grid) as im:
        tag = json.loads(im.text["ldmkit"])["request_id"][:12]
        stripped = tmp_path / "stripped.png"
        im.convert("RGB").save(stripped)  # no text chunks
    found = inspect_image(stripped)
    assert found.record is None and found.tag == tag
    assert [(t["index"], t["seed"], t["watermark"]) for t in found.tiles] == [(i, None, tag) for i in range(3)]


def test_an_unmarked_grid_reports_no_mark_in_any_tile(tmp_path, model32):
    found = inspect_image(_generate(model32, tmp_path / "plain.png", "--n", "2"))
    assert found.tag is None and [t["watermark"] for t in found.tiles] == [None, None]


def test_grid_layouts_find_the_layout_save_grid_drew():
    drawn = grid_layout(5, 40, 30, nrow=3, labels=["a"] * 5)
    width, height = drawn.size
    pixels = np.full((height, width), 255, np.uint8)
    for i in range(5):
        left, top, right, bottom = drawn.box(i)
        pixels[top:bottom, left:right] = 90
    fitting = [g for g in grid_layouts(width, height, least_side=watermark.MIN_SIDE) if g.gutters_blank(pixels)]
    assert (drawn.nrow, drawn.h, drawn.w, drawn.label_h) in [(g.nrow, g.h, g.w, g.label_h) for g in fitting]
