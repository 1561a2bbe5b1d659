import pytest

from ldmkit.config import (AutoencoderRun, DenoiserRun, PRESET_DIR, from_dict, load_run, parse_overrides,
                           to_dict)


def test_round_trip_every_preset():
    for path in PRESET_DIR.glob("*.toml"):
        cls = AutoencoderRun if "autoencoder" in path.stem else DenoiserRun
        run = load_run(cls, str(path))
        assert from_dict(cls, to_dict(run)) == run


def test_overrides_are_coerced_by_type():
    run = load_run(DenoiserRun, None, ["train.steps=7", "unet.channel_mult=1,2", "train.lr=3e-4",
                                       "data.flip=true", "unet.attention_levels="])
    assert run.train.steps == 7 and run.unet.channel_mult == (1, 2) and run.train.lr == 3e-4
    assert run.data.flip is True and run.unet.attention_levels == ()


@pytest.mark.parametrize("item, message", [
    ("train.stepz=3", "unknown setting train.stepz"),
    ("train.steps=abc", "train.steps: 'abc' is not a valid int"),
    ("data.flip=maybe", "not a boolean"),
    ("steps", "must look like section.key=value"),
])
def test_bad_overrides_name_the_setting(item, message):
    with pytest.raises(ValueError, match=message):
        load_run(DenoiserRun, None, [item])


def test_unknown_preset_lists_known_ones():
    with pytest.raises(FileNotFoundError, match="demo-denoiser"):
        load_run(DenoiserRun, "no-such-preset")


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=2"]) == {"a": {"b": {"c": "1"}, "d": "2"}}
