"""Inpainting and outpainting: masks, the latent blend, RePaint resampling, the exact pixel composite, the commands."""

import dataclasses
import json
import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.cli import main
from ldmkit.config import DenoiserConfig, DenoiserRun
from ldmkit.data.images import load_image, to_tensor
from ldmkit.denoisers.unet import UNet
from ldmkit.diffusion.guidance import InpaintBlend
from ldmkit.errors import InputError, MissingFileError
from ldmkit.ldm import LatentDiffusion
from ldmkit.noise import generators_from_seed
from ldmkit.pipelines import inpaint as inpaint_module
from ldmkit.pipelines.generate import generate
from ldmkit.pipelines.inpaint import InpaintOptions, concat_channels, inpaint, inpaint_to_file
from ldmkit.pipelines.masks import FEATHER_PX, composite, feather_alpha, latent_mask, load_mask
from ldmkit.pipelines.outpaint import Border, outpaint_canvas, outpaint_to_file
from ldmkit.pipelines.request import SampleRequest
from ldmkit.samplers import SAMPLERS
from ldmkit.samplers.repaint import repaint_segments, repaint_steps, sample_repaint
from ldmkit.tasks import get_task

SD = 0.5  # standard deviation of the toy data


def ideal(x, sigma):
    """The ideal denoiser of zero-mean Gaussian data of standard deviation SD."""
    return x * SD**2 / (sigma.view(-1, 1, 1, 1) ** 2 + SD**2)


def _png(path, arr):
    Image.fromarray(arr).save(path)
    return path


def _picture(tmp_path, h=16, w=16, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)
    return _png(tmp_path / "in.png", arr), arr


def _box_mask(tmp_path, h=16, w=16, box=(4, 10, 5, 12), name="mask.png"):
    arr = np.zeros((h, w), np.uint8)
    arr[box[0] : box[1], box[2] : box[3]] = 255
    return _png(tmp_path / name, arr), arr > 0


@pytest.fixture(scope="module")
def ldm(tiny_ldm):
    return LatentDiffusion.load(tiny_ldm)


# --- masks ----------------------------------------------------------------------------------------------------------


