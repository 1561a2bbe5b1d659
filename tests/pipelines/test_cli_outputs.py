"""What the image commands write: never an input, never an existing file unless --overwrite, a single image as
itself, bounded RePaint options, progress on stderr."""

import json
import os
import sys
import threading

import pytest
import torch
from PIL import Image

import ldmkit.pipelines.generate as generate_module
from ldmkit.cli import main
from ldmkit.errors import InputError
from ldmkit.ldm import LatentDiffusion
from ldmkit.pipelines.generate import generate
from ldmkit.pipelines.img2img import img2img
from ldmkit.pipelines.inpaint import InpaintOptions, inpaint
from ldmkit.pipelines.output import claim
from ldmkit.pipelines.request import SampleRequest
from ldmkit.pipelines.upscale import UpscaleOptions, upscale
from ldmkit.samplers.repaint import repaint_steps
from ldmkit.training import runs
from tests.pipelines.test_upscale import upscale_run


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _png(path, value=100, size=16):
    Image.new("RGB", (size, size), (value, value, value)).save(path)
    return path


def _edit(command, image, model, *more):
    return (command, str(image), "--model", str(model), "--label", "0", "--n", "1", "--steps", "1", *more)


def _no_model(monkeypatch):
    """Loading the model fails the test: the refusal must come first."""

    def boom(*a, **kw):
        raise AssertionError("the model loaded although the output was refused")

    monkeypatch.setattr(generate_module.LatentDiffusion, "load", boom)


# --- item 1: never an input, never an existing file without --overwrite --------------------------------------------
def test_img2img_refuses_its_input_as_output_before_the_model_loads(capsys, tmp_path, tiny_ldm, monkeypatch):
    image = _png(tmp_path / "x.png")
    before = image.read_bytes()
    _no_model(monkeypatch)
    for out in (image, tmp_path / "." / "x.png"):
        code, _, err = run(capsys, *_edit("img2img", image, tiny_ldm, "--out", str(out), "--overwrite"))
        assert code == 2 and "is an input" in err and "--out" in err, err
    assert image.read_bytes() == before


def test_a_hard_link_of_the_input_is_refused_too(capsys, tmp_path, tiny_ldm, monkeypatch):
    image = _png(tmp_path / "x.png")
    os.link(image, tmp_path / "link.png")
    _no_model(monkeypatch)
    code, _, err = run(capsys, *_edit("img2img", image, tiny_ldm, "--out", str(tmp_path / "link.png"), "--overwrite"))
    assert code == 2 and "same file as" in err, err


def test_inpaint_refuses_the_mask_as_output(capsys, tmp_path, tiny_ldm, monkeypatch):
    image, mask = _png(tmp_path / "x.png"), _png(tmp_path / "m.png", 255)
    _no_model(monkeypatch)
    code, _, err = run(capsys, *_edit("inpaint", image, tiny_ldm, "--mask", str(mask), "--out", str(mask)))
    assert code == 2 and "is an input" in err, err


def test_a_second_run_writes_name_1_and_says_so(capsys, tmp_path, tiny_ldm):
    out = tmp_path / "s.png"
    args = ("sample", str(tiny_ldm), "--n", "2", "--steps", "1", "--quiet", "--out", str(out))
    assert run(capsys, *args)[0] == 0
    first = out.read_bytes()
    code, printed, err = run(capsys, *args, "--seed", "7")
    assert code == 0 and out.read_bytes() == first
    assert str(tmp_path / "s-1.png") in printed and "s.png exists" in err and "--overwrite" in err, err
    code, printed, err = run(capsys, *args, "--seed", "7")
    assert code == 0 and (tmp_path / "s-2.png").exists()
    code, printed, err = run(capsys, *args, "--seed", "7", "--overwrite")
    assert code == 0 and out.read_bytes() != first and "exists" not in err
    assert not (tmp_path / "s-3.png").exists()


def test_edits_never_replace_an_earlier_result(capsys, tmp_path, tiny_ldm):
    image, out = _png(tmp_path / "x.png"), tmp_path / "o.png"
    args = ("img2img", str(image), "--model", str(tiny_ldm), "--label", "0", "--n", "1", "--steps", "2", "--quiet")
    assert run(capsys, *args, "--out", str(out))[0] == 0
    first = out.read_bytes()
    code, printed, _ = run(capsys, *args, "--out", str(out), "--seed", "3")
    assert code == 0 and out.read_bytes() == first and "o-1.png" in printed


