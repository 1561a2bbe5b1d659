"""`ldmkit train --init MODEL`: a run that starts from an existing model, its architecture and weights."""

import pytest
import torch

from ldmkit.checkpoint import file_sha256
from ldmkit.cli import main
from ldmkit.config import DataConfig, DenoiserRun, TrainConfig, UNetConfig
from ldmkit.errors import InputError
from ldmkit.ldm import LdmFile
from ldmkit.training import runs


@pytest.fixture
def data(monkeypatch, blobs):
    monkeypatch.setattr(runs, "_datasets", lambda cfg, holdout: (blobs, None))
    return blobs


def fine_tune(parent, out, steps=1, **train_kw):
    kw = dict(steps=steps, batch_size=8, lr=1e-3, warmup_steps=1, log_every=1, ckpt_every=1, ema_decay=0.0) | train_kw
    run = DenoiserRun(init=str(parent), data=DataConfig(holdout=0), train=TrainConfig(**kw))
    return runs.train_denoiser(run, out, progress=False)


def changed(a: dict, b: dict) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_one_step_from_a_model_changes_only_the_backbone_and_records_the_parent(tmp_path, tiny_ldm, data):
    fine_tune(tiny_ldm, tmp_path / "ft")
    parent, child = LdmFile.read(tiny_ldm), LdmFile.read(tmp_path / "ft" / "model.safetensors")
    assert changed(parent.unet, child.unet), "the backbone trained"
    assert not changed(parent.autoencoder, child.autoencoder), "the autoencoder stays frozen"
    assert child.run.unet == parent.run.unet and child.run.class_names == parent.run.class_names
    assert child.run.init == str(tiny_ldm) and child.run.init_sha256 == file_sha256(tiny_ldm)


def test_a_text_encoder_stays_frozen_unless_the_run_names_it(tmp_path, tiny_text_ldm, data):
    parent = LdmFile.read(tiny_text_ldm)
    fine_tune(tiny_text_ldm, tmp_path / "frozen")
    frozen = LdmFile.read(tmp_path / "frozen" / "model.safetensors")
    assert changed(parent.unet, frozen.unet) and not changed(parent.text, frozen.text)
    fine_tune(tiny_text_ldm, tmp_path / "both", trainable="backbone+text")
    both = LdmFile.read(tmp_path / "both" / "model.safetensors")
    assert changed(parent.text, both.text), "train.trainable=backbone+text trains the text encoder too"


def test_settings_that_contradict_the_model_are_refused_in_one_line(tmp_path, tiny_ldm, data):
    run = DenoiserRun(init=str(tiny_ldm), unet=UNetConfig(model_channels=32), train=TrainConfig(steps=1))
    with pytest.raises(InputError, match=r"drop unet.model_channels=32 \(the model has 16\)") as err:
        runs.train_denoiser(run, tmp_path / "x", progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="brings its own autoencoder"):
        runs.train_denoiser(DenoiserRun(init=str(tiny_ldm), autoencoder="a.safetensors"), tmp_path / "y")
    with pytest.raises(InputError, match="unknown model 'nope'"):
        runs.train_denoiser(DenoiserRun(init="nope"), tmp_path / "z")


def test_a_started_run_resumes_exactly(tmp_path, tiny_ldm, data):
    fine_tune(tiny_ldm, tmp_path / "whole", steps=2)
    run = DenoiserRun(
        init=str(tiny_ldm),
        data=DataConfig(holdout=0),
        train=TrainConfig(steps=2, batch_size=8, lr=1e-3, warmup_steps=1, log_every=1, ckpt_every=1, ema_decay=0.0),
    )
    runs.train_denoiser(run, tmp_path / "split", progress=False, stop_after=1)
    runs.train_denoiser(run, tmp_path / "split", progress=False, resume=True)
    whole = LdmFile.read(tmp_path / "whole" / "model.safetensors").unet
    split = LdmFile.read(tmp_path / "split" / "model.safetensors").unet
    assert not changed(whole, split)


def test_the_command_line_takes_init(tmp_path, tiny_ldm, data, capsys):
    out = tmp_path / "cli"
    rc = main(
        [
            "train",
            "--init",
            str(tiny_ldm),
            "--steps",
            "1",
            "--batch-size",
            "8",
            "--out",
            str(out),
            "--quiet",
            "--set",
            "data.holdout=0",
        ]
    )
    assert rc in (0, None)
    assert LdmFile.read(out / "model.safetensors").run.init_sha256 == file_sha256(tiny_ldm)


def test_the_run_starts_from_the_model_weights_not_fresh_ones(tmp_path, tiny_ldm, data):
    fine_tune(tiny_ldm, tmp_path / "still", lr=1e-30, weight_decay=0.0)  # a step too small to move a weight
    assert not changed(LdmFile.read(tiny_ldm).unet, LdmFile.read(tmp_path / "still" / "model.safetensors").unet)


def test_a_run_started_from_a_model_goes_on_with_the_models_own_data_unless_told_otherwise(tmp_path):
    """`ldmkit train --init emoji` alone trained the emoji model on Fashion-MNIST (the data setting's default) for
    half an hour without a word: the data settings left at their defaults now come from the model's own."""
    from ldmkit.shipped import resolve_model
    from ldmkit.training.init import start_from

    emoji = resolve_model("emoji")
    parent = LdmFile.read(emoji).run.data
    started, _ = start_from(DenoiserRun(init=str(emoji)), tmp_path)
    assert started.data == parent and started.data.dataset == "emoji"
    told, _ = start_from(DenoiserRun(init=str(emoji), data=DataConfig(dataset=str(tmp_path), flip=True)), tmp_path)
    assert (told.data.dataset, told.data.flip, told.data.resolution) == (str(tmp_path), True, parent.resolution)


def test_a_converted_model_that_names_no_data_warns_that_the_default_data_is_used(tmp_path):
    """A diffusers folder or Stable Diffusion file need not say what it was trained on: without --data the run says
    it trains on the default data set, and names --data."""
    import diffusers

    from ldmkit.interop.convert import convert
    from ldmkit.training.init import start_from
    from tests.tiny_sd import tiny_sd

    _, _, _, ldm = tiny_sd(diffusers)
    ldm.text_encoder = None  # FixedText has no weights to export
    folder = convert(ldm.save(tmp_path / "sd.safetensors"), tmp_path / "folder", to="diffusers")
    with pytest.warns(UserWarning, match="does not record what it was trained on.*--data DIR"):
        start_from(DenoiserRun(init=str(folder)), tmp_path / "run")
    told, _ = start_from(DenoiserRun(init=str(folder), data=DataConfig(dataset=str(tmp_path))), tmp_path / "run")
    assert told.data.dataset == str(tmp_path)