def test_mask_is_thresholded_at_half_grey_and_sizes_must_match(tmp_path):
    arr = np.array([[0, 127, 128, 255]] * 4, np.uint8)
    path = _png(tmp_path / "m.png", arr)
    m = load_mask(path, (4, 4))
    assert m.shape == (1, 1, 4, 4) and m[0, 0, 0].tolist() == [0, 0, 1, 1]
    with pytest.raises(InputError, match=r"is 4x4 pixels but the image is 8x6.*--resize-mask"):
        load_mask(path, (6, 8))
    big = load_mask(path, (8, 8), resize=True)  # nearest neighbour: each column doubled
    assert big.shape == (1, 1, 8, 8) and big[0, 0, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(MissingFileError, match="mask .*nope.png does not exist; give an image file, white"):
        load_mask(tmp_path / "nope.png", (4, 4))


def test_transparent_palette_and_16_bit_masks(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0, 3] = 255  # one opaque black pixel; the transparent rest is composited on white: regenerated
    assert load_mask(_png(tmp_path / "a.png", rgba), (2, 2))[0, 0].tolist() == [[0, 1], [1, 1]]
    pal = Image.new("P", (2, 2))
    pal.putdata([0, 1, 1, 0])
    pal.putpalette([0, 0, 0, 255, 255, 255])
    pal.save(tmp_path / "p.png")
    assert load_mask(tmp_path / "p.png", (2, 2))[0, 0].tolist() == [[0, 1], [1, 0]]
    deep = Image.fromarray(np.array([[0, 65535], [30000, 40000]], np.uint16))
    assert deep.mode.startswith("I;16")
    deep.save(tmp_path / "d.png")
    assert load_mask(tmp_path / "d.png", (2, 2))[0, 0].tolist() == [[0, 1], [0, 1]]


def test_latent_mask_regenerates_a_cell_when_any_of_its_pixels_is():
    m = torch.zeros(1, 1, 4, 4)
    m[..., 1, 2] = 1
    assert latent_mask(m, 2)[0, 0].tolist() == [[0, 1], [0, 0]]
    with pytest.raises(InputError, match="not a multiple of the autoencoder's factor 2"):
        latent_mask(torch.zeros(1, 1, 5, 4), 2)


def test_composite_keeps_the_outside_exactly_and_feathers_only_inside():
    m = torch.zeros(1, 1, 12, 12)
    m[..., 2:11, 2:11] = 1  # a 9x9 square: distance to the outside 1..5
    alpha = feather_alpha(m, 2)
    torch.testing.assert_close(alpha[0, 0, 6, :7], torch.tensor([0, 0, 1 / 3, 2 / 3, 1, 1, 1]))
    assert (alpha[m == 0] == 0).all() and torch.equal(feather_alpha(m, 0), m)
    with pytest.warns(UserWarning, match="--feather 10000000 is shortened to 2 pixels"):
        huge = feather_alpha(m, 10**7)  # capped at half the mask's width: its middle is the generated image
    torch.testing.assert_close(huge[0, 0, 6, :7], torch.tensor([0, 0, 1 / 3, 2 / 3, 1, 1, 1]))
    original, generated = torch.rand(1, 1, 12, 12) * 2 - 1, torch.rand(3, 1, 12, 12) * 2 - 1
    out = composite(original, generated, m, 2)
    assert torch.equal(out[:, :, m[0, 0] == 0], original[:, :, m[0, 0] == 0].expand(3, -1, -1))
    assert torch.equal(out[:, :, 6, 6], generated[:, :, 6, 6])
    full = torch.ones(1, 1, 12, 12)  # the image border is no kept pixel: a full mask is all generated
    assert torch.equal(composite(original, generated, full, 3), generated)


# --- the latent blend and RePaint -----------------------------------------------------------------------------------


def _toy(b=2, seed=0):
    x0 = torch.randn(b, 1, 4, 4, generator=torch.Generator().manual_seed(seed)) * SD
    keep = torch.zeros(1, 1, 4, 4)
    keep[..., :2] = 1  # keep the left half
    return x0, keep


def test_repaint_segments_known_walk():
    assert repaint_segments(6, 1, 2) == [(0, 6)]  # R = 1: no resampling, one plain walk
    assert repaint_segments(6, 2, 2) == [(0, 2), (0, 2), (2, 4), (2, 4), (4, 6)]
    assert repaint_segments(5, 3, 2) == [(0, 2), (0, 2), (0, 2), (2, 4), (2, 4), (2, 4), (4, 5)]
    assert repaint_steps(6, 2, 2) == 10
    with pytest.raises(InputError, match="--jump 4 must be smaller than --steps 4"):
        sample_repaint(ideal, torch.zeros(1, 1, 2, 2), torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0]), resample=2, jump=4)


@pytest.mark.parametrize("resample", [1, 3])
def test_known_latent_region_is_the_original_at_the_end(resample):
    x0, keep = _toy()
    gens = generators_from_seed(0, 2)
    blend = InpaintBlend(ideal, x0, keep, gens)
    sigmas = torch.tensor([20.0, 8.0, 3.0, 1.0, 0.3, 0.0])
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 20
    out = sample_repaint(blend, x, sigmas, generator=gens, step=SAMPLERS["euler_ancestral"], resample=resample, jump=2)
    torch.testing.assert_close(out[..., :2], x0[..., :2])
    assert not torch.allclose(out[..., 2:], x0[..., 2:], atol=1e-2)


def test_repaint_with_one_pass_is_the_plain_blend():
    x0, keep = _toy()
    sigmas = torch.tensor([20.0, 8.0, 3.0, 1.0, 0.3, 0.0])
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 20
    runs = []
    for repaint in (False, True):
        gens = generators_from_seed(0, 2)
        blend = InpaintBlend(ideal, x0, keep, gens)
        fn = SAMPLERS["euler_ancestral"]
        if repaint:
            runs.append(sample_repaint(blend, x, sigmas, generator=gens, step=fn, resample=1, jump=2))
        else:
            runs.append(fn(blend, x, sigmas, generator=gens))
    assert torch.equal(*runs)


def test_repaint_keeps_the_data_distribution():
    """Driven by the ideal Gaussian denoiser, the generated region must come out with standard deviation SD
    however many times the walk goes back up."""
    x0 = torch.zeros(4000, 1, 2, 2)
    keep = torch.zeros(1, 1, 2, 2)
    keep[..., 0] = 1
    gen = torch.Generator().manual_seed(0)
    sigmas = torch.cat([torch.exp(torch.linspace(np.log(40.0), np.log(0.01), 60)), torch.zeros(1)])
    x = torch.randn(x0.shape, generator=gen) * sigmas[0]
    blend = InpaintBlend(ideal, x0, keep, gen)
    out = sample_repaint(blend, x, sigmas, generator=gen, step=SAMPLERS["heun"], resample=3, jump=5)
    assert abs(float(out[..., 1].std()) - SD) < 0.02 and float(out[..., 0].abs().max()) < 1e-6


