import dataclasses
import json

import pytest
import torch

from ldmkit import checkpoint
from ldmkit.autoencoder.files import load_autoencoder
from ldmkit.config import AutoencoderRun, DataConfig
from ldmkit.training.autoencoder import AutoencoderTask
from ldmkit.training.loop import STATE_FILE, batch_indices, train
from tests.factory import attention_unet, tiny_autoencoder_run, tiny_denoiser_run

CPU = torch.device("cpu")


def tiny_ae_run(steps=6, **train_kw):
    train = dict(batch_size=8, grad_accum=2, lr=1e-3, warmup_steps=2, ema_decay=0.9, log_every=1, ckpt_every=100)
    return tiny_autoencoder_run(
        model=dict(mid_attention=False), loss=dict(disc_start=2), train=train | dict(steps=steps, **train_kw)
    )


def final_state(out):
    tensors, _ = checkpoint.load(out / STATE_FILE, "train-state")
    return tensors


def test_resume_equals_uninterrupted(tmp_path, blobs):
    run = tiny_ae_run()
    torch.manual_seed(0)
    train(AutoencoderTask(run, blobs, CPU), run.train, tmp_path / "a", CPU, progress=False)
    torch.manual_seed(0)
    train(AutoencoderTask(run, blobs, CPU), run.train, tmp_path / "b", CPU, progress=False, stop_after=3)
    assert checkpoint.read_metadata(tmp_path / "b" / STATE_FILE)["step"] == 3
    torch.manual_seed(123)  # a fresh process: different initial weights, overwritten by the resumed state
    train(AutoencoderTask(run, blobs, CPU), run.train, tmp_path / "b", CPU, progress=False, resume=True)
    a, b = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert a.keys() == b.keys()
    assert any(k.startswith("module.discriminator") for k in a) and any(k.startswith("opt.discriminator") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_training_reduces_reconstruction_loss_and_exports(tmp_path, blobs):
    run = tiny_ae_run(steps=40)
    torch.manual_seed(0)
    res = train(AutoencoderTask(run, blobs, CPU), run.train, tmp_path, CPU, progress=False)
    first = sum(h["l1"] for h in res.history[:5]) / 5
    last = sum(h["l1"] for h in res.history[-5:]) / 5
    assert last < 0.7 * first
    model, loaded = load_autoencoder(res.export_path)
    with torch.no_grad():
        post = model.encode(blobs.images[:64])
    # the stored scale factor makes the latents the denoiser trains on (posterior samples) unit-variance
    z = post.sample(generator=torch.Generator().manual_seed(0))
    assert abs(float((z * loaded.model.scaling_factor).std()) - 1.0) < 0.15
    # and it is not the posterior means' std (the scale counts the posterior variance)
    assert float(post.mean.std()) * loaded.model.scaling_factor < float((z * loaded.model.scaling_factor).std())
    assert {"d_loss", "g_loss", "d_weight"} <= res.history[-1].keys()


def test_batch_indices_cover_each_epoch_once():
    n, b = 10, 4
    idx = torch.cat([batch_indices(0, s, b, n) for s in range(5)])  # 20 draws = two epochs
    assert sorted(idx[:10].tolist()) == list(range(10)) and sorted(idx[10:].tolist()) == list(range(10))
    assert not torch.equal(idx[:10], idx[10:])  # reshuffled each epoch


def test_resume_without_state_is_an_error(tmp_path, blobs):
    run = tiny_ae_run()
    with pytest.raises(FileNotFoundError, match="no train-state.safetensors"):
        train(AutoencoderTask(run, blobs, CPU), run.train, tmp_path, CPU, progress=False, resume=True)


def test_channel_mismatch_is_explained(blobs):
    run = tiny_ae_run()
    bad = AutoencoderRun(model=run.model, loss=run.loss, data=DataConfig(channels=3), train=run.train)
    with pytest.raises(ValueError, match="model.in_channels=1 but data.channels=3"):
        AutoencoderTask(bad, blobs, CPU)


# --- the run log ------------------------------------------------------------------------------------------------


def test_resume_drops_a_torn_final_log_line_with_a_warning(tmp_path):
    from ldmkit.training.logging import JsonlLog

    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')  # killed mid-write
    with pytest.warns(UserWarning, match=r"log.jsonl.*line 4.*cut off"):
        log = JsonlLog(path, resume_step=3)
    log.write(step=4)
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_a_damaged_line_inside_the_log_is_an_error_naming_it(tmp_path):
    from ldmkit.errors import InputError
    from ldmkit.training.logging import JsonlLog

    path = tmp_path / "log.jsonl"
    text = '{"step": 1}\n{"st\n{"step": 3}\n'
    path.write_text(text)
    with pytest.raises(InputError, match=r"log.jsonl line 2 is not valid JSON.*delete or repair"):
        JsonlLog(path, resume_step=3)
    assert path.read_text() == text  # left as it was for the user to inspect


@pytest.mark.parametrize(
    "setting, message",
    [
        (dict(steps=0), r"train.steps = 0 .*integer >= 1"),
        (dict(steps=-5), r"train.steps = -5 .*integer >= 1"),
        (dict(grad_accum=0), r"train.grad_accum = 0 .*integer >= 1"),
        (dict(log_every=0), r"train.log_every = 0 .*integer >= 1"),
        (dict(batch_size=0), r"train.batch_size = 0 .*integer >= 1"),
        (dict(ema_decay=1.0), r"train.ema_decay = 1.0 .*\[0, 1\)"),
    ],
)
def test_the_loop_refuses_bad_numbers_before_writing(tmp_path, blobs, setting, message):
    from ldmkit.errors import ConfigError

    run = tiny_ae_run()
    bad = dataclasses.replace(run.train, **setting)
    with pytest.raises(ConfigError, match=message):
        train(AutoencoderTask(run, blobs, CPU), bad, tmp_path / "r", CPU, progress=False)
    assert not (tmp_path / "r").exists()


def test_logged_images_per_s_count_the_steps_since_the_previous_record(tmp_path, blobs, monkeypatch):
    """A record that does not fall on log_every (the last one, the first after a resume) divides the steps run since
    the record before it, not log_every or every step of the run, by the seconds since then."""
    from ldmkit.training import loop

    clock = iter(range(1000))  # every reading of the clock is 1 s after the one before
    monkeypatch.setattr(loop, "time", type("Clock", (), {"time": staticmethod(lambda: float(next(clock)))}))
    run = tiny_ae_run(steps=5)
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, log_every=2))
    batch = run.train.batch_size
    torch.manual_seed(0)
    res = train(AutoencoderTask(run, blobs, CPU), run.train, tmp_path / "a", CPU, progress=False)
    assert [(h["step"], h["images_per_s"]) for h in res.history] == [(2, 2 * batch), (4, 2 * batch), (5, batch)]
    torch.manual_seed(0)
    train(AutoencoderTask(run, blobs, CPU), run.train, tmp_path / "b", CPU, progress=False, stop_after=3)
    res = train(AutoencoderTask(run, blobs, CPU), run.train, tmp_path / "b", CPU, progress=False, resume=True)
    assert [(h["step"], h["images_per_s"]) for h in res.history] == [(4, batch), (5, batch)]


def test_a_trainable_text_encoder_starts_from_the_same_weights_on_the_first_run_on_a_folder(
    tmp_path, tiny_ae, monkeypatch
):
    """The first run on a new image folder builds its caches, which may draw from the global RNG; the text encoder
    and the backbone must still start from the weights of every later run (the cache is then read, not built)."""
    import numpy as np
    from PIL import Image

    from ldmkit.distributed import World
    from ldmkit.training.runs import _denoiser_task

    monkeypatch.setenv("LDMKIT_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "captioned"
    root.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8), "L").save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"caption {i % 3}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    run = tiny_denoiser_run(
        tiny_ae,
        text_encoder="trainable",
        unet=attention_unet(),
        data=dict(dataset=str(root), holdout=0, crop="random"),
        train=dict(steps=1, num_workers=0),
    )

    def initial_weights():
        torch.manual_seed(run.train.seed)  # as train_denoiser does before building the task
        _, task = _denoiser_task(run, CPU, False, World())
        return {k: v.clone() for k, v in task.model.state_dict().items()}

    first, later = initial_weights(), initial_weights()
    assert any(k.startswith("text_encoder.") for k in first), sorted(first)[:5]
    for k in first:
        assert torch.equal(first[k], later[k]), k