def test_a_failed_run_leaves_no_empty_claimed_file(capsys, tmp_path, tiny_ldm, monkeypatch):
    def fail(*a, **kw):
        raise InputError("stop here")

    monkeypatch.setattr(generate_module, "generate_batches", fail)
    code, _, err = run(capsys, "sample", str(tiny_ldm), "--n", "1", "--steps", "1", "--out", str(tmp_path / "s.png"))
    assert code == 2 and "stop here" in err
    assert list(tmp_path.iterdir()) == []


def test_claims_made_at_once_never_share_a_name(tmp_path):
    """O_EXCL: eight runs claiming the same output at the same time each get their own file."""
    (tmp_path / "o.png").write_bytes(b"earlier")
    got, barrier = [], threading.Barrier(8)

    def one():
        barrier.wait()
        got.append(claim([tmp_path / "o.png"], overwrite=False).paths[0])

    with pytest.warns(UserWarning):
        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(set(got)) == 8 and tmp_path / "o.png" not in got
    assert (tmp_path / "o.png").read_bytes() == b"earlier"


def test_out_without_extension_says_what_to_name(capsys, tmp_path, tiny_ldm):
    code, _, err = run(capsys, "sample", str(tiny_ldm), "--n", "2", "--out", str(tmp_path / "o_noext"))
    assert code == 2 and "no extension" in err and "o_noext.png" in err and "no extension is not" not in err, err


# --- item 2: RePaint's options bounded where they are read ----------------------------------------------------------
@pytest.mark.parametrize(
    "option, value", [("--resample", "99999999999999999999"), ("--resample", "1000000"), ("--jump", "10" * 12)]
)
def test_huge_repaint_options_are_refused_before_the_model_loads(
    capsys, tmp_path, tiny_ldm, monkeypatch, option, value
):
    image, mask = _png(tmp_path / "x.png"), _png(tmp_path / "m.png", 255)
    _no_model(monkeypatch)
    more = ("--mask", str(mask), option, value, "--out", str(tmp_path / "o.png"))
    code, _, err = run(capsys, *_edit("inpaint", image, tiny_ldm, *more))
    assert code == 2 and f"{option} {value} is out of range" in err and "between 1 and" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "o.png").exists()


# --- item 3: progress over the real work, on stderr ------------------------------------------------------------------
def test_one_image_shows_its_sampler_steps(tiny_ldm, capsys):
    ldm = LatentDiffusion.load(tiny_ldm)
    generate(ldm, SampleRequest(n=1, steps=3), progress=True)
    err = capsys.readouterr().err
    assert "1 image x 3 steps" in err and "3/3" in err, err
    generate(ldm, SampleRequest(n=1, steps=3))  # library default: quiet
    assert capsys.readouterr().err == ""


def test_img2img_counts_the_steps_its_strength_runs(tiny_ldm, capsys):
    ldm = LatentDiffusion.load(tiny_ldm)
    img2img(ldm, torch.zeros(1, 1, 16, 16), SampleRequest(n=2, steps=4, batch_size=1), 0.5, progress=True)
    err = capsys.readouterr().err
    assert "2 images x 2 steps" in err and "4/4" in err, err


def test_inpaint_progress_counts_repaints_whole_walk(tiny_ldm, capsys):
    ldm = LatentDiffusion.load(tiny_ldm)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    opts = InpaintOptions(resample=3, jump=1)
    walk = repaint_steps(3, 3, 1)  # 3 steps, each jump point walked down 3 times
    inpaint(ldm, SampleRequest(n=1, steps=3, labels=[0]), torch.zeros(1, 1, 16, 16), mask, opts, progress=True)
    err = capsys.readouterr().err
    assert walk == 7 and f"1 image x {walk} steps" in err and f"{walk}/{walk}" in err, err


@pytest.fixture
def upscaler(tmp_path, tiny_ae, monkeypatch, blobs):
    monkeypatch.setattr(runs, "_datasets", lambda cfg, holdout: (blobs, None))
    return runs.train_denoiser(upscale_run(tiny_ae), tmp_path / "run", progress=False)["checkpoint"]