# --- the pipeline ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resample", [1, 2])
def test_unmasked_pixels_survive_writing_exactly(tmp_path, tiny_ldm, resample):
    image, arr = _picture(tmp_path)
    mask, where = _box_mask(tmp_path)
    req = SampleRequest(n=2, labels=[1], steps=4, sampler="euler", seed=3, batch_size=2)
    opts = InpaintOptions(resample=resample, jump=2)
    paths = inpaint_to_file(tiny_ldm, req, image, mask, tmp_path / "out.png", opts, progress=False)
    assert [p.name for p in paths] == ["out-0.png", "out-1.png"]
    for i, p in enumerate(paths):
        got = np.asarray(load_image(p, 1))
        assert got.shape == arr.shape and (got[~where] == arr[~where]).all()
        assert (got[where] != arr[where]).any()  # the masked box is regenerated
        params = json.loads(Image.open(p).text["ldmkit"])
        assert params["seed"] == 3 + i and params["mask"]["name"] == mask.name and params["resample"] == resample


def test_image_i_is_the_same_at_any_batch_size(tmp_path, ldm):
    image, _ = _picture(tmp_path)
    x = to_tensor(load_image(image, 1))[None]  # (1, 1, 16, 16)
    m = torch.zeros(1, 1, 16, 16)
    m[..., 3:9, 6:14] = 1
    opts = InpaintOptions(resample=2, jump=2)
    kw = dict(n=3, labels=[0, 1], sampler="euler_ancestral", steps=4, seed=11)
    a, _ = inpaint(ldm, SampleRequest(**kw, batch_size=3), x, m, opts)
    b, _ = inpaint(ldm, SampleRequest(**kw, batch_size=1), x, m, opts)
    assert torch.equal(a, b)  # bit for bit on the CPU
    c, _ = inpaint(ldm, SampleRequest(**{**kw, "seed": 12}, batch_size=3), x, m, opts)
    assert not torch.allclose(a[:, :, 3:9, 6:14], c[:, :, 3:9, 6:14], atol=1e-3)


def test_full_mask_is_generation_with_the_same_seed(ldm):
    x = torch.zeros(1, 1, 16, 16)
    req = SampleRequest(n=2, labels=[1], steps=3, seed=5, cfg=2.0)
    edited, _ = inpaint(ldm, req, x, torch.ones(1, 1, 16, 16))
    generated, _ = generate(ldm, req)
    assert torch.allclose(edited, generated, atol=1e-6)


def test_empty_mask_returns_the_input_without_sampling(ldm, monkeypatch):
    def no_sampling(*a, **k):
        raise AssertionError("sampled with an empty mask")

    monkeypatch.setattr(inpaint_module, "draw", no_sampling)
    x = torch.rand(1, 1, 16, 16) * 2 - 1
    with pytest.warns(UserWarning, match="mask is all black"):
        out, _ = inpaint(ldm, SampleRequest(n=2, labels=[0], steps=2), x, torch.zeros(1, 1, 16, 16))
    assert torch.equal(out, x.expand(2, -1, -1, -1))


def test_text_model_and_sizes_that_are_not_a_multiple(tmp_path, tiny_text_ldm):
    image, arr = _picture(tmp_path, 13, 15)
    mask, where = _box_mask(tmp_path, 13, 15, box=(0, 6, 0, 7))
    req = SampleRequest(n=1, prompts=["a cat"], steps=3, cfg=2.0, negative_prompt="dog")
    [p] = inpaint_to_file(tiny_text_ldm, req, image, mask, tmp_path / "o.webp", InpaintOptions(), progress=False)
    assert Image.open(p).size == (15, 13) and p.suffix == ".webp"


def test_models_with_other_concat_channels_are_refused():
    def fake(in_channels: int, kind: str = "unet"):
        run = DenoiserRun(denoiser=DenoiserConfig(kind=kind))
        run = run.with_backbone(dataclasses.replace(run.backbone, in_channels=in_channels))
        return types.SimpleNamespace(run=run, latent_channels=4, source="sd-up", task_spec=get_task("generate"))

    for kind in ("unet", "dit"):  # whichever backbone the run names
        with pytest.raises(InputError, match="sd-up takes 4 concatenated input channels, not the inpainting layout"):
            concat_channels(fake(8, kind))
        assert concat_channels(fake(9, kind)) == 5


