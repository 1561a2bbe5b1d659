"""Generation fails early and clearly: options checked where the request is built, output checked before sampling,
non-finite weights and latents named; what is written has the format its name says and a one-line caption."""

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from ldmkit import checkpoint
from ldmkit.cli import main
from ldmkit.data.images import _fit_text, save_grid
from ldmkit.diffusion.sample import sample_latents
from ldmkit.errors import CheckpointError, InputError, NonFiniteError, OutputWriteError
from ldmkit.ldm import LatentDiffusion
from ldmkit.pipelines import output as output_module
from ldmkit.pipelines import plan as plan_module
from ldmkit.pipelines.generate import generate, generate_to_file
from ldmkit.pipelines.request import SampleRequest


def _no_sampling(monkeypatch):
    """Make any sampling fail loudly, so a test shows that a check ran before the expensive work."""

    def boom(*a, **k):
        raise AssertionError("sampling started before the request was checked")

    monkeypatch.setattr(plan_module, "sample_latents", boom)


def _rewrite(src: Path, dst: Path, change_tensors=None, drop_meta=()):
    """A copy of checkpoint `src` with its tensors changed and some metadata keys removed."""
    with safe_open(str(src), framework="pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k not in drop_meta}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if change_tensors:
        change_tensors(tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


# --- numeric options (7, 15) ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, option",
    [
        ("cfg", math.nan, "--cfg"),
        ("cfg", math.inf, "--cfg"),
        ("eta", math.nan, "--eta"),
        ("eta", -0.5, "--eta"),
        ("seed", 2**70, "--seed"),
        ("seed", -1, "--seed"),
        ("n", 0, "--n"),
        ("steps", 0, "--steps"),
        ("steps", 10**7, "--steps"),
        ("batch_size", 0, "--batch-size"),
        ("cfg_rescale", 1.5, "--guidance-rescale"),
        ("cfg_rescale", math.nan, "--guidance-rescale"),
        ("height", -8, "--height"),
        ("width", -8, "--width"),
        ("sampler", "nope", "--sampler"),
    ],
)
def test_request_rejects_bad_numbers_naming_the_option(field, value, option):
    kw = {"sampler": "ddim"} if field == "eta" else {}
    with pytest.raises(InputError, match=option):
        SampleRequest(**{field: value, **kw})


def test_request_seed_range_counts_every_image_and_eta_needs_a_stochastic_sampler():
    SampleRequest(n=2, seed=2**63 - 2)  # the last image uses seed 2**63 - 1: fits a signed 64-bit integer
    with pytest.raises(InputError, match="--seed"):
        SampleRequest(n=2, seed=2**63 - 1)
    with pytest.raises(InputError, match="--eta"):
        SampleRequest(sampler="dpmpp_2m", eta=0.5)  # dpmpp_2m takes no eta: was a TypeError from the sampler
    SampleRequest(sampler="euler_ancestral", eta=0.5)


@pytest.mark.parametrize(
    "args, option",
    [
        (["--cfg", "nan"], "--cfg"),
        (["--cfg", "inf"], "--cfg"),
        (["--sampler", "ddim", "--eta", "nan"], "--eta"),
        (["--seed", str(2**70)], "--seed"),
        (["--batch-size", "0"], "--batch-size"),
    ],
)
def test_cli_sample_refuses_bad_numbers_in_one_line(tiny_ldm, tmp_path, capsys, args, option):
    out = tmp_path / "s.png"
    assert main(["sample", str(tiny_ldm), "--steps", "2", "--n", "2", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and option in err and "Traceback" not in err
    assert not out.exists()


# --- non-finite weights and latents (7) -----------------------------------------------------------------------------
def test_nan_weights_are_refused_at_load_naming_file_and_tensor(tiny_ldm, tmp_path, capsys):
    def poison(t):
        t["unet.conv_out.bias"] = torch.full_like(t["unet.conv_out.bias"], math.nan)

    assert "unet.conv_out.bias" in checkpoint.load(tiny_ldm)[0]
    bad = _rewrite(tiny_ldm, tmp_path / "nan.safetensors", poison)
    with pytest.raises(NonFiniteError, match="unet.conv_out.bias") as e:
        LatentDiffusion.load(bad)
    assert str(bad) in str(e.value)
    out = tmp_path / "s.png"
    assert main(["sample", str(bad), "--steps", "2", "--n", "1", "--out", str(out)]) == 2
    assert "not finite" in capsys.readouterr().err and not out.exists()


class _NanFrom:
    """A denoiser whose prediction turns NaN from its k-th call on (x0 = 0 before)."""

    def __init__(self, k):
        self.k, self.calls = k, 0

    def __call__(self, x, sigma, cond):
        self.calls += 1
        return torch.full_like(x, math.nan if self.calls > self.k else 0.0)


def test_sampling_names_the_first_step_with_non_finite_values():
    sigmas = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0])
    with pytest.raises(NonFiniteError, match="step 3 of 4"):
        sample_latents(
            _NanFrom(2),
            (1, 2, 4, 4),
            None,
            sampler="euler",
            sigmas=sigmas,
            device="cpu",
            generator=torch.Generator().manual_seed(0),
        )
    x = sample_latents(
        _NanFrom(99),
        (1, 2, 4, 4),
        None,
        sampler="euler",
        sigmas=sigmas,
        device="cpu",
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(x, torch.zeros_like(x))  # x0 = 0 everywhere: the ideal denoiser of a point mass at 0


def test_generate_blames_the_options_when_the_weights_are_finite(tiny_ldm):
    ldm = LatentDiffusion.load(tiny_ldm)
    real = ldm.denoiser

    class Overflowing:
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, x, sigma, cond):
            return real(x, sigma, cond) * math.inf

    ldm.denoiser = Overflowing()
    with pytest.raises(NonFiniteError, match=r"step 1 of 2.*--cfg 3\.0"):
        generate(ldm, SampleRequest(n=1, steps=2))


# --- captions (8, 13, 14) -------------------------------------------------------------------------------------------
def test_label_minus_one_is_captioned_unconditional(tiny_ldm):
    ldm = LatentDiffusion.load(tiny_ldm)
    _, captions = generate(ldm, SampleRequest(n=3, labels=[-1, 1, 0], steps=1))
    assert captions == ["unconditional", "bottom-right", "top-left"]


def test_fit_text_shows_newlines_as_spaces_and_cuts_long_text_fast(tmp_path):
    from PIL import ImageDraw, ImageFont

    draw, font = ImageDraw.Draw(Image.new("RGB", (10, 10))), ImageFont.load_default()
    assert _fit_text(draw, "red\napple", font, 1000) == "red apple"
    cut = _fit_text(draw, "x" * 200, font, 60)
    assert cut.endswith("...") and draw.textlength(cut, font=font) <= 60
    assert draw.textlength(cut[:-3] + "x...", font=font) > 60  # the longest prefix that fits
    t = time.perf_counter()
    save_grid(torch.zeros(2, 1, 16, 16), tmp_path / "g.png", labels=["lorem ipsum\n" * 900, "a\r\nb"])
    assert time.perf_counter() - t < 2.0


def test_newline_in_a_prompt_samples_and_writes(tiny_text_ldm, tmp_path, capsys):
    out = tmp_path / "s.png"
    assert (
        main(["sample", str(tiny_text_ldm), "--prompt", "red\napple", "--n", "1", "--steps", "1", "--out", str(out)])
        == 0
    ), capsys.readouterr().err
    with Image.open(out) as im:
        assert json.loads(im.text["ldmkit"])["prompts"] == ["red\napple"]


# --- output formats and locations (9, 14, 15) -----------------------------------------------------------------------
@pytest.mark.parametrize("suffix, fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP")])
def test_output_format_follows_the_extension_with_parameters(tiny_ldm, tmp_path, suffix, fmt):
    from ldmkit.checkpoint import file_sha256
    from ldmkit.data.images import read_parameters

    out = generate_to_file(tiny_ldm, SampleRequest(n=2, steps=1, seed=5), tmp_path / f"s{suffix}", progress=False)
    with Image.open(out[0]) as im:
        assert im.format == fmt
    params = json.loads(read_parameters(out[0])["ldmkit"])
    assert params["seed"] == 5 and params["weights_sha256"] == file_sha256(tiny_ldm)


