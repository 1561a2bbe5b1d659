"""Latent super-resolution: `ldmkit train --task upscale`, the upscale pipeline (seeds, batches, tiles), the errors
for a model of the wrong task, and the command line."""

import json

import pytest
import torch
from PIL import Image

from ldmkit import checkpoint
from ldmkit.autoencoder.files import load_autoencoder
from ldmkit.cli import main
from ldmkit.conditioning.types import Conditioning
from ldmkit.config import DenoiserRun, UpscaleConfig, validate
from ldmkit.diffusion.lowres import augmentation_abar, downscale, noise_augment
from ldmkit.errors import ConfigError, InputError
from ldmkit.ldm import LatentDiffusion
from ldmkit.pipelines.generate import generate
from ldmkit.pipelines.inpaint import inpaint
from ldmkit.pipelines.request import SampleRequest
from ldmkit.pipelines.upscale import (
    TiledDenoiser,
    Tiling,
    UpscaleOptions,
    check_input_size,
    tiling_for,
    upscale,
)
from ldmkit.training import runs
from ldmkit.training.loop import STATE_FILE
from tests.factory import tiny_denoiser_run


def upscale_run(tiny_ae, steps=2, **kw) -> DenoiserRun:
    return tiny_denoiser_run(
        tiny_ae,
        task="upscale",
        upscale=UpscaleConfig(factor=2, max_noise_level=100, noise_level=10),
        data=dict(holdout=0),
        train=dict(steps=steps, batch_size=8, lr=1e-3, warmup_steps=1, ema_decay=0.9, log_every=1, **kw),
    )


@pytest.fixture
def data(monkeypatch, blobs):
    monkeypatch.setattr(runs, "_datasets", lambda cfg, holdout: (blobs, None))
    return blobs


@pytest.fixture
def upscaler(tmp_path, tiny_ae, data) -> LatentDiffusion:
    """A 2-step 2x upscaler trained on the blobs (8x8 -> 16x16)."""
    res = runs.train_denoiser(upscale_run(tiny_ae), tmp_path / "run", progress=False)
    return LatentDiffusion.load(res["checkpoint"])


