"""`ldmkit distill MODEL --steps K`: a consistency (LCM) student, the whole model or an LCM-LoRA, that samples with
the LCM sampler in K steps by itself."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ldmkit.adapters import read_lora
from ldmkit.cli import main
from ldmkit.config import DataConfig, DenoiserRun, DistillConfig, LoRAConfig, TrainConfig
from ldmkit.data.images import read_parameters
from ldmkit.errors import InputError
from ldmkit.ldm import LatentDiffusion
from ldmkit.pipelines.request import model_sampling
from ldmkit.shipped import load_model, model_config
from ldmkit.training import runs


@pytest.fixture
def data(monkeypatch, blobs):
    monkeypatch.setattr(runs, "_datasets", lambda cfg, holdout: (blobs, None))
    return blobs


def distill_run(parent, steps=2, lora=0, **train_kw):
    kw = dict(steps=steps, batch_size=8, lr=1e-3, warmup_steps=1, log_every=1, ckpt_every=1, ema_decay=0.0) | train_kw
    return DenoiserRun(
        init=str(parent),
        data=DataConfig(holdout=0, caption_dropout=0.0),
        train=TrainConfig(**kw),
        lora=LoRAConfig(rank=lora, targets="all"),
        distill=DistillConfig(steps=2, grid=8, guidance=2.0),
    )


def test_a_full_student_and_an_lcm_lora_start_from_the_teacher_and_learn(tmp_path, tiny_ldm, data):
    full = runs.train_denoiser(distill_run(tiny_ldm, steps=3), tmp_path / "full", progress=False)
    lora = runs.train_denoiser(distill_run(tiny_ldm, steps=3, lora=4), tmp_path / "lora", progress=False)
    # both students equal the teacher at the first step (a copy; LoRAs with B = 0), so their first losses agree
    first = [runs_first_loss(tmp_path / d) for d in ("full", "lora")]
    assert first[0] == pytest.approx(first[1], rel=1e-5)
    assert full["checkpoint"].endswith("model.safetensors") and lora["checkpoint"].endswith("lora.safetensors")
    assert lora["trained_parameters"] < full["trained_parameters"] / 5
    teacher = load_file(str(tiny_ldm))
    student = load_file(full["checkpoint"])
    assert any(not torch.equal(student[k].float(), teacher[k].float()) for k in teacher if k.startswith("unet."))
    assert all(torch.equal(student[k], teacher[k]) for k in teacher if k.startswith("autoencoder."))


def runs_first_loss(folder) -> float:
    rows = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]
    return next(r["loss"] for r in rows if "loss" in r)


def test_a_distilled_model_and_an_lcm_lora_choose_the_lcm_sampler_and_their_steps(tmp_path, tiny_ldm, data, capsys):
    full = runs.train_denoiser(distill_run(tiny_ldm), tmp_path / "full", progress=False)["checkpoint"]
    lora = runs.train_denoiser(distill_run(tiny_ldm, lora=4), tmp_path / "lora", progress=False)["checkpoint"]
    want = {"sampler": "lcm", "steps": 2, "cfg": 1.0}
    assert model_sampling(model_config(full)) == want
    assert model_sampling(model_config(lora)) == want  # a LoRA naming its base is a model of its own
    assert model_sampling(model_config(tiny_ldm)) == {}
    assert read_lora(lora).about["distill"]["steps"] == 2
    assert main(["info", lora]) in (0, None)  # `ldmkit info` shows the LoRA and the model it makes
    shown = json.loads(capsys.readouterr().out)
    assert shown["lora"]["distill"]["steps"] == 2 and shown["base"] == str(tiny_ldm) and shown["kind"] == "ldm"
    # the LoRA loads as its base with the LoRA merged: the same denoiser output as the base with the LoRA hooked in
    merged = load_model(lora)
    assert merged.run.distill.steps == 2
    base = LatentDiffusion.load(tiny_ldm)
    from ldmkit.pipelines.lora import LoRASpec, apply_loras

    hooks = apply_loras(base, [LoRASpec(lora)])
    x, sigma = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([3.0, 0.5])
    cond = base.conditioning(labels=[0, 1])
    torch.testing.assert_close(merged.denoiser(x, sigma, cond), base.denoiser(x, sigma, cond), rtol=1e-5, atol=1e-6)
    for h in hooks:
        h.remove()


def test_generate_samples_a_distilled_model_with_lcm_unless_told_otherwise(tmp_path, tiny_ldm, data, capsys):
    lora = runs.train_denoiser(distill_run(tiny_ldm, lora=4), tmp_path / "lora", progress=False)["checkpoint"]
    out = tmp_path / "a.png"
    assert main(["generate", "--model", lora, "--n", "2", "--out", str(out), "--quiet"]) in (0, None)
    err = capsys.readouterr().err
    assert "samples with sampler lcm, steps 2, cfg 1" in err
    assert params(out)["sampler"] == "lcm" and params(out)["steps"] == 2
    args = ["generate", "--model", lora, "--n", "2", "--steps", "12", "--out", str(tmp_path / "b.png"), "--quiet"]
    assert main(args) in (0, None)
    err = capsys.readouterr().err
    assert "12 LCM steps" in err and "sampler lcm, cfg 1" in err  # the steps given, the rest the model's
    assert params(tmp_path / "b.png")["steps"] == 12
    plain = ["generate", "--model", str(tiny_ldm), "--n", "2", "--out", str(tmp_path / "c.png"), "--quiet"]
    assert main(plain) in (0, None)
    assert "samples with" not in capsys.readouterr().err
    assert params(tmp_path / "c.png")["sampler"] == "dpmpp_2m"


def params(png) -> dict:
    return json.loads(read_parameters(png)["ldmkit"])


def test_a_lora_whose_base_changed_is_refused_as_a_model(tmp_path, tiny_ldm, data):
    lora = runs.train_denoiser(distill_run(tiny_ldm, lora=4), tmp_path / "lora", progress=False)["checkpoint"]
    (tmp_path / "other.safetensors").write_bytes(tiny_ldm.read_bytes())
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(lora, "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    about = json.loads(meta["ldmkit.lora"]) | {"base": "other.safetensors", "base_sha256": "0" * 64}
    save_file(state, str(tmp_path / "lora2.safetensors"), metadata=meta | {"ldmkit.lora": json.dumps(about)})
    with pytest.raises(InputError, match="is another model"):
        load_model(tmp_path / "lora2.safetensors")


def test_distillation_runs_that_cannot_work_are_refused_before_any_work(tmp_path, tiny_ldm, data, capsys):
    with pytest.raises(InputError, match="pass --init MODEL"):
        runs.train_denoiser(DenoiserRun(autoencoder="x", distill=DistillConfig(steps=4)), tmp_path / "a")
    with pytest.raises(InputError, match="more than the teacher's grid"):
        runs.train_denoiser(_with(tiny_ldm, steps=9), tmp_path / "b")
    with pytest.raises(InputError, match="drop --task inpaint"):
        runs.train_denoiser(_with(tiny_ldm, task="inpaint"), tmp_path / "c")
    assert main(["distill", str(tiny_ldm), "--steps", "0", "--out", str(tmp_path / "d")]) not in (0, None)
    assert "--steps 0: a consistency model samples in 1 to 8 steps" in capsys.readouterr().err


def _with(parent, steps=2, **fields):
    from dataclasses import replace

    run = distill_run(parent)
    return replace(run, distill=replace(run.distill, steps=steps), **fields)


def test_a_distilled_model_samples_on_the_grid_it_learned_and_no_step_is_spent_at_sigma_min(tiny_ldm):
    from dataclasses import replace

    from ldmkit.ldm import LatentDiffusion

    base = LatentDiffusion.load(tiny_ldm)
    own = base.denoiser.sigmas(8)
    student = replace(base, run=replace(base.run, distill=DistillConfig(steps=4, grid=8)))
    four = student.denoiser.sigmas(4)
    assert torch.equal(four, torch.cat([own[[0, 2, 4, 6]], own.new_zeros(1)]))  # points of the distillation grid
    assert float(four[-2]) > float(own[-2])  # the last step is not at the grid's sigma_min
    assert torch.equal(student.denoiser.sigmas(8), own)  # the whole grid is the grid
    assert torch.equal(student.denoiser.sigmas(12), base.denoiser.sigmas(12))  # more steps: the model's own


def test_the_few_step_benchmark_times_a_model_against_its_student(tmp_path, tiny_ldm, data):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import few_steps

    lora = runs.train_denoiser(distill_run(tiny_ldm, lora=4), tmp_path / "lora", progress=False)["checkpoint"]
    out = tmp_path / "few.json"
    args = ["--teacher", str(tiny_ldm), "--student", lora, "--n", "2", "--repeats", "1", "--out", str(out)]
    assert few_steps.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["sampler"], r["steps"], r["cfg"]) for r in rows] == [
        ("dpmpp_2m", 25, 3.0),
        ("dpmpp_2m", 2, 3.0),
        ("lcm", 2, 1.0),
        ("lcm", 1, 1.0),
    ]
    assert all(r["images_per_s"] > 0 and r["one_image_s"] > 0 and r["fid"] is None for r in rows)
