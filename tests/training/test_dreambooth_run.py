"""`ldmkit train --init MODEL --dreambooth`: instance images under their prompt, class images the base model draws
(cached by model and prompt), the prior's weight, a full model or a LoRA, and an exact resume."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldmkit.cli import main
from ldmkit.config import DataConfig, DenoiserRun, DreamBoothConfig, LoRAConfig, TrainConfig
from ldmkit.errors import InputError
from ldmkit.ldm import LatentDiffusion
from ldmkit.pipelines import dreambooth
from ldmkit.pipelines.dreambooth import class_images
from ldmkit.training import runs


@pytest.fixture
def instance(tmp_path):
    folder = tmp_path / "instance"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        arr = np.zeros((16, 16), np.uint8)
        arr[4:12, 4:12] = 200 + 10 * i + rng.integers(0, 10)
        Image.fromarray(arr).save(folder / f"{i}.png")
    return folder


@pytest.fixture
def classes(tmp_path, tiny_text_ldm):
    return class_images(tiny_text_ldm, "a square", 3, steps=2, root=tmp_path / "cache", progress=False)


def db_run(parent, instance, classes, steps=2, **kw):
    train = TrainConfig(steps=steps, batch_size=4, lr=1e-3, warmup_steps=1, log_every=1, ckpt_every=1, ema_decay=0.5)
    db = DreamBoothConfig(instance_prompt="a photo of sks", class_prompt="a square", class_data=str(classes))
    data = DataConfig(dataset=str(instance), holdout=0)
    return DenoiserRun(init=str(parent), data=data, train=train, dreambooth=db, **kw)


def test_class_images_are_drawn_once_and_cached_by_model_and_prompt(tmp_path, tiny_text_ldm, classes, monkeypatch):
    assert sorted(p.name for p in classes.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    first = (classes / "00001.png").read_bytes()
    (classes / "00002.png").unlink()  # as a run killed while drawing leaves it: image 2 missing
    drawn = []
    real = dreambooth.generate_together
    monkeypatch.setattr(dreambooth, "generate_together", lambda ldm, reqs, b: drawn.extend(reqs) or real(ldm, reqs, b))
    assert class_images(tiny_text_ldm, "a square", 4, steps=2, root=tmp_path / "cache", progress=False) == classes
    assert [r.seed for r in drawn] == [2, 3], "only the missing images are drawn, image i from seed i"
    assert (classes / "00001.png").read_bytes() == first
    other = class_images(tiny_text_ldm, "a circle", 1, steps=2, root=tmp_path / "cache", progress=False)
    assert other != classes, "another prompt has its own folder"
    monkeypatch.setattr(LatentDiffusion, "load", lambda *a, **k: pytest.fail("a cached folder loads no model"))
    class_images(tiny_text_ldm, "a square", 4, root=tmp_path / "cache", progress=False)


def test_a_dreambooth_run_fine_tunes_the_model_with_the_prior(tmp_path, tiny_text_ldm, instance, classes):
    result = runs.train_denoiser(db_run(tiny_text_ldm, instance, classes), tmp_path / "full", progress=False)
    assert result["checkpoint"].endswith("model.safetensors")
    base, tuned = load_file(str(tiny_text_ldm)), load_file(result["checkpoint"])
    changed = [k for k in base if k.startswith("unet.") and not torch.equal(base[k], tuned[k])]
    assert changed, "the U-Net trained"


def test_a_dreambooth_lora_run_writes_a_lora_and_resumes_exactly(tmp_path, tiny_text_ldm, instance, classes):
    run = db_run(tiny_text_ldm, instance, classes, steps=3, lora=LoRAConfig(rank=2))
    whole = runs.train_denoiser(run, tmp_path / "whole", progress=False)
    assert whole["checkpoint"].endswith("lora.safetensors")
    runs.train_denoiser(run, tmp_path / "split", progress=False, stop_after=2)
    runs.train_denoiser(run, tmp_path / "split", progress=False, resume=True)
    a, b = (load_file(str(tmp_path / d / "lora.safetensors")) for d in ("whole", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_prior_weight_weighs_the_class_images(tmp_path, tiny_text_ldm, instance, classes, monkeypatch):
    seen = {}
    real = runs._dreambooth

    def spy(*args):
        latents, weights = real(*args)
        seen["captions"], seen["weights"] = latents.captions, weights
        return latents, weights

    monkeypatch.setattr(runs, "_dreambooth", spy)
    run = db_run(tiny_text_ldm, instance, classes, steps=1)
    run = run.__class__(
        **{**run.__dict__, "dreambooth": DreamBoothConfig(**{**run.dreambooth.__dict__, "prior_weight": 0.5})}
    )
    runs.train_denoiser(run, tmp_path / "w", progress=False)
    assert seen["captions"] == ["a photo of sks"] * 4 + ["a square"] * 3
    w = seen["weights"]
    assert torch.allclose(w[:4].sum() * 0.5, w[4:].sum()), "the class half weighs prior_weight x the instance half"


def test_the_command_line_draws_the_class_images_and_trains(tmp_path, tiny_text_ldm, instance, monkeypatch, capsys):
    monkeypatch.setenv("LDMKIT_CACHE", str(tmp_path / "cache"))
    args = ["train", "--init", str(tiny_text_ldm), "--dreambooth", "--instance-data", str(instance)]
    args += ["--instance-prompt", "a photo of sks", "--class-prompt", "a square", "--prior-weight", "0.5"]
    args += ["--steps", "1", "--batch-size", "4", "--out", str(tmp_path / "cli"), "--quiet"]
    assert main([*args, "--set", "dreambooth.class_images=2", "--set", "data.holdout=0"]) in (0, None)
    assert "model written to" in capsys.readouterr().out
    assert len(list((tmp_path / "cache" / "dreambooth").glob("*/0000*.png"))) == 2


def test_bad_dreambooth_runs_are_refused(tmp_path, tiny_text_ldm, tiny_ldm, instance, classes, capsys):
    assert main(["train", "--init", str(tiny_text_ldm), "--instance-prompt", "x", "--out", str(tmp_path / "a")])
    assert "--instance-prompt goes with --dreambooth" in capsys.readouterr().err
    assert main(["train", "--init", str(tiny_text_ldm), "--dreambooth", "--out", str(tmp_path / "b")])
    assert "needs --init MODEL, --instance-data DIR and --instance-prompt" in capsys.readouterr().err
    with pytest.raises(InputError, match="not text-conditional"):
        runs.train_denoiser(db_run(tiny_ldm, instance, classes), tmp_path / "c", progress=False)
    run = db_run(tiny_text_ldm, instance, classes)
    bare = DreamBoothConfig(instance_prompt="a photo of sks", class_prompt="a square")
    with pytest.raises(InputError, match="go together"):
        runs.train_denoiser(run.__class__(**{**run.__dict__, "dreambooth": bare}), tmp_path / "d")