@pytest.mark.parametrize("name", ["s.gif", "s.bmp", "s", "s.PNG.txt"])
def test_unsupported_extension_is_refused_before_sampling(tiny_ldm, tmp_path, monkeypatch, name):
    _no_sampling(monkeypatch)
    with pytest.raises(InputError, match=r"\.png, \.jpg, \.jpeg, \.webp"):
        generate_to_file(tiny_ldm, SampleRequest(n=1, steps=1), tmp_path / name)


def test_output_location_is_checked_before_sampling(tiny_ldm, tmp_path, monkeypatch):
    _no_sampling(monkeypatch)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.png").mkdir()
    req = SampleRequest(n=1, steps=1)
    with pytest.raises(InputError, match="afile"):
        generate_to_file(tiny_ldm, req, tmp_path / "afile" / "sub" / "s.png")  # a file where a folder must be
    with pytest.raises(InputError, match="is a folder"):
        generate_to_file(tiny_ldm, req, tmp_path / "adir.png")
    with pytest.raises(InputError, match="is a file"):
        generate_to_file(tiny_ldm, req, tmp_path / "afile", grid=False)  # --separate needs a folder
    with pytest.raises(InputError, match="label 7"):
        generate_to_file(tiny_ldm, SampleRequest(n=4, labels=[0, 7], steps=1, batch_size=1), tmp_path / "s.png")
    with pytest.raises(InputError, match="not text-conditional"):
        generate_to_file(tiny_ldm, SampleRequest(n=4, prompts=["a", "b"], steps=1, batch_size=1), tmp_path / "s.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.png", "afile"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_folder_is_refused_before_sampling(tiny_ldm, tmp_path, monkeypatch):
    _no_sampling(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(InputError, match="not writable"):
            generate_to_file(tiny_ldm, SampleRequest(n=1, steps=1), ro / "sub" / "s.png")
    finally:
        ro.chmod(0o700)


def test_ldm_file_without_autoencoder_metadata_is_a_checkpoint_error(tiny_ldm, tmp_path, capsys):
    bad = _rewrite(tiny_ldm, tmp_path / "noae.safetensors", drop_meta=("autoencoder",))
    with pytest.raises(CheckpointError, match="autoencoder") as e:
        LatentDiffusion.load(bad)
    assert str(bad) in str(e.value)
    assert main(["sample", str(bad), "--steps", "1", "--n", "1", "--out", str(tmp_path / "s.png")]) == 2
    assert "autoencoder" in capsys.readouterr().err


# --- batches, generators, progress (16) -----------------------------------------------------------------------------
def test_only_each_batchs_generators_are_built_and_image_i_ignores_the_batch_size(tiny_ldm, monkeypatch):
    ldm = LatentDiffusion.load(tiny_ldm)
    built = []
    real = plan_module.generators_from_seed

    def counting(seed, n):
        built.append(n)
        return real(seed, n)

    monkeypatch.setattr(plan_module, "generators_from_seed", counting)
    a, _ = generate(ldm, SampleRequest(n=5, steps=2, sampler="euler_ancestral", seed=3, batch_size=2))
    assert sum(built) == 5
    b, _ = generate(ldm, SampleRequest(n=5, steps=2, sampler="euler_ancestral", seed=3, batch_size=5))
    c, _ = generate(ldm, SampleRequest(n=2, steps=2, sampler="euler_ancestral", seed=6, labels=[1, 0], batch_size=1))
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a[3:5], c, atol=1e-5)


def test_progress_bar_over_image_steps_when_asked_at_any_batch_size(tiny_ldm, capsys):
    ldm = LatentDiffusion.load(tiny_ldm)
    generate(ldm, SampleRequest(n=3, steps=2, batch_size=2), progress=True)
    assert "6/6" in capsys.readouterr().err
    generate(ldm, SampleRequest(n=3, steps=1, batch_size=2))  # library default: quiet
    assert capsys.readouterr().err == ""
    generate(ldm, SampleRequest(n=3, steps=2, batch_size=4), progress=True)  # one batch: a bar too
    assert "6/6" in capsys.readouterr().err


# --- device (17) ----------------------------------------------------------------------------------------------------
def test_sample_on_missing_cuda_names_the_device_option(tiny_ldm, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["sample", str(tiny_ldm), "--device", "cuda", "--steps", "1", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert "--device cpu" in err and "train.device" not in err


def test_a_failed_write_after_sampling_keeps_the_images_elsewhere(tiny_ldm, tmp_path, monkeypatch):
    real = output_module.save_grid
    out = tmp_path / "s.png"

    def disk_full(images, path, **kw):
        if Path(path) == out:
            raise OSError(28, "No space left on device")
        return real(images, path, **kw)

    monkeypatch.setattr(output_module, "save_grid", disk_full)
    with pytest.raises(OutputWriteError, match="saved to") as e:  # an ldmkit error: the CLI prints one line
        generate_to_file(tiny_ldm, SampleRequest(n=2, steps=1), out, progress=False)
    assert isinstance(e.value, OSError)
    rescued = Path(str(e.value).split("saved to ")[1].split(" instead")[0])
    try:
        with Image.open(rescued) as im:
            assert im.format == "PNG" and json.loads(im.text["ldmkit"])["n"] == 2
    finally:
        rescued.unlink()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_folder_that_takes_no_files_is_refused_before_sampling(tiny_ldm, monkeypatch):
    """/proc passes a permission check for root but takes no new files: the probe finds out before any sampling."""

    def boom(*a, **kw):
        raise AssertionError("sampled although the output cannot be written")

    monkeypatch.setattr(plan_module, "sample_latents", boom)
    with pytest.raises(InputError, match="cannot write in /proc"):
        generate_to_file(tiny_ldm, SampleRequest(n=1, steps=1), "/proc/x.png", progress=False)


def test_separate_writes_each_image_alone_at_the_model_size(tiny_ldm, tmp_path):
    """--separate writes the images themselves: no grid frame, no caption strip, the model's own size."""
    paths = generate_to_file(
        tiny_ldm, SampleRequest(n=3, steps=1, batch_size=2), tmp_path / "s", grid=False, progress=False
    )
    assert [p.name for p in paths] == ["00000.png", "00001.png", "00002.png"]
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            assert im.size == (16, 16)
            assert json.loads(im.text["ldmkit"])["seed"] == i