def picture(h=8, w=8, seed=0):
    return torch.rand(1, 1, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- training -------------------------------------------------------------------------------------------------------


def test_training_records_the_task_the_concat_input_and_a_level_embedding(upscaler):
    run = upscaler.run
    assert run.task == "upscale" and run.upscale.factor == 2
    assert run.unet.in_channels == upscaler.latent_channels + 1  # latent + the (grayscale) low-resolution image
    assert run.unet.num_classes == 101  # one embedding row per augmentation level 0..100
    assert run.class_names == () and upscaler.num_classes == 0  # the blobs' labels are not the upscaler's


def test_upscale_resume_equals_an_uninterrupted_run(tmp_path, tiny_ae, data):
    """The degradation noise and levels come from the step's generator, so a resumed run is bit for bit the same."""
    run = upscale_run(tiny_ae, steps=4)
    runs.train_denoiser(run, tmp_path / "a", progress=False)
    runs.train_denoiser(run, tmp_path / "b", progress=False, stop_after=2)
    torch.manual_seed(123)  # a fresh process: other initial weights, replaced by the saved state
    runs.train_denoiser(run, tmp_path / "b", progress=False, resume=True)
    a, _ = checkpoint.load(tmp_path / "a" / STATE_FILE, "train-state")
    b, _ = checkpoint.load(tmp_path / "b" / STATE_FILE, "train-state")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_refuses_a_resolution_the_factor_cannot_divide(tmp_path, tiny_ae, data):
    run = upscale_run(tiny_ae)
    run = DenoiserRun(**{**run.__dict__, "upscale": UpscaleConfig(factor=3)})
    with pytest.raises(InputError, match="data.resolution"):
        runs.train_denoiser(run, tmp_path / "bad", progress=False)


def test_config_checks_the_noise_levels():
    with pytest.raises(ConfigError, match=r"upscale.noise_level = 400 is above upscale.max_noise_level = 350"):
        validate(DenoiserRun(upscale=UpscaleConfig(noise_level=400)))
    with pytest.raises(ConfigError, match="upscale.schedule"):
        validate(DenoiserRun(upscale=UpscaleConfig(schedule="squares")))
    with pytest.raises(ConfigError, match="upscale.factor"):
        validate(DenoiserRun(upscale=UpscaleConfig(factor=1)))


def test_a_whole_model_lends_its_autoencoder_to_a_new_run(upscaler, tmp_path):
    """`--autoencoder weights/emoji.safetensors`: training reads the autoencoder inside an ldm file."""
    ae, run = load_autoencoder(upscaler.source)
    assert run.model == upscaler.ae_config
    x = picture(16, 16)
    assert torch.allclose(ae.latents(x), upscaler.autoencoder.latents(x))


# --- augmentation ---------------------------------------------------------------------------------------------------


def test_noise_augmentation_follows_its_schedule():
    up = UpscaleConfig()
    abar = augmentation_abar(up)
    assert abar.shape == (1000,) and bool((abar[1:] < abar[:-1]).all())
    x, eps = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    out = noise_augment(x, torch.tensor([0, 350]), up, eps)
    assert torch.allclose(out[0], torch.full_like(out[0], float(abar[0].sqrt())))
    assert float(out[1].mean()) < float(out[0].mean())  # a higher level keeps less of the image
    assert downscale(torch.zeros(1, 3, 16, 12), 4).shape == (1, 3, 4, 3)
    with pytest.raises(InputError, match="do not divide"):
        downscale(torch.zeros(1, 3, 10, 12), 4)


# --- the pipeline ---------------------------------------------------------------------------------------------------


def test_upscale_enlarges_by_the_factor_and_does_not_depend_on_the_batch(upscaler):
    x = picture()
    req = SampleRequest(n=3, steps=3, seed=5, batch_size=3)
    out, _ = upscale(upscaler, x, req)
    assert out.shape == (3, 1, 16, 16) and bool(torch.isfinite(out).all())
    one_by_one, _ = upscale(upscaler, x, SampleRequest(n=3, steps=3, seed=5, batch_size=1))
    assert torch.allclose(out, one_by_one, atol=1e-5)
    second, _ = upscale(upscaler, x, SampleRequest(n=1, steps=3, seed=6))
    assert torch.allclose(out[1], second[0], atol=1e-5)  # image i uses seed + i
    assert (out[0] - out[1]).abs().max() > 1e-4  # two seeds, two images


def test_odd_sizes_are_padded_and_cropped_back(upscaler):
    out, _ = upscale(upscaler, picture(5, 7), SampleRequest(n=1, steps=2))
    assert out.shape == (1, 1, 10, 14)


def test_tiles_blend_to_the_untiled_result_for_a_pointwise_denoiser():
    """With a denoiser that looks at each position alone, every tile predicts what the whole would; the blend must
    reproduce it exactly: the weights sum to one everywhere and the conditioning is cut with the latent."""

    class Pointwise:
        def __call__(self, x, sigma, cond):
            assert len(cond.labels) == len(x) == len(sigma)  # every per-image tensor follows the tiles
            s = sigma.view(-1, 1, 1, 1) if sigma.ndim == 1 else sigma
            return torch.tanh(x) * 0.5 + cond.concat.mean(1, keepdim=True) / (1 + s)

    x = torch.randn(2, 4, 21, 30)
    cond = Conditioning(labels=torch.tensor([3, 3]), concat=torch.randn(2, 3, 21, 30))
    sigma = torch.tensor([0.7, 2.0])  # one per image, repeated for every tile of a batched call
    whole = Pointwise()(x, sigma.view(-1, 1, 1, 1), cond)
    for tile, overlap in ((8, 2), (8, 0), (16, 4), (40, 8)):
        for max_batch in (1, 5, 64):  # one tile per call, several, all at once
            tiled = TiledDenoiser(Pointwise(), Tiling(tile, overlap), max_batch)(x, sigma, cond)
            assert torch.allclose(tiled, whole, atol=1e-6), (tile, overlap, max_batch)


def test_tiling_covers_every_position_with_tiles_of_one_size():
    t = Tiling(8, 2)
    for length in (8, 9, 20, 33):
        starts = t.starts(length)
        assert starts[0] == 0 and starts[-1] == length - 8
        assert all(b - a <= 6 for a, b in zip(starts, starts[1:]))  # neighbours overlap by at least 2
    cover = torch.zeros(20, 33)
    for win in t.windows(20, 33):
        cover[win] += t.weight(20, 33, win)
    assert bool((cover > 0).all())


def test_an_image_within_one_tile_is_sampled_as_without_tiling(upscaler):
    x = picture()
    req = SampleRequest(n=1, steps=3, seed=1)
    plain, _ = upscale(upscaler, x, req)  # 8x8 input, 8x8 latent: the training size, one tile
    big_tile, _ = upscale(upscaler, x, req, UpscaleOptions(tile=64))
    assert torch.equal(plain, big_tile)
    tiled, _ = upscale(upscaler, picture(24, 20), req, UpscaleOptions(tile=8, overlap=2))
    assert tiled.shape == (1, 1, 48, 40) and bool(torch.isfinite(tiled).all())


def test_the_noise_level_reaches_the_model(upscaler):
    x, req = picture(), SampleRequest(n=1, steps=3, seed=1)
    low, _ = upscale(upscaler, x, req, UpscaleOptions(noise_level=0))
    high, _ = upscale(upscaler, x, req, UpscaleOptions(noise_level=100))
    assert (low - high).abs().max() > 1e-4


# --- errors ---------------------------------------------------------------------------------------------------------


def test_bad_upscale_requests_are_refused_naming_the_option(upscaler):
    x = picture()
    with pytest.raises(InputError, match=r"--noise-level 101 is outside the levels .* \(0 to 100\)"):
        upscale(upscaler, x, SampleRequest(n=1, steps=2), UpscaleOptions(noise_level=101))
    with pytest.raises(InputError, match="--noise-level"):
        UpscaleOptions(noise_level=-1)
    with pytest.raises(InputError, match="--tile"):
        UpscaleOptions(tile=2.5)
    with pytest.raises(InputError, match="must be a tensor"):  # it used to fail with an AttributeError
        upscale(upscaler, "small.png", SampleRequest(n=1, steps=2))
    with pytest.raises(InputError, match="takes no --label"):
        upscale(upscaler, x, SampleRequest(n=1, steps=2, labels=[1]))
    with pytest.raises(InputError, match="not text-conditional; drop --prompt"):
        upscale(upscaler, x, SampleRequest(n=1, steps=2, prompts=["a cat"]))
    with pytest.raises(InputError, match="--overlap 4 is not smaller than the tile of 4 input pixels"):
        upscale(upscaler, x, SampleRequest(n=1, steps=2), UpscaleOptions(tile=4, overlap=4))


def test_an_input_whose_output_would_pass_the_limit_is_refused_naming_it():
    check_input_size("a.png", 512, 512, 4)  # 2048 x 2048 out: the limit itself
    with pytest.raises(InputError, match=r"a.png is 513x512 pixels; upscaled 4x .* at most 262,144 pixels"):
        check_input_size("a.png", 513, 512, 4)


def test_models_of_the_wrong_task_are_refused_naming_their_task(upscaler, tiny_ldm):
    x = picture(16, 16)
    with pytest.raises(
        InputError,
        match=r"is an upscaler \(task upscale: it needs a low-resolution image\), so "
        r"`ldmkit inpaint` cannot use it; use `ldmkit upscale`",
    ):
        inpaint(upscaler, SampleRequest(n=1, steps=2), x, torch.ones(1, 1, 16, 16))
    with pytest.raises(InputError, match=r"task upscale.*`ldmkit generate` cannot use it"):
        generate(upscaler, SampleRequest(n=1, steps=2))
    with pytest.raises(InputError, match=r"is a generation model \(task generate\), so `ldmkit upscale` cannot"):
        upscale(LatentDiffusion.load(tiny_ldm), x, SampleRequest(n=1, steps=2))


# --- command line ---------------------------------------------------------------------------------------------------


def test_the_command_writes_the_enlarged_image_with_its_parameters(upscaler, tmp_path, capsys):
    src = tmp_path / "small.png"
    Image.fromarray((torch.rand(6, 10) * 255).byte().numpy(), "L").save(src)
    out = tmp_path / "big.png"
    argv = ["upscale", str(src), "--model", str(upscaler.source), "--steps", "2", "--out", str(out), "--quiet"]
    assert main([*argv, "--noise-level", "5"]) == 0
    img = Image.open(out)
    assert img.size == (20, 12)
    about = json.loads(img.info["ldmkit"])
    assert (
        about["image"] == {"name": src.name, "sha256": checkpoint.file_sha256(src)}
        and about["noise_level"] == 5
        and about["steps"] == 2
    )
    assert main([*argv, "--n", "2"]) == 0
    assert (tmp_path / "big-0.png").is_file() and (tmp_path / "big-1.png").is_file()


def test_the_command_refuses_a_generation_model_in_one_line(tiny_ldm, tmp_path, capsys):
    src = tmp_path / "small.png"
    Image.new("L", (8, 8)).save(src)
    assert main(["upscale", str(src), "--model", str(tiny_ldm), "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "task generate" in err and "ldmkit upscale" in err
    assert not (tmp_path / "o.png").exists()


def test_a_checkpoint_records_the_upscale_settings(upscaler):
    meta = checkpoint.read_metadata(upscaler.source)
    assert meta["config"]["task"] == "upscale"
    assert meta["config"]["upscale"] == {
        "factor": 2,
        "max_noise_level": 100,
        "noise_level": 10,
        "schedule": "scaled_linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
    }


def test_the_default_tile_is_twice_the_training_size_and_tiny_tiles_are_refused(upscaler):
    """--tile 1 was accepted and gave a mosaic, and the default tile (the training size) showed faint lines at tile
    borders on 32x32 inputs: the default is now twice the training size, and tiles under half of it are refused."""
    trained = upscaler.run.data.resolution // upscaler.factor  # latent pixels; 1 latent pixel per input pixel here
    assert tiling_for(upscaler, UpscaleOptions()).tile == 2 * trained
    assert tiling_for(upscaler, UpscaleOptions(tile=trained // 2)).tile == trained // 2
    with pytest.raises(InputError, match=r"--tile 1 is below the least useful tile of \d+ input pixels"):
        upscale(upscaler, picture(24, 20), SampleRequest(n=1, steps=2), UpscaleOptions(tile=1))
