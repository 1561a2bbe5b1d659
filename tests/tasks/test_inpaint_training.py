"""Training an inpainting model (`ldmkit train --task inpaint`): random masks, the concat input, exact resume, the
checkpoint's task, and using the result (inpaint works, generate is refused)."""

import json
from dataclasses import replace

import pytest
import torch

from ldmkit import checkpoint
from ldmkit.cli import main
from ldmkit.config import DenoiserRun, from_dict, load_run
from ldmkit.errors import ConfigError, InputError
from ldmkit.interop.convert import convert
from ldmkit.ldm import LatentDiffusion, LdmFile
from ldmkit.pipelines.generate import generate
from ldmkit.pipelines.inpaint import inpaint, prepare_edit
from ldmkit.pipelines.masks import latent_mask
from ldmkit.pipelines.request import SampleRequest
from ldmkit.tasks import masks as task_masks
from ldmkit.tasks.masks import MASK_KINDS, border_mask, box_mask, brush_mask, random_masks
from ldmkit.training import runs
from ldmkit.training.loop import STATE_FILE, step_generator
from tests.factory import tiny_denoiser_run


def inpaint_run(tiny_ae, steps=4, **train_kw) -> DenoiserRun:
    kw = dict(steps=steps, batch_size=8, lr=1e-3, warmup_steps=1, ema_decay=0.9, log_every=1, ckpt_every=100)
    return tiny_denoiser_run(tiny_ae, task="inpaint", data=dict(holdout=0), train=kw | train_kw)


@pytest.fixture
def data(monkeypatch, blobs):
    """Training reads the blobs (two classes of 16x16 grayscale squares)."""
    monkeypatch.setattr(runs, "_datasets", lambda cfg, holdout: (blobs, None))
    return blobs


@pytest.fixture
def trained(tmp_path, tiny_ae, data):
    """A 4-step inpainting model trained on the blobs: (its file, the run's result)."""
    res = runs.train_denoiser(inpaint_run(tiny_ae), tmp_path / "run", progress=False)
    return tmp_path / "run" / "model.safetensors", res


# --- masks ----------------------------------------------------------------------------------------------------------


def test_masks_are_binary_of_every_kind_and_a_pure_function_of_seed_and_step():
    masks, kinds = random_masks(64, (16, 24), step_generator(7, 3))
    assert masks.shape == (64, 1, 16, 24)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert set(kinds) == set(MASK_KINDS)
    for m, kind in zip(masks, kinds):
        assert m.any(), kind  # every kind regenerates something
        if kind == "whole":
            assert m.all()
    again, kinds_again = random_masks(64, (16, 24), step_generator(7, 3))
    assert torch.equal(masks, again) and kinds == kinds_again
    other, _ = random_masks(64, (16, 24), step_generator(7, 4))
    assert not torch.equal(masks, other)


def test_each_kind_has_its_shape():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        m = border_mask(16, 16, g)  # a band along at least one side: some edge row or column is all ones
        assert m[0].all() or m[-1].all() or m[:, 0].all() or m[:, -1].all()
        assert not m.all() or (m[0].all() and m[-1].all())  # all ones only when bands cover it
        b = box_mask(32, 32, g)
        ys, xs = b.nonzero(as_tuple=True)
        assert int(ys.max() - ys.min()) + 1 >= 4 and int(xs.max() - xs.min()) + 1 >= 4  # each box >= 1/8 side
        s = brush_mask(32, 32, g)
        assert 0 < int(s.sum()) < 32 * 32


def test_the_latent_mask_follows_the_pipelines_rule():
    masks, _ = random_masks(16, (16, 16), torch.Generator().manual_seed(1))
    for f in (1, 2, 4):
        assert torch.equal(task_masks.latent_mask(masks, f), latent_mask(masks, f))


# --- configuration --------------------------------------------------------------------------------------------------


def test_task_is_validated_and_set_by_the_command_line():
    with pytest.raises(ConfigError, match=r"task = 'paint' is not a task; use ") as err:
        from_dict(DenoiserRun, {"task": "paint"})
    assert all(f"{name} or" in str(err.value) or f"or {name}" in str(err.value) for name in ("generate", "inpaint"))
    assert DenoiserRun().task == "generate"
    assert load_run(DenoiserRun, None, ["task=inpaint"]).task == "inpaint"


# --- training -------------------------------------------------------------------------------------------------------


def test_inpaint_training_writes_a_model_with_the_concat_input(trained):
    path, res = trained
    f = LdmFile.read(path)
    assert f.run.task == "inpaint"
    assert f.run.unet.in_channels == 2 * 2 + 1 and f.run.unet.out_channels == 2  # latent, mask, masked latents
    assert tuple(f.unet["conv_in.weight"].shape[:2]) == (8, 5)
    assert res["step"] == 4 and res["final_loss"] is not None
    ldm = LatentDiffusion.load(path)
    assert ldm.run.task == "inpaint" and ldm.num_classes == 2


