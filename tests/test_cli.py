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


def _png_params(path):
    from PIL import Image

    return json.loads(Image.open(path).text["ldmkit"])


def test_prompt_negative_prompt_and_guidance_rescale_reach_the_image(capsys, tmp_path, tiny_text_ldm):
    out = tmp_path / "p.png"
    code, _, err = run(capsys, "sample", str(tiny_text_ldm), "--prompt", "red apple", "--negative-prompt", "green",
                       "--cfg", "5", "--guidance-rescale", "0.7", "--n", "2", "--steps", "3", "--out", str(out))
    assert code == 0, err
    p = _png_params(out)
    assert p["prompts"] == ["red apple", "red apple"] and p["negative_prompt"] == "green" and p["cfg_rescale"] == 0.7


def test_prompt_file_gives_one_image_per_line_in_batches(capsys, tmp_path, tiny_text_ldm):
    from ldmkit.ldm import LatentDiffusion
    from ldmkit.pipelines.txt2img import SampleRequest, generate

    lines = ["red apple", "", "blue whale", "snowy mountain", "green leaf"]
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n")
    code, out, err = run(capsys, "sample", str(tiny_text_ldm), "--prompt-file", str(tmp_path / "prompts.txt"),
                         "--steps", "2", "--batch-size", "2", "--separate", "--out", str(tmp_path / "imgs"))
    assert code == 0, err
    files = sorted((tmp_path / "imgs").glob("*.png"))
    assert [_png_params(f)["caption"] for f in files] == [l for l in lines if l]
    # Batched generation equals one-at-a-time generation: image i depends on its own prompt and seed only.
    ldm = LatentDiffusion.load(tiny_text_ldm)
    a, _ = generate(ldm, SampleRequest(n=2, prompts=["red apple", "blue whale"], steps=2, batch_size=2))
    b, _ = generate(ldm, SampleRequest(n=2, prompts=["red apple", "blue whale"], steps=2, batch_size=1))
    assert torch.allclose(a, b, atol=1e-5)


def test_prompt_to_a_class_model_is_a_clear_error(capsys, tiny_ldm):
    code, _, err = run(capsys, "sample", str(tiny_ldm), "--prompt", "a cat", "--steps", "2")
    assert code == 2 and "not text-conditional" in err
