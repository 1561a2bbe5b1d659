"""Inversion and prompt editing on the tiny models: the inverted walk re-sampled under its own condition gives back
the autoencoder's round trip, another condition changes it, the layout replay and the noise file."""

import pytest
import torch

from ldmkit.checkpoint import save
from ldmkit.errors import CheckpointError, InputError
from ldmkit.ldm import LatentDiffusion
from ldmkit.pipelines.inversion import invert, load_inversion, resample, save_inversion


def square(size: int = 16) -> torch.Tensor:
    x = -torch.ones(1, 1, size, size)
    x[..., 3:9, 4:11] = 1
    return x


@pytest.fixture(scope="module")
def text_ldm(tiny_text_ldm):
    return LatentDiffusion.load(tiny_text_ldm)


@pytest.fixture(scope="module")
def inverted(text_ldm):
    return invert(text_ldm, square(), "a square", steps=6)


def test_resampling_under_the_same_prompt_gives_the_round_trip(text_ldm, inverted):
    round_trip = text_ldm.decode(text_ldm.encode(square()))
    assert inverted.walk.shape[0] == 7
    torch.testing.assert_close(inverted.walk[-1], text_ldm.encode(square()))  # the walk starts at the clean latents
    same = resample(text_ldm, inverted, "a square")
    err = float((same - round_trip).abs().max())
    assert err < 1e-3
    other = resample(text_ldm, inverted, "a red circle", cfg=3.0)
    assert not torch.equal(other, same)  # (an untrained model barely listens to its prompt: no size to assert)


def test_keeping_the_layout_under_the_same_prompt_is_the_reconstruction(text_ldm, inverted):
    """Replaying the source's own attention under its own prompt changes nothing. That a replayed map moves an edit
    is checked against a hand-computed attention in tests/nn/test_attention_replay.py: on this untrained model two
    prompts give nearly the same context, so an edit's maps equal the source's to 2e-6 even with sharpened
    attention, and nothing an edit here could show."""
    plain = resample(text_ldm, inverted, "a square")
    kept = resample(text_ldm, inverted, "a square", keep_layout=inverted.steps)  # replays its own attention
    torch.testing.assert_close(kept, plain, atol=1e-4, rtol=0)
    with pytest.raises(InputError, match="--keep-layout 7"):
        resample(text_ldm, inverted, "x", keep_layout=7)


def test_noise_file_round_trip_and_other_kinds_refused(text_ldm, inverted, tmp_path):
    path = save_inversion(tmp_path / "noise.safetensors", inverted, {"model": "tiny"})
    back, meta = load_inversion(path)
    assert back.source == "a square" and back.size == (16, 16) and meta["model"] == "tiny"
    torch.testing.assert_close(back.noise, inverted.noise)
    assert torch.equal(resample(text_ldm, back, "a square"), resample(text_ldm, inverted, "a square"))
    other = save(tmp_path / "other.safetensors", {"x": torch.zeros(1)}, "inversion", {})
    with pytest.raises(CheckpointError, match="ldmkit invert"):
        load_inversion(other)


def test_class_models_take_a_class_number_or_name_and_odd_sizes_come_back_whole(tiny_ldm):
    ldm = LatentDiffusion.load(tiny_ldm)
    image = square(18)[..., :18, :14]  # not a multiple of the model's factor: padded, then cropped back
    by_name = invert(ldm, image, "top-left", steps=3)
    by_number = invert(ldm, image, "0", steps=3)
    assert torch.equal(by_name.walk, by_number.walk)
    assert resample(ldm, by_name, "bottom-right").shape == (1, 1, 18, 14)
    with pytest.raises(InputError, match="unknown class name"):
        invert(ldm, image, "a square", steps=3)
