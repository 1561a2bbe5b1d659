"""img2img (SDEdit): strength 0 is the autoencoder's round trip, strength 1 is generation, image i ignores the batch
size, any input size comes back at its size, files are read upright on white, and diffusers agrees."""

import json
import re

import pytest
import torch
from PIL import Image

from ldmkit.cli import build_parser, main
from ldmkit.conditioning.types import Conditioning
from ldmkit.data.images import read_parameters, to_tensor
from ldmkit.diffusion.sample import sample_latents, start_index
from ldmkit.errors import InputError, NonFiniteError
from ldmkit.ldm import LatentDiffusion
from ldmkit.pipelines.generate import generate
from ldmkit.pipelines.images import load_edit_image, pad_to_multiple, to_channels
from ldmkit.pipelines.img2img import check_strength, img2img, img2img_to_file
from ldmkit.pipelines.request import SampleRequest
from tests.tiny_sd import SD_SCHEDULE, sd_pipeline, tiny_sd


def image(h=16, w=16, c=1, seed=0, b=1):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def round_trip(ldm, x):
    """decode(encode(x)) at the model's padded size, cropped back."""
    padded, (h, w) = pad_to_multiple(x, ldm.factor * ldm.run.unet.factor)
    return ldm.decode(ldm.encode(padded)).cpu()[..., :h, :w]


@pytest.fixture(scope="module")
def ldm(tiny_ldm):
    return LatentDiffusion.load(tiny_ldm)


# --- the ends of the strength range ---------------------------------------------------------------------------------


def test_strength_0_returns_the_autoencoder_round_trip(ldm):
    x = image()
    out, captions = img2img(ldm, x, SampleRequest(n=1, steps=5, seed=3), 0.0)
    assert torch.equal(out, round_trip(ldm, x))
    assert captions == ["top-left"]
    out, _ = img2img(ldm, x, SampleRequest(n=3, steps=5, seed=3, batch_size=3), 0.0)
    assert torch.allclose(out, round_trip(ldm, x).expand(3, -1, -1, -1), atol=1e-5)  # batched decode


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral"])
def test_strength_1_equals_generation_with_the_same_seed(ldm, sampler):
    req = SampleRequest(n=3, labels=[1, 0], sampler=sampler, steps=3, seed=11, batch_size=2)
    a, ca = img2img(ldm, image(), req, 1.0)
    b, cb = generate(ldm, req)
    assert torch.equal(a, b) and ca == cb


def test_sample_latents_ends_start_from_pure_noise_and_from_init():
    """strength 1 ignores init exactly; strength 0 never calls the denoiser and returns init; between, the noise is
    the one sampling without init draws, scaled to sigmas[t_start]."""
    calls = []

    class Den(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def sigmas(self, steps):
            return torch.linspace(10, 0, steps + 1)

        def forward(self, x, sigma, cond=None):
            calls.append(float(sigma[0]))
            return x * 0.5

    init = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (4, 5)]  # noqa: E731
    kw = dict(sampler="euler", steps=10)
    plain = sample_latents(Den(), init.shape, Conditioning(), generator=gens(), **kw)
    assert torch.equal(sample_latents(Den(), init.shape, Conditioning(), generator=gens(), init=init, **kw), plain)
    calls.clear()
    out = sample_latents(Den(), init.shape, Conditioning(), generator=gens(), init=init, strength=0.0, **kw)
    assert torch.equal(out, init) and calls == []
    seen = []
    sample_latents(
        Den(),
        init.shape,
        Conditioning(),
        generator=gens(),
        init=init,
        strength=0.35,
        callback=lambda *a: seen.append(a),
        **kw,
    )
    noise = torch.stack([torch.randn(3, 4, 4, generator=g) for g in gens()])
    i, x, _, sigma = seen[0]
    assert len(seen) == 3 and float(sigma) == pytest.approx(3.0)  # int(10 * 0.35) = 3 steps, from sigmas[7] = 3
    assert torch.allclose(x, init + sigma * noise)
    with pytest.raises(InputError, match="shape"):
        sample_latents(Den(), (1, 3, 4, 4), Conditioning(), init=init, strength=0.5)


