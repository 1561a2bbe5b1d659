"""`ldmkit train --init MODEL --lora-rank R`: adapters train on the frozen model and are written as a LoRA file."""

import pytest
import torch
from safetensors.torch import load_file

from ldmkit.adapters import load_lora, read_lora
from ldmkit.checkpoint import file_sha256
from ldmkit.cli import main
from ldmkit.config import DataConfig, DenoiserRun, LoRAConfig, TrainConfig
from ldmkit.denoisers.unet import UNet
from ldmkit.errors import InputError
from ldmkit.ldm import LdmFile
from ldmkit.training import runs


@pytest.fixture
def data(monkeypatch, blobs):
    monkeypatch.setattr(runs, "_datasets", lambda cfg, holdout: (blobs, None))
    return blobs


def lora_run(parent, steps=2, lora=None, **train_kw):
    kw = dict(steps=steps, batch_size=8, lr=1e-2, warmup_steps=1, log_every=1, ckpt_every=1, ema_decay=0.5) | train_kw
    return DenoiserRun(
        init=str(parent), data=DataConfig(holdout=0), train=TrainConfig(**kw), lora=lora or LoRAConfig(rank=2)
    )


def parent_unet(path):
    f = LdmFile.read(path)
    unet = UNet(f.run.unet)
    unet.load_state_dict(f.unet)
    return unet


def test_a_lora_run_trains_only_the_adapters_and_writes_a_small_lora_file(tmp_path, tiny_ldm, data):
    result = runs.train_denoiser(lora_run(tiny_ldm), tmp_path / "r", progress=False)
    path = tmp_path / "r" / "lora.safetensors"
    assert result["checkpoint"] == str(path) and not (tmp_path / "r" / "model.safetensors").exists()
    assert result["trained_parameters"] < result["parameters"] / 10
    f = read_lora(path)
    assert f.layout == "peft" and f.about["rank"] == 2 and f.about["base_sha256"] == file_sha256(tiny_ldm)
    assert path.stat().st_size < tiny_ldm.stat().st_size / 10
    unet = parent_unet(tiny_ldm)
    lora = load_lora(path, unet)  # fits the model it was trained on, every layer
    assert {p.rsplit(".", 1)[-1] for p in lora.paths()} == {"to_q", "to_k", "to_v", "to_out"}
    assert all(m.up.abs().max() > 0 for _, m in lora.items()), "B moved from zero: the adapters trained"


def test_a_locon_run_adapts_the_kernel_convolutions_and_diffusers_layouts_carry_them(tmp_path, tiny_ldm, data):
    """--lora-targets all+conv: the 3x3 convolutions train too, and the file holds their factors 4-D (A with the
    layer's kernel, B 1x1), which load back onto the model with the same update."""
    runs.train_denoiser(lora_run(tiny_ldm, lora=LoRAConfig(rank=2, targets="all+conv")), tmp_path / "r", progress=False)
    path = tmp_path / "r" / "lora.safetensors"
    state = load_file(str(path))
    unet = parent_unet(tiny_ldm)
    convs = [p for p, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    lora = load_lora(path, unet)
    assert set(convs) <= set(lora.paths())
    downs = [v for k, v in state.items() if k.endswith("lora_A.weight") and v.ndim == 4 and v.shape[-1] == 3]
    assert len(downs) == len(convs)
    assert all(m.up.abs().max() > 0 for p, m in lora.items() if p in convs), "the convolutions' adapters trained"


def test_a_lora_run_with_ema_resumes_exactly(tmp_path, tiny_ldm, data):
    runs.train_denoiser(lora_run(tiny_ldm, steps=3), tmp_path / "whole", progress=False)
    run = lora_run(tiny_ldm, steps=3)
    runs.train_denoiser(run, tmp_path / "split", progress=False, stop_after=2)
    runs.train_denoiser(run, tmp_path / "split", progress=False, resume=True)
    whole, split = (load_file(str(tmp_path / d / "lora.safetensors")) for d in ("whole", "split"))
    assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole)


def test_the_command_line_writes_the_kohya_layout_and_overwrites(tmp_path, tiny_ldm, data, capsys):
    out = tmp_path / "cli"
    args = ["train", "--init", str(tiny_ldm), "--steps", "1", "--batch-size", "8", "--out", str(out), "--quiet"]
    lora = ["--lora-rank", "2", "--lora-alpha", "4", "--lora-targets", "attn+ff", "--lora-layout", "kohya"]
    assert main(args + lora + ["--set", "data.holdout=0"]) in (0, None)
    assert "LoRA written to" in capsys.readouterr().out
    state = load_file(str(out / "lora.safetensors"))
    assert any(k.startswith("lora_unet_") and k.endswith("ff_net_2.lora_down.weight") for k in state)
    assert {float(v) for k, v in state.items() if k.endswith(".alpha")} == {4.0}
    assert main(args + lora + ["--set", "data.holdout=0", "--overwrite"]) in (0, None)


def test_lora_runs_without_a_model_or_with_more_to_train_are_refused(tmp_path, tiny_ldm, data):
    with pytest.raises(InputError, match="pass --init MODEL"):
        runs.train_denoiser(DenoiserRun(autoencoder="x", lora=LoRAConfig(rank=2)), tmp_path / "a")
    with pytest.raises(InputError, match="drop train.trainable=backbone"):
        runs.train_denoiser(lora_run(tiny_ldm, trainable="backbone+text"), tmp_path / "b")
    with pytest.raises(InputError, match="rank 64 does not fit"):
        runs.train_denoiser(lora_run(tiny_ldm, lora=LoRAConfig(rank=64)), tmp_path / "c", progress=False)
