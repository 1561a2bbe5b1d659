"""`ldmkit train --init MODEL --lora-rank R --lora-text`: LoRAs train on the frozen text encoder beside the
backbone's, and lora.safetensors holds both, read back with every layer matched."""

import copy
import functools

import pytest
import torch
from safetensors.torch import load_file

from ldmkit.adapters import load_lora_parts, read_lora
from ldmkit.adapters.apply import targetable
from ldmkit.cli import main
from ldmkit.conditioning.text import build_text_encoder
from ldmkit.config import DataConfig, DenoiserRun, DistillConfig, LoRAConfig, TrainConfig
from ldmkit.errors import InputError
from ldmkit.ldm import LatentDiffusion, LdmFile
from ldmkit.nn.lora import attach
from ldmkit.training import runs
from tests.conftest import TensorDataset
from tests.factory import attention_unet, save_tiny_ldm, tiny_denoiser_run

PROMPT = ["a square"]


@pytest.fixture
def data(monkeypatch, blobs):
    captions = ["a square" if int(y) == 0 else "a dot" for y in blobs.labels]
    ds = TensorDataset(blobs.images[:16], captions=captions[:16])
    monkeypatch.setattr(runs, "_datasets", lambda cfg, holdout: (ds, None))
    return ds


def text_lora_run(parent, steps=2, **lora):
    train = TrainConfig(steps=steps, batch_size=8, lr=1e-2, warmup_steps=1, log_every=1, ckpt_every=1, ema_decay=0.5)
    lora = LoRAConfig(**{"rank": 2, "text_encoder": True} | lora)
    return DenoiserRun(init=str(parent), data=DataConfig(holdout=0), train=train, lora=lora)


def encodings(path, model):
    """(the model's encoding of PROMPT, with the file's text LoRAs at scale 1, at scale 0); every layer of the file
    must match the model's (load_lora_parts refuses otherwise)."""
    ldm = LatentDiffusion.load(model)
    enc = ldm.text_encoder
    _, text = load_lora_parts(path, ldm.unet, enc)
    assert len(text.paths()) == len(targetable(enc)) == len(read_lora(path).parts["text"])
    with torch.no_grad():
        base = enc.encode(PROMPT).context
        outs = []
        for scale in (1.0, 0.0):
            hooks = attach(enc, text, scale)
            outs.append(enc.encode(PROMPT).context)
            hooks.remove()
    return base, *outs


def test_only_the_adapters_train_and_the_text_layers_load_back(tmp_path, tiny_text_ldm, data, monkeypatch):
    seen, train = {}, runs.train

    def spy(task, *args, **kw):
        seen["task"] = task
        return train(task, *args, **kw)

    monkeypatch.setattr(runs, "train", spy)
    result = runs.train_denoiser(text_lora_run(tiny_text_ldm), tmp_path / "r", progress=False)
    task, parent = seen["task"], LdmFile.read(tiny_text_ldm)
    enc, unet = task.ldm.text_encoder, task.ldm.unet
    assert task.text_cache is None, "the captions are encoded each step, through the LoRAs"
    assert not any(p.requires_grad for p in [*enc.parameters(), *unet.parameters()])
    assert all(p.requires_grad for p in task.model.parameters()) and set(task.model) == {"lora", "text_lora"}
    assert all(torch.equal(v, parent.text[k]) for k, v in enc.state_dict().items()), "the text encoder is unchanged"
    assert all(torch.equal(v, parent.unet[k]) for k, v in unet.state_dict().items()), "the backbone is unchanged"
    path = tmp_path / "r" / "lora.safetensors"
    assert result["checkpoint"] == str(path)
    keys = load_file(str(path))
    assert any(k.startswith("text_encoder.layers.0.") and k.endswith(".lora_A.weight") for k in keys)
    assert all(m.up.abs().max() > 0 for _, m in task.text_adapter.items()), "the text LoRAs trained"
    base, on, off = encodings(path, tiny_text_ldm)
    assert not torch.allclose(on, base, atol=1e-6) and torch.equal(off, base)
    # a progress grid is drawn with the weights it is given (the EMA's), both sets, and training's come back
    live, zero, during = copy.deepcopy(task.model.state_dict()), copy.deepcopy(task.model), {}
    zero.requires_grad_(False).apply(lambda m: [p.zero_() for p in m.parameters(recurse=False)])
    task._grid = lambda *args: during.update(copy.deepcopy(task.model.state_dict()))
    task.sample(tmp_path, zero, 3)
    assert during.keys() == live.keys() and not any(v.any() for v in during.values())
    assert all(torch.equal(v, live[k]) for k, v in task.model.state_dict().items())