def test_dedicated_inpainting_model_gets_mask_and_masked_latents(tmp_path, ldm):
    """A U-Net with 2 + 1 + 2 input channels sees cat([mask at latent size, latents of the masked image]) in
    both guidance branches, and the unmasked pixels are kept."""
    cfg = dataclasses.replace(ldm.run.unet, in_channels=5)
    torch.manual_seed(0)
    unet = UNet(cfg)
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model = LatentDiffusion(ldm.autoencoder, ldm.ae_config, unet, dataclasses.replace(ldm.run, unet=cfg))
    seen = []
    forward = unet.forward
    unet.forward = lambda x, t, cond: seen.append(cond.concat) or forward(x, t, cond)
    x = torch.rand(1, 1, 16, 16) * 2 - 1
    m = torch.zeros(1, 1, 16, 16)
    m[..., 4:8, 2:10] = 1
    out, _ = inpaint(model, SampleRequest(n=2, labels=[1], steps=2, cfg=2.0), x, m)
    expected = torch.cat([m[..., ::2, ::2], model.encode(x * (1 - m))], 1)  # (1, 3, 8, 8)
    assert len(seen) == 2 and seen[0].shape == (4, 3, 8, 8)  # cond and uncond in one pass
    torch.testing.assert_close(seen[0], expected.expand(4, -1, -1, -1))
    assert torch.equal(out[:, :, m[0, 0] == 0], x[:, :, m[0, 0] == 0].expand(2, -1, -1))


def test_mask_tensors_are_checked(ldm):
    x, req = torch.zeros(1, 1, 16, 16), SampleRequest(n=1, steps=2)
    with pytest.raises(InputError, match=r"mask must be a tensor \(1, 1, H, W\).*got \(1, 3, 16, 16\)"):
        inpaint(ldm, req, x, torch.ones(1, 3, 16, 16))
    with pytest.raises(InputError, match=r"mask size \(8, 8\) differs from the image's \(16, 16\)"):
        inpaint(ldm, req, x, torch.ones(1, 1, 8, 8))


def test_options_are_checked():
    with pytest.raises(InputError, match="--resample 0 is out of range"):
        InpaintOptions(resample=0)
    with pytest.raises(InputError, match="--feather -1 is out of range"):
        InpaintOptions(feather=-1)


# --- outpainting ----------------------------------------------------------------------------------------------------


def test_outpaint_canvas_and_border():
    x = torch.arange(6.0).view(1, 1, 2, 3)
    canvas, mask = outpaint_canvas(x, Border(left=1, top=2))
    assert canvas.shape == mask.shape == (1, 1, 4, 4)
    assert canvas[0, 0, 0].tolist() == [0, 0, 1, 2] and torch.equal(canvas[..., 2:, 1:], x)
    assert mask[0, 0].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 0]]
    assert Border.of(3, right=0) == Border(3, 0, 3, 3)
    with pytest.raises(InputError, match="--extend -4 is out of range"):
        Border.of(-4)
    with pytest.raises(InputError, match="nothing to outpaint"):
        Border.of(0)


@pytest.mark.parametrize("size,border", [((16, 16), Border.of(4)), ((13, 15), Border(left=2, top=1, bottom=3))])
def test_outpaint_enlarges_and_keeps_the_original(tmp_path, tiny_ldm, size, border):
    image, arr = _picture(tmp_path, *size)
    req = SampleRequest(n=1, labels=[0], steps=3, seed=1)
    [p] = outpaint_to_file(tiny_ldm, req, image, border, tmp_path / "big.png", progress=False)
    got = np.asarray(load_image(p, 1))
    h, w = size
    assert got.shape == (h + border.top + border.bottom, w + border.left + border.right)
    assert (got[border.top : border.top + h, border.left : border.left + w] == arr).all()


# --- the commands ---------------------------------------------------------------------------------------------------