def test_the_finiteness_watch_counts_the_steps_img2img_runs():
    class NaNDen(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def sigmas(self, steps):
            return torch.linspace(10, 0, steps + 1)

        def forward(self, x, sigma, cond=None):
            return x * float("nan")

    init = torch.zeros(1, 2, 4, 4)
    with pytest.raises(NonFiniteError) as e:
        sample_latents(NaNDen(), init.shape, Conditioning(), sampler="euler", steps=10, init=init, strength=0.35)
    assert (e.value.step, e.value.steps) == (1, 3) and "step 1 of 3" in str(e.value)
    with pytest.raises(NonFiniteError, match="start latents"):
        sample_latents(NaNDen(), init.shape, Conditioning(), steps=10, init=init * float("nan"), strength=0.0)


@pytest.mark.parametrize(
    "steps,strength,t_start", [(10, 0.3, 7), (25, 0.75, 7), (10, 1.0, 0), (10, 0.0, 10), (3, 0.99, 1), (50, 0.8, 10)]
)
def test_start_index_is_diffusers_rule(steps, strength, t_start):
    assert start_index(steps, strength) == t_start


# --- batches, sizes, channels ---------------------------------------------------------------------------------------


def test_image_i_is_the_same_at_any_batch_size(ldm):
    x = image(seed=1)
    req = SampleRequest(n=5, labels=[0], sampler="euler_ancestral", steps=4, seed=2, batch_size=2)
    a, _ = img2img(ldm, x, req, 0.6)
    b, _ = img2img(ldm, x, SampleRequest(**{**req.__dict__, "batch_size": 5}), 0.6)
    c, _ = img2img(ldm, x, SampleRequest(**{**req.__dict__, "n": 2, "seed": 5, "batch_size": 1}), 0.6)
    assert torch.equal(a, b) and torch.equal(a[3:5], c)  # bit for bit on the CPU
    assert not torch.allclose(a[0], a[1], atol=1e-3)  # different seeds: different variations


def test_several_inputs_give_n_variations_each_in_order(ldm):
    x = image(b=2, seed=4)
    out, captions = img2img(ldm, x, SampleRequest(n=2, labels=[0, 1], steps=3, batch_size=3), 0.0)
    expected = round_trip(ldm, x)
    assert torch.allclose(out, expected.repeat_interleave(2, 0), atol=1e-5)
    assert captions == ["top-left", "bottom-right"] * 2


@pytest.mark.parametrize("size", [(13, 10), (16, 17), (5, 5)])
def test_a_size_that_is_not_a_multiple_comes_back_at_its_own_size(ldm, size):
    x = image(*size)
    out, _ = img2img(ldm, x, SampleRequest(n=2, steps=3), 0.5)
    assert out.shape == (2, 1, *size)
    out0, _ = img2img(ldm, x, SampleRequest(n=1, steps=3), 0.0)
    assert torch.equal(out0, round_trip(ldm, x))


def test_rgb_input_is_converted_to_the_models_channels(ldm):
    rgb = image(c=3, seed=7)
    gray = to_channels(rgb, 1)
    assert torch.allclose(gray[0, 0], 0.299 * rgb[0, 0] + 0.587 * rgb[0, 1] + 0.114 * rgb[0, 2])
    assert torch.equal(to_channels(gray, 3)[:, 2], gray[:, 0])
    a, _ = img2img(ldm, rgb, SampleRequest(n=1, steps=3), 0.0)
    assert torch.equal(a, round_trip(ldm, gray))


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), float("inf"), "x"])
def test_strength_outside_0_1_is_refused(ldm, strength):
    with pytest.raises(InputError, match="--strength"):
        img2img(ldm, image(), SampleRequest(n=1, steps=2), strength)
    with pytest.raises(InputError, match="--strength"):
        check_strength(strength)


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.rand(1, 1, 16, 16) * 255, r"x / 127.5 - 1"),
        (torch.full((1, 1, 16, 16), float("nan")), "NaN"),
        (torch.zeros(1, 16, 16), "batch dimension"),
        (torch.zeros(1, 4, 16, 16), "4 channels"),
        (torch.zeros(1, 1, 2049, 2048), "editing limit"),
    ],
)
def test_images_the_model_cannot_take_are_refused_in_one_line(ldm, bad, match):
    with pytest.raises(InputError, match=match) as e:
        img2img(ldm, bad, SampleRequest(n=1, steps=2), 0.5)
    assert "\n" not in str(e.value)


