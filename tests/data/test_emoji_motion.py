"""emoji-motion: clips the same from the same seed whatever the loading, captions that say the motion measured on the
frames (the emoji's centroid, area and orientation), the latent cache and a video training step, and the settings it
refuses; data.motions and the frames check shared with moving-fashion."""

import importlib.util
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.config import DataConfig, DenoiserRun, TrainConfig
from ldmkit.data import build_dataset, emoji
from ldmkit.data.emoji_motion import MOTIONS, PANS, EmojiMotion
from ldmkit.data.latents import encode_dataset
from ldmkit.data.motion import with_article
from ldmkit.data.moving_fashion import MOTIONS as FASHION_MOTIONS
from ldmkit.data.moving_fashion import MovingFashion
from ldmkit.errors import InputError
from ldmkit.ldm import LdmFile
from ldmkit.training import runs

pytestmark = [
    pytest.mark.skipif(not emoji.NOTO_FONT.is_file(), reason="needs Debian's fonts-noto-color-emoji"),
    pytest.mark.skipif(importlib.util.find_spec("emoji") is None, reason="needs PyPI emoji"),
]
CLIPS = DataConfig(dataset="emoji-motion", resolution=16, channels=1, limit=8, frames=4, holdout=0)


def _alpha(ds: EmojiMotion, i: int) -> np.ndarray:
    """(F, R, R) alpha in 0..1 of clip i: where the emoji is."""
    return np.stack([np.asarray(f.getchannel("A"), np.float64) / 255 for f in ds.layers(ds.spec(i))])


def _centroid(a: np.ndarray) -> np.ndarray:
    """(x, y) of an alpha map's centre of mass, in pixels."""
    ys, xs = np.indices(a.shape)
    return np.array([(xs * a).sum(), (ys * a).sum()]) / a.sum()


def _turn(a: Image.Image, b: Image.Image, centre) -> int:
    """The angle in degrees, clockwise on the screen, that best turns frame a into frame b about `centre`
    (Pillow's rotate turns anticlockwise)."""
    target = np.asarray(b, np.float64)
    errors = {
        d: np.abs(np.asarray(a.rotate(-d, Image.Resampling.BICUBIC, center=tuple(centre)), np.float64) - target).sum()
        for d in range(-30, 31)
    }
    return min(errors, key=errors.get)


def test_clips_are_the_same_from_the_seed_whatever_the_order_or_the_loading_processes():
    a, b = EmojiMotion(CLIPS), build_dataset(CLIPS)
    assert len(a) == 8 and a.fingerprint() == b.fingerprint() and a.class_names == []
    backwards = [b[i] for i in reversed(range(len(b)))][::-1]  # clip i made on its own, after the later ones
    for i, (x, y) in enumerate(zip((a[i] for i in range(len(a))), backwards)):
        assert x["image"].shape == (4, 1, 16, 16) and torch.equal(x["image"], y["image"])
        assert x["image"].min() >= -1 and x["image"].max() <= 1 and (x["image"] < 0.5).any()  # an emoji on white
        assert x["label"] == -1 and x["index"] == i and x["caption"] == a.captions[i] == y["caption"]
        assert x["caption"].startswith(("a ", "an ")) and x["caption"].endswith(MOTIONS)
    loader = torch.utils.data.DataLoader(b, batch_size=3, num_workers=2)
    loaded = torch.cat([batch["image"] for batch in loader])
    assert torch.equal(loaded, torch.stack([a[i]["image"] for i in range(len(a))]))
    rgb = EmojiMotion(replace(CLIPS, channels=3, resolution=64, frames=16, limit=2))
    assert rgb[1]["image"].shape == (16, 3, 64, 64) and rgb.fingerprint() != a.fingerprint()
    assert len(rgb.pool) > 1000 and "red apple" in rgb.names and "rocket" in rgb.names
    assert EmojiMotion(replace(CLIPS, split="test")).captions != a.captions


