import dataclasses
import math
import typing
from pathlib import Path

import pytest

from ldmkit import config as config_module
from ldmkit.config import (
    PRESET_DIR,
    AutoencoderConfig,
    AutoencoderLossConfig,
    AutoencoderRun,
    DataConfig,
    DenoiserRun,
    DiffusionConfig,
    TrainConfig,
    UNetConfig,
    from_dict,
    load_run,
    parse_overrides,
    to_dict,
)
from ldmkit.errors import ConfigError


def test_round_trip_every_preset():
    for path in PRESET_DIR.glob("*.toml"):
        cls = AutoencoderRun if "autoencoder" in path.stem else DenoiserRun
        run = load_run(cls, str(path))
        assert from_dict(cls, to_dict(run)) == run


def test_overrides_are_coerced_by_type():
    run = load_run(
        DenoiserRun,
        None,
        ["train.steps=7", "unet.channel_mult=1,2", "train.lr=3e-4", "data.flip=true", "unet.attention_levels="],
    )
    assert run.train.steps == 7 and run.unet.channel_mult == (1, 2) and run.train.lr == 3e-4
    assert run.data.flip is True and run.unet.attention_levels == ()


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.stepz=3", "unknown setting train.stepz"),
        ("train.steps=abc", "train.steps: 'abc' is not a valid int"),
        ("data.flip=maybe", "not a boolean"),
        ("steps", "must look like section.key=value"),
    ],
)
def test_bad_overrides_name_the_setting(item, message):
    with pytest.raises(ValueError, match=message):
        load_run(DenoiserRun, None, [item])


def test_unknown_preset_lists_known_ones():
    with pytest.raises(FileNotFoundError, match="demo-denoiser"):
        load_run(DenoiserRun, "no-such-preset")


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=2"]) == {"a": {"b": {"c": "1"}, "d": "2"}}


# --- validation -------------------------------------------------------------------------------------------------

COMPONENTS = (AutoencoderConfig, AutoencoderLossConfig, UNetConfig, DiffusionConfig, DataConfig, TrainConfig)
RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.mark.parametrize(
    "cls, item, message",
    [
        (DenoiserRun, "train.steps=0", r"train\.steps = 0 .*an integer >= 1"),
        (DenoiserRun, "train.steps=-5", r"train\.steps = -5 .*an integer >= 1"),
        (DenoiserRun, "train.grad_accum=0", r"train\.grad_accum = 0 .*an integer >= 1"),
        (DenoiserRun, "train.log_every=0", r"train\.log_every = 0 .*an integer >= 1"),
        (DenoiserRun, "train.batch_size=0", r"train\.batch_size = 0 .*an integer >= 1"),
        (DenoiserRun, "train.ema_decay=1", r"train\.ema_decay = 1\.0 .*a number in \[0, 1\)"),
        (DenoiserRun, "train.ema_decay=-0.5", r"train\.ema_decay = -0\.5 .*a number in \[0, 1\)"),
        (DenoiserRun, "train.lr=0", r"train\.lr = 0\.0 .*a number > 0"),
        (DenoiserRun, "train.lr=nan", r"train\.lr = nan is not a finite number"),
        (DenoiserRun, "train.grad_clip=inf", r"train\.grad_clip = inf is not a finite number"),
        (DenoiserRun, "train.warmup_steps=-1", r"train\.warmup_steps = -1 .*an integer >= 0"),
        (DenoiserRun, "train.adam_betas=0.9,1.5", r"train\.adam_betas = \(0\.9, 1\.5\) .*\[0, 1\)"),
        (DenoiserRun, "train.adam_betas=0.9", r"train\.adam_betas = \(0\.9,\) .*two values"),
        (DenoiserRun, "train.seed=-1", r"train\.seed = -1 "),
        (DenoiserRun, "data.caption_dropout=1.5", r"data\.caption_dropout = 1\.5 .*\[0, 1\]"),
        (DenoiserRun, "data.resolution=0", r"data\.resolution = 0 .*an integer >= 1"),
        (DenoiserRun, "data.channels=2", r"data\.channels = 2 .*1 or 3"),
        (DenoiserRun, "data.holdout=-3", r"data\.holdout = -3 .*an integer >= 0"),
        (DenoiserRun, "unet.dropout=1", r"unet\.dropout = 1\.0 .*\[0, 1\)"),
        (DenoiserRun, "unet.channel_mult=1,0", r"unet\.channel_mult = \(1, 0\) .*integer >= 1"),
        (DenoiserRun, "unet.channel_mult=", r"unet\.channel_mult = \(\) .*at least one"),
        (DenoiserRun, "unet.num_heads=0", r"unet\.num_heads = \(0,\) .*integer >= 1"),
        (DenoiserRun, "unet.attention_levels=3", r"unet\.attention_levels = \(3,\) .*levels 0 to 2"),
        (DenoiserRun, "unet.norm_eps=0", r"unet\.norm_eps = 0\.0 .*a number > 0"),
        (DenoiserRun, "diffusion.num_timesteps=0", r"diffusion\.num_timesteps = 0 .*an integer >= 1"),
        (DenoiserRun, "diffusion.beta_end=2", r"diffusion\.beta_end = 2\.0 .*\(0, 1\)"),
        (DenoiserRun, "diffusion.sigma_min=-1", r"diffusion\.sigma_min = -1\.0 .*a number > 0"),
        (DenoiserRun, "diffusion.sigma_max=0.001", r"diffusion\.sigma_max = 0\.001 .*larger than diffusion\.sigma_min"),
        (DenoiserRun, "diffusion.p_std=0", r"diffusion\.p_std = 0\.0 .*a number > 0"),
        (AutoencoderRun, "model.latent_channels=0", r"model\.latent_channels = 0 .*an integer >= 1"),
        (AutoencoderRun, "model.scaling_factor=-1", r"model\.scaling_factor = -1\.0 .*a number > 0"),
        (AutoencoderRun, "model.shift_factor=inf", r"model\.shift_factor = inf is not a finite number"),
        (AutoencoderRun, "loss.kl_weight=-1", r"loss\.kl_weight = -1\.0 .*a number >= 0"),
        (AutoencoderRun, "loss.disc_start=-1", r"loss\.disc_start = -1 .*an integer >= 0"),
        (AutoencoderRun, "loss.disc_layers=0", r"loss\.disc_layers = 0 .*an integer >= 1"),
        (AutoencoderRun, "train.batch_size=10", r"train\.batch_size = 10 .*multiple of train\.grad_accum"),
    ],
)
def test_out_of_range_numbers_name_the_key_the_value_and_the_range(cls, item, message):
    overrides = [item] + (["train.grad_accum=3"] if item == "train.batch_size=10" else [])
    with pytest.raises(ConfigError, match=message):
        load_run(cls, None, overrides)