def test_inpaint_resume_equals_an_uninterrupted_run(tmp_path, tiny_ae, data):
    run = inpaint_run(tiny_ae, steps=4)
    runs.train_denoiser(run, tmp_path / "a", progress=False)
    runs.train_denoiser(run, tmp_path / "b", progress=False, stop_after=2)
    assert checkpoint.read_metadata(tmp_path / "b" / STATE_FILE)["step"] == 2
    torch.manual_seed(123)  # a fresh process: other initial weights, replaced by the saved state
    runs.train_denoiser(run, tmp_path / "b", progress=False, resume=True)
    a, _ = checkpoint.load(tmp_path / "a" / STATE_FILE, "train-state")
    b, _ = checkpoint.load(tmp_path / "b" / STATE_FILE, "train-state")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losses = [json.loads(ln)["loss"] for ln in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    resumed = [json.loads(ln)["loss"] for ln in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert losses == resumed


def test_a_resume_cannot_switch_the_task(tmp_path, tiny_ae, data):
    run = inpaint_run(tiny_ae, steps=2)
    runs.train_denoiser(run, tmp_path / "r", progress=False, stop_after=1)
    with pytest.raises(ConfigError, match=r'task: "inpaint" -> "generate"'):
        runs.train_denoiser(replace(run, task="generate"), tmp_path / "r", progress=False, resume=True)


def test_progress_grids_of_an_inpainting_run(tmp_path, tiny_ae, data):
    res = runs.train_denoiser(inpaint_run(tiny_ae, steps=1, sample_every=1), tmp_path / "g", progress=False)
    assert res["step"] == 1 and (tmp_path / "g" / "samples-0000001.png").is_file()


# --- using the trained model ----------------------------------------------------------------------------------------


def test_the_trained_model_inpaints_through_the_concat_path_and_keeps_unmasked_pixels(trained, blobs):
    ldm = LatentDiffusion.load(trained[0])
    x = blobs[0]["image"][None]  # (1, 1, 16, 16)
    m = torch.zeros(1, 1, 16, 16)
    m[..., 3:11, 5:13] = 1
    ed = prepare_edit(ldm, x, m)
    assert ed.concat is not None and ed.concat.shape == (1, 3, 8, 8)  # mask + 2 masked-image latent channels
    assert torch.equal(ed.concat[:, :1], latent_mask(m, 2))  # the training's rule, max-pooling
    assert torch.equal(ed.concat[:, 1:], ldm.encode(x * (1 - m)))
    assert ed.regenerate.all()  # no blend: the model sees the kept region through its input
    out, _ = inpaint(ldm, SampleRequest(n=2, labels=[1], steps=3, sampler="euler", seed=0), x, m)
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()
    keep = m.expand_as(out) == 0
    assert torch.equal(out[keep], x.expand_as(out)[keep])


def test_generate_with_an_inpainting_model_is_refused_naming_its_task(trained, tmp_path, capsys):
    ldm = LatentDiffusion.load(trained[0])
    with pytest.raises(InputError, match=r"inpainting model \(task inpaint: it needs an image and a mask\)"):
        generate(ldm, SampleRequest(n=1, steps=2))
    code = main(["generate", "--model", str(trained[0]), "--out", str(tmp_path / "g.png"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "task inpaint" in err and "ldmkit inpaint" in err
    assert len(err.strip().splitlines()) == 1


def test_the_task_option_reaches_the_training_run(monkeypatch, tmp_path, tiny_ae, capsys):
    import ldmkit.training.runs as runs

    seen = {}

    def fake(run, out, **kw):
        seen["task"] = run.task
        return {"checkpoint": str(tmp_path / "x.safetensors"), "step": 0}

    monkeypatch.setattr(runs, "train_denoiser", fake)  # the command imports it when it runs
    assert main(["train", "--autoencoder", str(tiny_ae), "--task", "inpaint", "--out", str(tmp_path), "--quiet"]) == 0
    assert seen["task"] == "inpaint"
    assert main(["train", "--autoencoder", str(tiny_ae), "--out", str(tmp_path), "--quiet"]) == 0
    assert seen["task"] == "generate"


def test_an_inpainting_model_keeps_its_task_through_conversion(tmp_path, tiny_ae, data):
    """Converting used to drop the task: the model came back as "generate" with 2c + 1 channels, and inpaint then
    brought its mask to latent size by nearest neighbour instead of the max-pooling it was trained with."""
    run = inpaint_run(tiny_ae, steps=1)
    run = replace(run, unet=replace(run.unet, attention_levels=(0,), num_heads=(2,), mid_attention=True))
    path = runs.train_denoiser(run, tmp_path / "run", progress=False)["checkpoint"]
    single = convert(path, tmp_path / "s.safetensors", to="single-file")
    back = convert(single, tmp_path / "back.safetensors", to="ldm")
    assert LatentDiffusion.load(back).task == "inpaint"  # diffusers folders: tests/pipelines/test_inpaint_parity.py