@pytest.mark.parametrize("motion", MOTIONS)
def test_the_caption_says_the_motion_measured_on_the_frames(motion):
    ds = EmojiMotion(DataConfig(dataset="emoji-motion", resolution=64, frames=16, limit=3, motions=(motion,)))
    for i in range(len(ds)):
        item, alpha = ds[i], _alpha(ds, i)
        (track,) = ds.spec(i)
        assert track.name == emoji.name_of(track.emoji) and item["caption"] == f"{with_article(track.name)} {motion}"
        # the training frames are these layers on white: the emoji is darker than white where its alpha is
        grey = (item["image"] + 1).mul(127.5).mean(1).numpy()  # (F, R, R)
        assert np.all(grey[alpha == 0] > 254)
        centres = np.stack([_centroid(a) for a in alpha])  # (F, 2)
        area = alpha.sum((1, 2))
        steps = np.diff(centres, axis=0)
        if motion in PANS:
            d = np.array(PANS[motion])
            along, across = steps @ d, steps @ d[::-1]
            assert np.all(along > 0.3) and along.sum() > 10 and abs(across.sum()) < 0.5, (motion, centres)
        else:  # zooms and rotations keep the emoji where it is
            assert np.abs(centres - centres.mean(0)).max() < 4, (motion, centres)
        if motion.startswith("zooming"):
            growth = area[1:] / area[:-1]
            assert np.all(growth > 1.02 if motion == "zooming in" else growth < 1 / 1.02), (motion, area)
            assert max(area[0], area[-1]) > 3 * min(area[0], area[-1])
        elif motion.startswith("rotating"):
            assert area.max() < 1.1 * area.min()
            frames = [Image.fromarray(np.uint8(a * 255)) for a in alpha]
            turns = [_turn(a, b, c) for a, b, c in zip(frames, frames[1:], centres[1:])]
            clockwise = sum(turns) if motion == "rotating clockwise" else -sum(turns)
            assert clockwise > 45, (motion, turns)


def test_clips_go_through_the_latent_cache_and_train_a_video_model(tmp_path, tiny_ae, tiny_text_ldm, monkeypatch):
    from ldmkit.autoencoder.files import load_autoencoder

    ds = build_dataset(CLIPS)
    ae, _ = load_autoencoder(tiny_ae, "cpu")
    first = encode_dataset(ae, tiny_ae, ds, CLIPS, "cpu", batch=4, progress=False)
    assert first.mean.shape == (8, 4, 2, 8, 8) and first.captions == ds.captions

    def no_render(self, tracks):
        raise AssertionError("rendered again instead of reading the latent cache")

    monkeypatch.setattr(EmojiMotion, "render", no_render)
    again = encode_dataset(ae, tiny_ae, build_dataset(CLIPS), CLIPS, "cpu", batch=4, progress=False)
    assert torch.equal(again.mean, first.mean) and again.captions == first.captions
    monkeypatch.undo()

    train = TrainConfig(steps=1, batch_size=4, warmup_steps=1, log_every=1, ckpt_every=1, sample_every=0)
    train = replace(train, ema_decay=0.0, trainable="temporal")
    run = DenoiserRun(task="video", init=str(tiny_text_ldm), data=CLIPS, train=train)
    res = runs.train_denoiser(run, tmp_path / "run", progress=False)
    f = LdmFile.read(res["checkpoint"])
    assert f.run.task == "video" and f.run.data.dataset == "emoji-motion" and f.run.unet.temporal_heads > 0
    assert 0 < res["trained_parameters"] < res["parameters"]


def test_bad_settings_are_refused_in_one_line():
    with pytest.raises(InputError, match=r"data.motions names 'spinning', which emoji-motion does not draw; use some"):
        EmojiMotion(replace(CLIPS, motions=("zooming in", "spinning")))
    with pytest.raises(InputError, match=r"data.motions names 'zooming in', which moving-fashion does not draw"):
        MovingFashion(DataConfig(dataset="moving-fashion", resolution=16, limit=2, motions=("zooming in",)))
    for ds in ("emoji-motion", "moving-fashion"):
        with pytest.raises(InputError, match=r"data.frames=1: an? \S+ clip needs 2 frames or more") as e:
            build_dataset(DataConfig(dataset=ds, resolution=16, limit=2, frames=1))
        assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="data.resolution=8 is too small for emoji-motion"):
        EmojiMotion(replace(CLIPS, resolution=8))


def test_moving_fashion_draws_only_the_motions_asked_for_and_the_same_clips_by_default():
    cfg = DataConfig(dataset="moving-fashion", resolution=16, channels=1, limit=12, frames=4)
    every, listed = MovingFashion(cfg), MovingFashion(replace(cfg, motions=FASHION_MOTIONS))
    assert every.captions == listed.captions and len({t.motion for i in range(12) for t in every.spec(i)}) > 3
    growing = MovingFashion(replace(cfg, motions=("growing",)))
    assert all(t.motion == "growing" for i in range(len(growing)) for t in growing.spec(i))
    assert growing.fingerprint() != every.fingerprint()
    assert MovingFashion(replace(cfg, motions=(" growing", "growing"))).motions == ("growing",)  # as `--set` gives