def test_every_numeric_setting_has_a_range():
    extra = (config_module.DiTConfig, config_module.UpscaleConfig, config_module.ServeConfig, config_module.ServeLimits)
    for cls in COMPONENTS + extra:
        hints = typing.get_type_hints(cls)
        numeric = {
            f.name
            for f in dataclasses.fields(cls)
            if hints[f.name] in (int, float) or typing.get_args(hints[f.name])[:1] in ((int,), (float,))
        }
        bounds = config_module.bounds(cls)  # and settings of other kinds whose values are a list of choices
        assert numeric == {k for k, b in bounds.items() if k in numeric or not b.choices}, cls.__name__


def test_defaults_presets_and_recipes_are_valid():
    for cls in COMPONENTS + (AutoencoderRun, DenoiserRun):
        config_module.validate(cls())
    for path in [*PRESET_DIR.glob("*.toml"), *RECIPES.glob("*/*.toml")]:
        load_run(AutoencoderRun if "autoencoder" in path.stem else DenoiserRun, str(path))


def test_validate_checks_nested_runs_built_in_code():
    run = DenoiserRun(train=TrainConfig(steps=0))
    with pytest.raises(ConfigError, match=r"train\.steps = 0"):
        config_module.validate(run)
    assert math.isfinite(DenoiserRun().train.lr)


def test_malformed_toml_names_the_file(tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text("[train]\nsteps = = 3\n")
    with pytest.raises(ConfigError, match=r"broken\.toml is not valid TOML .*line 2"):
        load_run(DenoiserRun, str(bad))
    bad.write_bytes(b'[data]\ndataset = "gr\xfcn"\n')
    with pytest.raises(ConfigError, match=r"broken\.toml is not UTF-8 text"):
        load_run(DenoiserRun, str(bad))


def test_num_workers_is_back_and_files_from_every_era_load(monkeypatch):
    assert TrainConfig().num_workers == -1  # one loading process per core for image folders
    old = to_dict(DenoiserRun())
    old["train"]["num_workers"] = 0  # files written before it was retired carry the old default
    assert from_dict(DenoiserRun, old).train.num_workers == 0
    del old["train"]["num_workers"]  # and files written while it was retired lack it
    assert from_dict(DenoiserRun, old) == DenoiserRun()
    with pytest.raises(ConfigError, match=r"train.num_workers = -2 .*\[-1, 256\]"):
        from_dict(TrainConfig, {"num_workers": -2}, "train")
    # a setting retired again later is still accepted, and ignored
    monkeypatch.setitem(config_module.RETIRED, TrainConfig, {"old_knob"})
    assert from_dict(TrainConfig, {"old_knob": 3}) == TrainConfig()
