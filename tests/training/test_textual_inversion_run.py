"""`ldmkit train --init MODEL --textual-inversion TOKEN`: only the new word's vectors train; both embedding layouts
are written, resume exactly, and load with `ldmkit generate --embedding`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.adapters.embeddings import read_embedding
from ldmkit.cli import main
from ldmkit.config import DataConfig, DenoiserRun, LoRAConfig, TextualInversionConfig, TrainConfig
from ldmkit.errors import InputError
from ldmkit.training import runs
from tests.conftest import TensorDataset


@pytest.fixture
def data(monkeypatch, blobs):
    captions = ["a square" if int(y) == 0 else "" for y in blobs.labels]  # some captions, some none
    ds = TensorDataset(blobs.images, captions=captions)
    monkeypatch.setattr(runs, "_datasets", lambda cfg, holdout: (ds, None))
    return ds


def ti_run(parent, steps=2, token="<sks>", **kw):
    train = TrainConfig(steps=steps, batch_size=8, lr=5e-2, warmup_steps=1, log_every=1, ckpt_every=1, ema_decay=0.5)
    ti = TextualInversionConfig(token=token, vectors=2)
    return DenoiserRun(init=str(parent), data=DataConfig(holdout=0), train=train, textual_inversion=ti, **kw)


def test_only_the_new_words_vectors_train_and_both_layouts_are_written(tmp_path, tiny_text_ldm, data):
    result = runs.train_denoiser(ti_run(tiny_text_ldm), tmp_path / "r", progress=False)
    a1111, diffusers = tmp_path / "r" / "embedding.safetensors", tmp_path / "r" / "learned_embeds.safetensors"
    assert result["checkpoint"] == str(a1111) and not (tmp_path / "r" / "model.safetensors").exists()
    assert result["trained_parameters"] == 2 * 32  # two vectors of the trainable encoder's width
    (token, vectors), (token2, vectors2) = read_embedding(a1111), read_embedding(diffusers)
    assert token == token2 == "<sks>" and torch.equal(vectors, vectors2) and vectors.shape == (2, 32)
    assert vectors[0].std() > 0 and not torch.allclose(vectors[0], vectors[1]), "the vectors moved from their start"


def test_a_textual_inversion_run_resumes_exactly(tmp_path, tiny_text_ldm, data):
    runs.train_denoiser(ti_run(tiny_text_ldm, steps=3), tmp_path / "whole", progress=False)
    run = ti_run(tiny_text_ldm, steps=3)
    runs.train_denoiser(run, tmp_path / "split", progress=False, stop_after=2)
    runs.train_denoiser(run, tmp_path / "split", progress=False, resume=True)
    whole, split = (read_embedding(tmp_path / d / "embedding.safetensors")[1] for d in ("whole", "split"))
    assert torch.equal(whole, split)


@pytest.mark.slow  # a run and three generations
def test_the_command_line_trains_and_generate_takes_the_embedding(tmp_path, tiny_text_ldm, data, capsys):
    out = tmp_path / "cli"
    args = ["train", "--init", str(tiny_text_ldm), "--textual-inversion", "<toy>", "--steps", "1", "--batch-size", "8"]
    assert main([*args, "--out", str(out), "--quiet", "--set", "data.holdout=0"]) in (0, None)
    assert "embedding written to" in capsys.readouterr().out
    gen = ["generate", "a <toy> on a table", "--model", str(tiny_text_ldm), "--n", "1", "--steps", "2", "--quiet"]
    images = {}
    for name, extra in {
        "a1111": ["--embedding", str(out / "embedding.safetensors")],
        "diffusers": ["--embedding", str(out / "learned_embeds.safetensors")],
        "renamed": ["--embedding", f"{out / 'embedding.safetensors'}:<mine>"],
    }.items():
        prompt = ["a <mine> on a table"] if name == "renamed" else []
        argv = [*gen[:1], *prompt, *gen[2:]] if prompt else gen
        assert main([*argv, *extra, "--out", str(tmp_path / f"{name}.png")]) in (0, None)
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
    assert np.array_equal(images["a1111"], images["diffusers"]) and np.array_equal(images["a1111"], images["renamed"])
    meta = json.loads(Image.open(tmp_path / "a1111.png").text["ldmkit"])
    assert meta["embeddings"][0]["token"] == "<toy>" and len(meta["embeddings"][0]["sha256"]) == 64


def test_bad_textual_inversion_runs_are_refused(tmp_path, tiny_text_ldm, tiny_ldm, data):
    with pytest.raises(InputError, match="pass --init MODEL"):
        runs.train_denoiser(DenoiserRun(autoencoder="x", textual_inversion=TextualInversionConfig("<a>")), tmp_path)
    with pytest.raises(InputError, match="drop --lora-rank"):
        runs.train_denoiser(ti_run(tiny_text_ldm, lora=LoRAConfig(rank=2)), tmp_path / "b")
    with pytest.raises(InputError, match="'q' is already in the trainable text encoder's vocabulary"):
        runs.train_denoiser(ti_run(tiny_text_ldm, token="q"), tmp_path / "c", progress=False)
    with pytest.raises(InputError, match="is not text-conditional"):
        runs.train_denoiser(ti_run(tiny_ldm), tmp_path / "d", progress=False)
