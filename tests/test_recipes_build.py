"""recipes/build.py: `--ae-from` (a shipped model's denoiser retrained on the autoencoder of an existing model) and
the example style LoRA's data and yardstick (pixel art)."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit import checkpoint
from ldmkit.autoencoder.files import load_autoencoder

from .factory import tiny_autoencoder_run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("recipes_build", ROOT / "recipes" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ae_from_writes_the_models_autoencoder_once_and_reuses_it(build, tiny_ldm, tmp_path):
    model = tmp_path / "base.safetensors"
    shutil.copy(tiny_ldm, model)
    recipe = tiny_autoencoder_run()
    result, run, source = build.autoencoder_from(str(model), recipe, tmp_path / "ae")
    assert source == {"model": str(model), "sha256": checkpoint.file_sha256(model)}
    written, _ = load_autoencoder(result["checkpoint"])
    inside, inside_run = load_autoencoder(model)
    for (k, a), (_, b) in zip(written.state_dict().items(), inside.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert run.model == inside_run.model  # the model's architecture and latent scale
    assert run.data == recipe.data  # the recipe's data, for the held-out reconstruction metrics
    # the build replaces the model it took the autoencoder from: a resumed build keeps the one it wrote
    model.write_bytes(b"replaced")
    again, run2, source2 = build.autoencoder_from(str(model), recipe, tmp_path / "ae")
    assert again == result and run2 == run and source2 == source


def test_ae_from_refuses_a_folder_holding_another_autoencoder(build, tiny_ldm, tmp_path):
    build.autoencoder_from(str(tiny_ldm), tiny_autoencoder_run(), tmp_path / "ae")
    with pytest.raises(SystemExit, match="remove .* to start over"):
        build.autoencoder_from(str(tmp_path / "other.safetensors"), tiny_autoencoder_run(), tmp_path / "ae")


def test_the_card_and_command_name_the_autoencoders_source(build):
    args = type("Args", (), {"ae_from": "weights/emoji.safetensors", "ae_set": [], "set": ["a=1"], "eval_n": 1000})
    assert build.command("emoji", args) == (
        "python recipes/build.py emoji --ae-from weights/emoji.safetensors --set a=1 --eval-n 1000"
    )
    recipe = {"autoencoder": {}, "autoencoder_from": {"model": "weights/emoji.safetensors", "sha256": "ab" * 32}}
    assert "from `weights/emoji.safetensors` (SHA-256 abababababab...), not retrained" in build.ae_row(recipe)
    trained = {"autoencoder": {"train": {"steps": 10, "batch_size": 4}}, "autoencoder_s": 120}
    assert build.ae_row(trained) == "| autoencoder | 10 | 4 | | 2.0 min |"


def test_pixel_art_is_what_its_error_measures(build):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    art = build.pixel_art(x)
    assert torch.allclose(build.pixel_art(art), art, atol=1e-6)  # pixel art is its own pixel art
    assert build.pixel_error(art) < 1e-6 < 0.05 < build.pixel_error(x)
    assert len(torch.unique(art)) <= 6  # 6 levels a channel
    assert torch.equal(art, art[..., ::4, ::4].repeat_interleave(4, -2).repeat_interleave(4, -1))  # 4x4 cells


def test_the_pixel_art_folder_holds_the_training_images_alone_once(build, tmp_path):
    from ldmkit.config import DataConfig

    src = tmp_path / "src"
    src.mkdir()
    rows = []
    for i in range(5):
        Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(src / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"colour {i}"}) + "\n")
    (src / "metadata.jsonl").write_text("".join(rows))
    data = DataConfig(dataset=str(src), resolution=8, channels=3, holdout=2)
    out = build.pixel_art_folder(tmp_path / "art", data)
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [m["text"] for m in meta] == ["colour 0", "colour 1", "colour 2"]  # the held-out last 2 are left out
    stamp = (out / "metadata.jsonl").stat().st_mtime_ns
    assert (
        build.pixel_art_folder(tmp_path / "art", data) == out and (out / "metadata.jsonl").stat().st_mtime_ns == stamp
    )
