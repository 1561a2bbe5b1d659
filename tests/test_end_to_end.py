"""Both stages trained for a few steps on real Fashion-MNIST images, then sampled with every sampler."""

import json
from pathlib import Path

import pytest
import torch

from ldmkit.config import AutoencoderRun, DenoiserRun, load_run
from ldmkit.ldm import LatentDiffusion
from ldmkit.pipelines.generate import generate
from ldmkit.pipelines.request import SampleRequest
from ldmkit.samplers import SAMPLERS
from ldmkit.training.runs import train_autoencoder, train_denoiser

pytestmark = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="needs Debian's dataset-fashion-mnist (make test installs it)",
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    ae_run = load_run(
        AutoencoderRun,
        "demo-autoencoder",
        [
            "data.limit=96",
            "data.holdout=16",
            "train.steps=4",
            "train.batch_size=8",
            "model.base_channels=16",
            "model.norm_groups=8",
            "loss.disc_start=2",
            "train.device=cpu",
        ],
    )
    ae = train_autoencoder(ae_run, out / "ae", progress=False)
    dn_run = load_run(
        DenoiserRun,
        "demo-denoiser",
        [
            f"autoencoder={ae['checkpoint']}",
            "data.limit=96",
            "train.steps=4",
            "train.batch_size=8",
            "unet.model_channels=16",
            "unet.norm_groups=8",
            "train.device=cpu",
        ],
    )
    dn = train_denoiser(dn_run, out / "ldm", progress=False)
    return out, ae, dn


def test_both_stages_write_checkpoints_logs_and_metrics(trained):
    out, ae, dn = trained
    assert Path(ae["checkpoint"]).is_file() and Path(dn["checkpoint"]).is_file()
    assert 0 < ae["holdout"]["ssim"] <= 1 and ae["holdout"]["n"] == 16 and ae["holdout"]["psnr"] > 0
    log = [json.loads(line) for line in (out / "ldm" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert dn["final_loss"] is not None


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_gives_finite_images_of_the_right_shape(trained, sampler):
    ldm = LatentDiffusion.load(trained[2]["checkpoint"])
    assert ldm.num_classes == 10 and ldm.class_names[9] == "Ankle boot"
    images, captions = generate(ldm, SampleRequest(n=3, labels=[0, 9], sampler=sampler, steps=4, cfg=2.0))
    assert images.shape == (3, 1, 32, 32) and torch.isfinite(images).all()
    assert captions[1] == "Ankle boot"


def test_same_seed_same_image_at_any_batch_size(trained):
    ldm = LatentDiffusion.load(trained[2]["checkpoint"])
    a, _ = generate(ldm, SampleRequest(n=4, labels=[3], sampler="euler_ancestral", steps=4, seed=7, batch_size=4))
    b, _ = generate(ldm, SampleRequest(n=4, labels=[3], sampler="euler_ancestral", steps=4, seed=7, batch_size=1))
    assert torch.equal(a, b)  # bit for bit on the CPU
    c, _ = generate(ldm, SampleRequest(n=4, labels=[3], sampler="euler_ancestral", steps=4, seed=8, batch_size=4))
    assert not torch.allclose(a, c, atol=1e-3)
