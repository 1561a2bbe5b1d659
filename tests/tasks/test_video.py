"""The video task: an image model grows temporal layers through --init, trains them alone on moving-fashion clips,
and the saved video model loads and samples clips."""

import pytest
import torch

from ldmkit.config import DataConfig, DenoiserRun, TrainConfig
from ldmkit.data.moving_fashion import DIRECTIONS, MovingFashion
from ldmkit.denoisers.temporal import temporal_state
from ldmkit.diffusion.sample import sample_latents
from ldmkit.errors import InputError
from ldmkit.ldm import LatentDiffusion, LdmFile
from ldmkit.noise import generators_from_seed
from ldmkit.tasks import get_task
from ldmkit.training import runs

CLIPS = DataConfig(dataset="moving-fashion", resolution=16, channels=1, limit=8, frames=4, holdout=0)


def video_run(init, **train) -> DenoiserRun:
    kw = dict(steps=1, batch_size=4, lr=1e-3, warmup_steps=1, log_every=1, ckpt_every=1, sample_every=0)
    kw |= dict(ema_decay=0.0, trainable="temporal") | train
    return DenoiserRun(task="video", init=str(init), data=CLIPS, train=TrainConfig(**kw))


def test_moving_fashion_is_deterministic_and_captions_say_what_moves_where():
    a, b = MovingFashion(CLIPS), MovingFashion(CLIPS)
    assert len(a) == 8 and a.fingerprint() == b.fingerprint()
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x["image"].shape == (4, 1, 16, 16) and torch.equal(x["image"], y["image"])
        assert x["image"].min() >= -1 and x["image"].max() <= 1
        assert x["caption"] == a.captions[i] and x["caption"].startswith(("a ", "an "))
    # a moving item's centre goes the way its caption says
    big = MovingFashion(DataConfig(dataset="moving-fashion", resolution=64, channels=1, limit=200, frames=8))
    for i in range(len(big)):
        for t in big.spec(i):
            if t.motion in DIRECTIONS:
                (x0, y0), (x1, y1), (dx, dy) = t.centres[0], t.centres[-1], DIRECTIONS[t.motion]
                assert (x1 - x0) * dx >= 0 and (y1 - y0) * dy >= 0 and abs(x1 - x0) + abs(y1 - y0) > 10
            assert all(s / 2 <= c <= 64 - s / 2 + 1e-6 for (cx, cy), s in zip(t.centres, t.sides) for c in (cx, cy))


def test_an_image_model_trains_temporal_layers_alone_and_the_video_model_samples_clips(tmp_path, tiny_text_ldm):
    res = runs.train_denoiser(video_run(tiny_text_ldm), tmp_path / "run", progress=False)
    f = LdmFile.read(res["checkpoint"])
    temporal = temporal_state(LatentDiffusion.load(res["checkpoint"]).unet)
    assert res["trained_parameters"] == sum(v.numel() for v in temporal.values()) < res["parameters"]
    assert f.run.task == "video" and f.run.unet.temporal_heads > 0 and f.run.init_sha256
    parent = LdmFile.read(tiny_text_ldm)
    for k, v in parent.unet.items():  # the image layers were frozen
        assert torch.equal(f.unet[k], v.to(f.unet[k].dtype)), k
    assert set(f.unet) - set(parent.unet) == set(temporal)
    assert any(v.abs().sum() > 0 for k, v in f.unet.items() if "attn.proj_out" in k), "the temporal layers trained"

    ldm = LatentDiffusion.load(res["checkpoint"])
    assert ldm.task_spec is get_task("video")
    cond = ldm.conditioning(prompts=["a bag moving left", "a shirt growing"])
    z = sample_latents(
        ldm.denoiser,
        (2, 6, ldm.latent_channels, 8, 8),
        cond,
        ldm.null_conditioning(2),
        steps=2,
        cfg_scale=3.0,
        generator=generators_from_seed(0, 2),
    )
    assert z.shape == (2, 6, 2, 8, 8) and torch.isfinite(z).all()


def test_video_runs_refuse_what_they_cannot_train(tmp_path, tiny_text_ldm):
    with pytest.raises(InputError, match="temporal layers; a model of task generate has none"):
        run = video_run(tiny_text_ldm)
        runs.train_denoiser(DenoiserRun(init=run.init, data=run.data, train=run.train), tmp_path / "a", progress=False)
    with pytest.raises(InputError, match="data.frames=1: a training clip needs 2 to 32 frames"):
        run = video_run(tiny_text_ldm)
        runs.train_denoiser(
            DenoiserRun(task="video", init=run.init, data=DataConfig(**{**vars(CLIPS), "frames": 1}), train=run.train),
            tmp_path / "b",
            progress=False,
        )
