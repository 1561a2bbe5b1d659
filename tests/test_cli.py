"""The command line's error handling: bad input gets a clear message and a non-zero exit."""
import json

import pytest
import torch

from ldmkit import checkpoint
from ldmkit.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_missing_checkpoint(capsys, tmp_path):
    code, _, err = run(capsys, "sample", str(tmp_path / "nope.safetensors"))
    assert code == 2 and "does not exist" in err


def test_wrong_kind(capsys, tmp_path):
    path = checkpoint.save(tmp_path / "ae.safetensors", {"w": torch.zeros(1)}, "autoencoder", {})
    code, _, err = run(capsys, "sample", str(path))
    assert code == 2 and "holds a 'autoencoder' checkpoint, but a 'ldm'" in err


def test_unknown_sampler_lists_known(capsys, tiny_ldm):
    code, _, err = run(capsys, "sample", str(tiny_ldm), "--sampler", "plms", "--n", "1")
    assert code == 2 and "plms" in err and "dpmpp_2m" in err and "euler" in err


def test_label_out_of_range_lists_classes(capsys, tiny_ldm):
    code, _, err = run(capsys, "sample", str(tiny_ldm), "--label", "7", "--n", "1", "--steps", "2")
    assert code == 2 and "label 7 is out of range" in err and "1=bottom-right" in err


def test_info_prints_config(capsys, tiny_ldm):
    code, out, _ = run(capsys, "info", str(tiny_ldm))
    meta = json.loads(out)
    assert code == 0 and meta["kind"] == "ldm" and meta["config"]["unet"]["num_classes"] == 2


def test_resolution_not_divisible(capsys, tmp_path, tiny_ae):
    code, _, err = run(capsys, "train", "--autoencoder", str(tiny_ae), "--resolution", "31", "--out",
                       str(tmp_path / "r"), "--quiet")
    assert code == 2 and "not divisible by the autoencoder's factor 2" in err
    # 30 px gives 15x15 latents, which the default U-Net (two downsamplings) cannot halve twice.
    code, _, err = run(capsys, "train", "--autoencoder", str(tiny_ae), "--resolution", "30", "--out",
                       str(tmp_path / "r2"), "--quiet")
    assert code == 2 and "latent height 15 is not a multiple of 4" in err


def test_train_without_autoencoder(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--out", str(tmp_path), "--quiet")
    assert code == 2 and "--autoencoder" in err


def test_sample_writes_png_with_parameters(capsys, tmp_path, tiny_ldm):
    from PIL import Image

    out = tmp_path / "grid.png"
    code, _, _ = run(capsys, "sample", str(tiny_ldm), "--n", "3", "--label", "1", "--steps", "3", "--sampler",
                     "euler", "--seed", "5", "--out", str(out))
    assert code == 0
    params = json.loads(Image.open(out).text["ldmkit"])
    assert params["seed"] == 5 and params["sampler"] == "euler" and params["labels"] == [1]