def test_size_options_are_refused(ldm):
    with pytest.raises(InputError, match="own size"):
        img2img(ldm, image(), SampleRequest(n=1, steps=2, height=32), 0.5)


# --- files and the command line -------------------------------------------------------------------------------------


def test_rgba_palette_and_exif_rotated_files_are_read_upright_on_white(ldm, tiny_ldm, tmp_path):
    rgba = Image.new("RGBA", (8, 6), (0, 0, 0, 255))
    rgba.putpixel((1, 1), (0, 0, 0, 0))  # transparent: white
    rgba.save(tmp_path / "a.png")
    x = load_edit_image(tmp_path / "a.png", 1)
    assert x.shape == (1, 1, 6, 8) and x[0, 0, 1, 1] == 1 and x[0, 0, 0, 0] == -1
    pal = Image.new("P", (8, 6))
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    pal.putpixel((2, 3), 1)
    pal.save(tmp_path / "p.png")
    assert load_edit_image(tmp_path / "p.png", 3)[0, :, 3, 2].tolist() == [1, 1, 1]
    rotated = Image.new("L", (10, 6), 0)
    rotated.putpixel((9, 0), 255)  # top-right as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated.save(tmp_path / "r.png", exif=exif.tobytes())
    up = load_edit_image(tmp_path / "r.png", 1)
    assert up.shape == (1, 1, 10, 6) and up[0, 0, 9, 5] == 1  # stored top-right -> displayed bottom-right
    # the file pipeline reads through load_edit_image: the upright size comes back, equal to the tensor pipeline's
    paths = img2img_to_file(tiny_ldm, tmp_path / "r.png", SampleRequest(n=1, steps=2), 0.0, tmp_path / "o.png")
    assert paths == [tmp_path / "o.png"]
    written = to_tensor(Image.open(paths[0]).convert("L"))[None]  # the edited image alone, at the input's size
    assert written.shape == (1, 1, 10, 6)
    assert (written - round_trip(ldm, up)).abs().max() <= 1 / 127.5 + 1e-6  # 8-bit rounding only