def _cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inpaint_and_outpaint_commands(capsys, tmp_path, tiny_ldm):
    image, arr = _picture(tmp_path)
    mask, where = _box_mask(tmp_path, 8, 8, box=(2, 5, 2, 5))
    out = tmp_path / "i.png"
    common = ["--model", str(tiny_ldm), "--label", "1", "--steps", "3", "--quiet"]
    code, printed, err = _cli(capsys, "inpaint", str(image), "--mask", str(mask), *common, "--out", str(out))
    assert code == 2 and "is 8x8 pixels but the image is 16x16" in err and "\n" not in err.strip()
    argv = ["inpaint", str(image), "--mask", str(mask), "--resize-mask", "--resample", "2", "--jump", "1"]
    code, printed, err = _cli(capsys, *argv, *common, "--out", str(out))
    assert code == 0 and f"wrote {out}" in printed
    grown = np.asarray(load_mask(mask, (16, 16), resize=True)[0, 0]) > 0
    assert (np.asarray(load_image(out, 1))[~grown] == arr[~grown]).all()
    code, printed, _ = _cli(capsys, "outpaint", str(image), "--right", "4", *common, "--out", str(tmp_path / "w.png"))
    assert code == 0 and Image.open(tmp_path / "w.png").size == (20, 16)


def test_command_mistakes_are_one_line(capsys, tmp_path, tiny_ldm):
    image, _ = _picture(tmp_path)
    common = ["--model", str(tiny_ldm), "--quiet"]
    code, _, err = _cli(capsys, "inpaint", str(image), "--mask", str(tmp_path / "none.png"), *common)
    assert code == 2 and err.startswith("error: mask") and "none.png does not exist" in err
    assert err.count("\n") == 1
    code, _, err = _cli(capsys, "outpaint", str(image), "--extend", "-4", *common)
    assert code == 2 and "--extend -4 is out of range" in err and err.count("\n") == 1
    code, _, err = _cli(capsys, "outpaint", str(image), *common)
    assert code == 2 and "nothing to outpaint" in err
    argv = ["inpaint", str(image), "--mask", str(image), *common, "--steps", "3", "--resample", "2"]
    code, _, err = _cli(capsys, *argv)
    assert code == 2 and "--jump 5 must be smaller than --steps 3" in err and err.count("\n") == 1


def test_empty_mask_command_writes_the_input_unchanged(capsys, tmp_path, tiny_ldm):
    image, arr = _picture(tmp_path)
    black = _png(tmp_path / "black.png", np.zeros((16, 16), np.uint8))
    out = tmp_path / "same.png"
    argv = ["inpaint", str(image), "--mask", str(black), "--model", str(tiny_ldm), "--out", str(out)]
    code, _, err = _cli(capsys, *argv)
    assert code == 0 and err.strip() == (
        "warning: the mask is all black, so nothing is regenerated; the input is written unchanged, with no "
        "generation record, watermark or credentials (nothing in it was generated)"
    )
    assert (np.asarray(load_image(out, 1)) == arr).all() and "ldmkit" not in Image.open(out).text


@pytest.mark.parametrize("feather", [16, 10**9])
def test_a_wide_feather_still_regenerates_the_middle_of_a_hole(feather):
    """A 16x16 hole with --feather 16 (or 10**9) realised 22% (or none) of the change: the ramp now takes at most
    a quarter of the hole's width from each side, so the middle 8x8 is the generated image and most of the change
    is kept."""
    m = torch.zeros(1, 1, 64, 64)
    m[..., 24:40, 24:40] = 1
    original, generated = torch.zeros(1, 3, 64, 64), torch.ones(1, 3, 64, 64)
    with pytest.warns(UserWarning, match=f"--feather {feather} is shortened"):
        out = composite(original, generated, m, feather)
    assert torch.equal(out[..., 28:36, 28:36], generated[..., 28:36, 28:36])
    assert float(out[..., 24:40, 24:40].mean()) > 0.6
    assert torch.equal(out[..., m[0, 0] == 0], original[..., m[0, 0] == 0])


def test_the_ramp_is_shortened_per_part_of_the_mask_and_quietly_at_the_default():
    """Each part of a mask gets a ramp of at most a quarter of its own width: a thin stroke beside a big hole is fully
    regenerated along its middle, while the big hole keeps the whole ramp; the default feather warns of nothing."""
    m = torch.zeros(1, 1, 64, 64)
    m[..., 2:60, 2:40] = 1  # 58 x 38: wide enough for a ramp of 8
    m[..., 40:46, 40:62] = 1  # a stroke 6 pixels wide
    with pytest.warns(UserWarning, match="--feather 8 is shortened to 8 pixels at most"):
        alpha = feather_alpha(m, 8)
    torch.testing.assert_close(alpha[0, 0, 30, 2:11], torch.arange(1, 10) / 9)
    assert alpha[0, 0, 40:46, 50].tolist() == [0.5, 1, 1, 1, 1, 0.5]  # half-width 3: a ramp of 2 at most
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feather_alpha(m, FEATHER_PX)
