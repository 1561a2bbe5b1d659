"""The task registry: a new task is one Task subclass and one register call, with no edit anywhere else."""

import pytest
import torch
import torch.nn.functional as F

from ldmkit.config import ConfigError, DenoiserRun, from_dict
from ldmkit.diffusion.sample import sample_latents
from ldmkit.errors import InputError
from ldmkit.ldm import LatentDiffusion, LdmFile
from ldmkit.noise import generators_from_seed
from ldmkit.tasks import TASKS, Task, get_task, register, unregister
from ldmkit.tasks.registry import with_concat
from ldmkit.training import runs
from tests.factory import tiny_denoiser_run, tiny_unet


class Tint(Task):
    """A toy task defined here only: the denoiser also sees each image's mean brightness as a constant map."""

    name = "tint-test"
    summary = "a tint-conditioned model"
    needs = ": it needs a brightness"
    commands = ()
    trains_on_images = True
    from_noise = False

    def concat_channels(self, run, ae_cfg, current):
        return 1

    @staticmethod
    def brightness(x: torch.Tensor, size) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 1, *size)  # (B, 1, h, w)

    def training_inputs(self, trainer, idx, gens, x):
        z = trainer.encode_sample(x, gens)
        return z, with_concat(trainer.condition(idx, gens), self.brightness(x, z.shape[-2:]))

    def preview_inputs(self, trainer, n, cond, uncond, size):
        x = torch.stack([trainer.images[i % len(trainer.images)]["image"] for i in range(n)])
        b = self.brightness(x, size)
        return with_concat(cond, b), with_concat(uncond, b), None


def tint_run(tiny_ae, **train) -> DenoiserRun:
    """One training step of a tiny U-Net of the toy task on the tiny autoencoder's latents."""
    kw = dict(steps=1, batch_size=8, lr=1e-3, warmup_steps=1, log_every=1, ckpt_every=1, sample_every=0) | train
    return tiny_denoiser_run(tiny_ae, task="tint-test", data=dict(holdout=0), train=kw)


@pytest.fixture
def tint():
    task = register(Tint())
    yield task
    unregister(task.name)


def test_the_built_in_tasks_are_registered_with_what_they_take():
    assert {"control", "generate", "inpaint", "upscale"} <= set(TASKS)
    assert get_task("generate").from_noise and not get_task("inpaint").from_noise
    assert not get_task("upscale").user_labels and get_task("upscale").trains_on_images
    with pytest.raises(
        InputError, match="'paint' is not a task; use control or generate or inpaint or upscale or video"
    ):
        get_task("paint")
    with pytest.raises(ValueError, match="taken"):
        register(get_task("inpaint"))


def test_a_task_defined_in_a_test_trains_previews_saves_loads_and_samples(tmp_path, tiny_ae, blobs, monkeypatch, tint):
    monkeypatch.setattr(runs, "_datasets", lambda cfg, holdout: (blobs, None))
    assert from_dict(DenoiserRun, {"task": "tint-test"}).task == "tint-test"  # the config accepts it once registered
    runs.train_denoiser(tint_run(tiny_ae, sample_every=1), tmp_path / "run", progress=False)
    assert list((tmp_path / "run").glob("samples-*.png")), "the task's preview grid was drawn"

    path = tmp_path / "run" / "model.safetensors"
    assert LdmFile.read(path).run.task == "tint-test"
    ldm = LatentDiffusion.load(path)
    assert ldm.task_spec is tint and ldm.run.unet.in_channels == ldm.latent_channels + 1
    cond = tint.brightness(torch.full((2, 1, 16, 16), 0.5), (8, 8))
    z = sample_latents(
        ldm.denoiser,
        (2, ldm.latent_channels, 8, 8),
        with_concat(ldm.conditioning(labels=[0, 1]), cond),
        None,
        steps=2,
        generator=generators_from_seed(0, 2),
    )
    assert torch.isfinite(ldm.decode(z)).all()


def test_a_model_of_an_unregistered_task_says_so_when_it_is_used(tmp_path, tiny_ae, blobs, monkeypatch, tint):
    monkeypatch.setattr(runs, "_datasets", lambda cfg, holdout: (blobs, None))
    runs.train_denoiser(tint_run(tiny_ae), tmp_path / "run", progress=False)
    unregister("tint-test")
    with pytest.raises((InputError, ConfigError), match="tint-test"):
        _ = LatentDiffusion.load(tmp_path / "run" / "model.safetensors").task_spec
    register(tint)  # for the fixture's teardown


def test_inpainting_and_upscaling_keep_training_the_way_they_did(tmp_path, tiny_ae, blobs, monkeypatch):
    """The inputs the registry's inpaint task builds are the masked image's: mask at latent size, masked latents."""
    inpaint = get_task("inpaint")

    class Trainer:
        def __init__(self, ldm):
            self.ldm = ldm

    ldm = LatentDiffusion.load(_tiny_model(tmp_path, tiny_ae))
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    m = torch.zeros(2, 1, 16, 16)
    m[:, :, 4:9, 4:9] = 1
    concat = inpaint.masked_inputs(Trainer(ldm), x, m)
    assert torch.equal(concat[:, :1], F.max_pool2d(m, 2))
    assert torch.equal(concat[:, 1:], ldm.encode(x * (1 - m)))


def _tiny_model(tmp_path, tiny_ae):
    from ldmkit.autoencoder.files import load_autoencoder
    from ldmkit.denoisers.unet import UNet

    ae, ae_run = load_autoencoder(tiny_ae)
    cfg = tiny_unet(in_channels=2, out_channels=2)
    run = tiny_denoiser_run(tiny_ae, unet=cfg)
    path = tmp_path / "m.safetensors"
    LatentDiffusion(ae, ae_run.model, UNet(cfg), run).save(path, UNet(cfg).state_dict())
    return path
