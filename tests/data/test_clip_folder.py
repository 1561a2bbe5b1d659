"""A folder of clips: video files, GIFs and frame folders sampled at a chosen fps and length, captions from
metadata.jsonl, a broken clip skipped with its name, and a long clip never decoded past the frames it gives."""

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.config import DataConfig
from ldmkit.data import build_dataset
from ldmkit.data.clip_folder import ClipFolder
from ldmkit.data.clips import _sample, write_clip


def _square_clip(n: int, side: int = 16) -> list[Image.Image]:
    """n frames of a white square moving one pixel right per frame on black."""
    frames = []
    for k in range(n):
        a = np.zeros((side, side), dtype=np.uint8)
        a[4:10, k : k + 6] = 255
        frames.append(Image.fromarray(a).convert("RGB"))
    return frames


def _left_edge(x: torch.Tensor) -> int:
    """The column where the square starts in a frame (1, H, W) in [-1, 1]."""
    return int(np.argmax(x[0, 6].numpy() > 0))


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "clips"
    root.mkdir()
    write_clip(_square_clip(8), root / "a.gif", fps=4)
    (root / "b").mkdir()
    for k, f in enumerate(_square_clip(3)):
        f.save(root / "b" / f"{k:03d}.png")
    (root / "broken.gif").write_bytes(b"GIF89a not really")
    rows = [{"file_name": "a.gif", "text": "a square moving right"}, {"file_name": "b", "text": "three frames"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def test_clips_are_sampled_at_the_asked_rate_and_length_with_their_captions(folder):
    cfg = DataConfig(dataset=str(folder), resolution=16, channels=1, frames=4, fps=2)
    ds = build_dataset(cfg)
    assert isinstance(ds, ClipFolder) and [f.as_posix() for f in ds.files] == ["a.gif", "b", "broken.gif"]
    a = ds[0]
    assert a["image"].shape == (4, 1, 16, 16) and a["caption"] == "a square moving right"
    assert [_left_edge(f) for f in a["image"]] == [0, 2, 4, 6]  # a 4 fps clip at 2 fps: every other frame
    b = ds[1]
    assert b["caption"] == "three frames"
    assert [_left_edge(f) for f in b["image"]] == [0, 1, 2, 2]  # a frame folder's frames, the last one held
    assert ds.fingerprint() == ClipFolder(cfg).fingerprint()


def test_a_broken_clip_is_skipped_with_its_name(folder):
    ds = ClipFolder(DataConfig(dataset=str(folder), resolution=16, channels=1, frames=2, fps=4))
    with pytest.warns(UserWarning, match=r"skipping clip .*broken\.gif: .*another clip is used in its place"):
        item = ds[2]
    assert item["caption"] == "a square moving right"  # the next readable clip, from the start again


def test_mp4_clips_decode_through_pyav(tmp_path):
    pytest.importorskip("av")
    root = tmp_path / "v"
    write_clip(_square_clip(10), root / "m.mp4", fps=10)
    (root / "truncated.mp4").write_bytes((root / "m.mp4").read_bytes()[:200])
    ds = ClipFolder(DataConfig(dataset=str(root), resolution=16, channels=1, frames=3, fps=5))
    assert [_left_edge(f) for f in ds[0]["image"]] == [0, 2, 4]
    with pytest.warns(UserWarning, match=r"skipping clip .*truncated\.mp4"):
        assert ds[1]["index"] == 1


def test_a_long_clip_is_read_only_as_far_as_its_frames_go():
    pulled = []

    def endless():  # a two-hour clip at 30 fps, as far as a reader can tell
        for k in itertools.count():
            pulled.append(k)
            yield k / 30, Image.new("L", (4, 4), k % 256)

    frames = _sample(endless(), 8, 8.0)
    assert len(frames) == 8 and frames[1].getpixel((0, 0)) == 3  # t = 1/8 s: the frame shown at 0.1 s
    assert len(pulled) < 40  # one second of it, not two hours