def test_cli_writes_the_edit_with_its_parameters(tiny_ldm, tmp_path, capsys):
    Image.new("L", (14, 12), 40).save(tmp_path / "in.png")
    out = tmp_path / "edit.png"
    argv = ["img2img", str(tmp_path / "in.png"), "--model", str(tiny_ldm), "--strength", "0.5", "--label", "1"]
    assert main(argv + ["--steps", "2", "--n", "3", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for i in range(3):  # one file per variation, each at the input's size, with its own seed
        path = tmp_path / f"edit-{i}.png"
        assert f"wrote {path}" in printed and Image.open(path).size == (14, 12)
        params = json.loads(read_parameters(path)["ldmkit"])
        assert params["strength"] == 0.5 and params["image"]["name"] == "in.png" and params["seed"] == i


@pytest.mark.parametrize(
    "args,kind",
    [
        (["--strength", "1.5"], "--strength 1.5 is outside [0, 1]"),
        (["--strength", "-1"], "--strength -1.0 is outside [0, 1]"),
        (["--strength", "nan"], "--strength nan is outside [0, 1]"),
    ],
)
def test_cli_refuses_a_bad_strength_in_one_line(tiny_ldm, tmp_path, capsys, args, kind):
    Image.new("L", (16, 16)).save(tmp_path / "in.png")
    argv = ["img2img", str(tmp_path / "in.png"), "--model", str(tiny_ldm), "--out", str(tmp_path / "o.png")]
    assert main(argv + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + kind) and err.count("\n") == 1
    assert not (tmp_path / "o.png").exists()


def test_cli_refuses_a_missing_image_in_one_line(tiny_ldm, tmp_path, capsys):
    argv = ["img2img", str(tmp_path / "nope.png"), "--model", str(tiny_ldm), "--out", str(tmp_path / "o.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: image {tmp_path / 'nope.png'} does not exist\n"


def test_cli_refuses_a_prompt_for_a_class_model(tiny_ldm, tmp_path, capsys):
    Image.new("L", (16, 16)).save(tmp_path / "in.png")
    assert main(["img2img", str(tmp_path / "in.png"), "--model", str(tiny_ldm), "--prompt", "a cat"]) == 2
    assert "not text-conditional" in capsys.readouterr().err


def test_text_model_takes_a_prompt(tiny_text_ldm):
    ldm = LatentDiffusion.load(tiny_text_ldm)
    req = SampleRequest(n=2, prompts=["a", "b"], negative_prompt="c", steps=3, seed=1)
    out, captions = img2img(ldm, image(12, 12), req, 0.7)
    assert out.shape == (2, 1, 12, 12) and captions == ["a", "b"]
    assert torch.equal(img2img(ldm, image(), req, 1.0)[0], generate(ldm, req)[0])


# --- parity with diffusers' StableDiffusionImg2ImgPipeline ------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_parts():
    """Tiny random diffusers U-Net and VAE (f=2), and the ldmkit model converted from them (tests/tiny_sd.py)."""
    diffusers = pytest.importorskip("diffusers")
    return (diffusers, *tiny_sd(diffusers))


@pytest.mark.parametrize("strength", [0.3, 0.8])
@pytest.mark.parametrize("sampler,scheduler", [("ddim", "DDIMScheduler"), ("euler", "EulerDiscreteScheduler")])
def test_img2img_matches_diffusers(sd_parts, strength, sampler, scheduler):
    """ldmkit img2img's final latents equal StableDiffusionImg2ImgPipeline's (output_type="latent") to 1e-4.

    Lined up so: both start from the same encoded latents, ldmkit's posterior mean (diffusers' img2img samples the
    posterior by default, so it is given the latents: a 4-channel `image` is taken as latents); diffusers' noise
    comes from one CPU generator per image seeded seed + i, as ldmkit draws it; the schedulers use
    timestep_spacing="trailing", ldmkit's default grid (diffusers' DDIM default is "leading"), and DDIM has
    set_alpha_to_one=True so that both grids end at sigma 0. Guidance 3 with the empty negative prompt.
    """
    diffusers, unet, vae, embeds, ldm = sd_parts
    n, steps, seed = 2, 10, 7
    x = image(c=3, seed=5)
    captured = []
    decode = ldm.decode
    ldm.decode = lambda z: captured.append(z) or decode(z)
    try:
        req = SampleRequest(n=n, prompts=["a cat"], sampler=sampler, steps=steps, cfg=3.0, seed=seed, batch_size=n)
        img2img(ldm, x, req, strength)
    finally:
        del ldm.decode
    ours = captured[0]

    extra = {"set_alpha_to_one": True, "clip_sample": False} if scheduler == "DDIMScheduler" else {}
    sched = getattr(diffusers, scheduler)(**SD_SCHEDULE, timestep_spacing="trailing", **extra)
    pipe = sd_pipeline(diffusers.StableDiffusionImg2ImgPipeline, unet, vae, sched)
    theirs = pipe(
        image=ldm.encode(x).expand(n, -1, -1, -1),
        prompt_embeds=embeds["a cat"].expand(n, -1, -1),
        negative_prompt_embeds=embeds[""].expand(n, -1, -1),
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=3.0,
        generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(n)],
        output_type="latent",
    ).images
    assert ours.shape == theirs.shape == (n, 4, 8, 8)
    err = (ours.double() - theirs.double()).abs().max() / theirs.double().abs().max()
    assert err < 1e-4, f"relative difference {err:.2e}"
    start = ldm.encode(x)
    assert (ours - start).abs().max() > 1e-3  # the comparison is not vacuous: sampling moved the latents


def test_the_size_limit_message_names_only_commands_that_exist(tmp_path):
    """It once sent users to `ldmkit upscale` before that command existed; every command it names must exist."""
    with pytest.raises(InputError, match="editing limit") as e:
        img2img(None, torch.zeros(1, 1, 2049, 2048), SampleRequest(n=1), 0.5)
    commands = build_parser()._subparsers._group_actions[0].choices
    assert all(c in commands for c in re.findall(r"`ldmkit ([a-z0-9-]+)", str(e.value))), str(e.value)
    assert "resize it" in str(e.value) and "`ldmkit upscale`" in str(e.value)