def test_upscale_progress_counts_tiles_times_steps(upscaler, capsys):
    ldm = LatentDiffusion.load(upscaler)
    x = torch.zeros(1, 1, 16, 16)  # 32x32 out, latent 16x16: tiles of 8 (the training size) overlapping by 2
    tile = ldm.run.data.resolution // ldm.run.upscale.factor  # the training size in input pixels: 3 x 3 tiles
    upscale(ldm, x, SampleRequest(n=1, steps=2), UpscaleOptions(tile=tile), progress=True)
    err = capsys.readouterr().err
    assert "1 image x 9 tiles x 2 steps" in err and "18/18" in err, err


def test_the_command_shows_progress_on_a_terminal_unless_quiet(capsys, tmp_path, tiny_ldm, monkeypatch):
    image = _png(tmp_path / "x.png")
    args = _edit("img2img", image, tiny_ldm, "--steps", "4", "--strength", "1")
    assert run(capsys, *args, "--out", str(tmp_path / "a.png"))[2] == ""  # stderr is not a terminal: no bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, _, err = run(capsys, *args, "--out", str(tmp_path / "b.png"))
    assert code == 0 and "4/4" in err, err
    code, _, err = run(capsys, *args, "--out", str(tmp_path / "c.png"), "--quiet")
    assert code == 0 and err == "", err


# --- item 6 (command line): a single image as itself; generate --separate -----------------------------------------
def test_generate_one_image_writes_the_image_not_a_grid_of_one(capsys, tmp_path, tiny_ldm):
    out = tmp_path / "one.png"
    code, _, _ = run(
        capsys, "generate", "--model", str(tiny_ldm), "--label", "1", "--n", "1", "--steps", "1", "--out", str(out)
    )
    with Image.open(out) as im:
        assert code == 0 and im.size == (16, 16)  # the model's size: no frame, no caption strip
        about = json.loads(im.text["ldmkit"])
    assert about["n"] == 1 and about["seed"] == 0 and about["caption"]


def test_generate_separate_writes_one_file_per_image(capsys, tmp_path, tiny_ldm):
    code, printed, _ = run(
        capsys,
        "generate",
        "--model",
        str(tiny_ldm),
        "--label",
        "0",
        "--n",
        "3",
        "--steps",
        "1",
        "--separate",
        "--out",
        str(tmp_path / "many"),
    )
    assert code == 0 and sorted(p.name for p in (tmp_path / "many").iterdir()) == [
        "00000.png",
        "00001.png",
        "00002.png",
    ]
    assert printed.count("wrote") == 3


# --- smaller defects -----------------------------------------------------------------------------------------------
def test_sample_takes_every_prompt_given(capsys, tmp_path, tiny_text_ldm):
    out = tmp_path / "s"
    code, printed, _ = run(
        capsys,
        "sample",
        str(tiny_text_ldm),
        "--prompt",
        "red apple",
        "--prompt",
        "blue whale",
        "--n",
        "2",
        "--steps",
        "1",
        "--separate",
        "--out",
        str(out),
    )
    assert code == 0
    captions = [json.loads(Image.open(out / f"{i:05d}.png").text["ldmkit"])["caption"] for i in range(4)]
    assert captions == ["red apple", "red apple", "blue whale", "blue whale"]


def test_an_edit_refuses_a_repeated_prompt(capsys, tmp_path, tiny_text_ldm):
    image = _png(tmp_path / "x.png")
    with pytest.raises(SystemExit) as e:
        main(["img2img", str(image), "--model", str(tiny_text_ldm), "--prompt", "a", "--prompt", "b"])
    assert e.value.code == 2 and "--prompt was given twice" in capsys.readouterr().err


def test_outpaint_extend_0_says_it_was_given_and_adds_nothing(capsys, tmp_path, tiny_ldm):
    image = _png(tmp_path / "x.png")
    code, _, err = run(capsys, *_edit("outpaint", image, tiny_ldm, "--extend", "0"))
    assert code == 2 and "--extend 0 adds no border" in err and "give --extend PX" not in err, err


def test_upscale_of_a_huge_input_gives_the_upscalers_limit_not_itself(capsys, tmp_path, upscaler):
    image = tmp_path / "huge.png"
    Image.new("L", (2100, 2100), 90).save(image)  # past the editing limit, and past the upscaler's 1024x1024
    code, _, err = run(capsys, "upscale", str(image), "--model", str(upscaler), "--steps", "1")
    assert code == 2 and "upscaled 2x" in err and "ldmkit upscale" not in err, err