def test_the_command_line_writes_kohya_text_layers(tmp_path, tiny_text_ldm, data, capsys):
    out = tmp_path / "cli"
    args = ["train", "--init", str(tiny_text_ldm), "--steps", "1", "--batch-size", "8", "--out", str(out), "--quiet"]
    lora = ["--lora-rank", "2", "--lora-text", "--lora-layout", "kohya", "--set", "data.holdout=0"]
    assert main(args + lora) in (0, None)
    assert "LoRA written to" in capsys.readouterr().out
    path = out / "lora.safetensors"
    assert read_lora(path).about["text_encoder"] == "trainable"
    assert any(k.startswith("lora_te_layers_0_") for k in load_file(str(path)))
    base, on, off = encodings(path, tiny_text_ldm)
    assert not torch.allclose(on, base, atol=1e-6) and torch.equal(off, base)


@pytest.fixture(scope="module")
def tiny_clip_ldm(tmp_path_factory, tiny_ae):
    """An untrained model reading prompts with a tiny CLIP text encoder (two layers of width 64)."""
    pytest.importorskip("transformers")
    unet = attention_unet(in_channels=2, out_channels=2, context_dim=64)
    run = tiny_denoiser_run(tiny_ae, unet=unet, text_encoder="clip")
    text = functools.partial(build_text_encoder, "clip", preset="tiny", max_length=16)
    return save_tiny_ldm(tmp_path_factory.mktemp("clip") / "model.safetensors", run, text=text)


def test_clip_text_layers_are_written_with_sd_names(tmp_path, tiny_clip_ldm, data):
    runs.train_denoiser(text_lora_run(tiny_clip_ldm, steps=1), tmp_path / "r", progress=False)
    path = tmp_path / "r" / "lora.safetensors"
    assert "text_encoder.text_model.encoder.layers.1.mlp.fc2.lora_A.weight" in load_file(str(path))
    base, on, off = encodings(path, tiny_clip_ldm)
    assert not torch.allclose(on, base, atol=1e-6) and torch.equal(off, base)


def test_a_text_lora_run_with_ema_resumes_exactly(tmp_path, tiny_text_ldm, data):
    runs.train_denoiser(text_lora_run(tiny_text_ldm, steps=3), tmp_path / "whole", progress=False)
    run = text_lora_run(tiny_text_ldm, steps=3)
    runs.train_denoiser(run, tmp_path / "split", progress=False, stop_after=2)
    runs.train_denoiser(run, tmp_path / "split", progress=False, resume=True)
    whole, split = (load_file(str(tmp_path / d / "lora.safetensors")) for d in ("whole", "split"))
    assert any(k.startswith("text_encoder.") for k in whole)
    assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole)


def test_text_loras_for_a_model_without_a_trainable_text_encoder_are_refused(tmp_path, tiny_ae, tiny_ldm, monkeypatch):
    monkeypatch.setattr(runs, "_denoiser_task", lambda *a, **kw: pytest.fail("refused after the slow setup"))
    minilm_run = tiny_denoiser_run(tiny_ae, unet={"context_dim": 384}, text_encoder="minilm")
    minilm = save_tiny_ldm(tmp_path / "minilm.safetensors", minilm_run)  # MiniLM's weights are not stored
    with pytest.raises(InputError, match="minilm text encoder, a frozen package model .* drop --lora-text"):
        runs.train_denoiser(text_lora_run(minilm), tmp_path / "a", progress=False)
    with pytest.raises(InputError, match="has no text encoder .* drop --lora-text"):
        runs.train_denoiser(text_lora_run(tiny_ldm), tmp_path / "b", progress=False)
    with pytest.raises(InputError, match="give their rank with --lora-rank"):
        runs.train_denoiser(text_lora_run(tiny_ldm, rank=0), tmp_path / "c", progress=False)
    distill = DenoiserRun(**{**text_lora_run(tiny_ldm).__dict__, "distill": DistillConfig(steps=4)})
    with pytest.raises(InputError, match="LCM-LoRA adapts the backbone alone"):
        runs.train_denoiser(distill, tmp_path / "d", progress=False)
