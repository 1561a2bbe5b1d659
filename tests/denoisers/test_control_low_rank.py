"""Low-rank ControlNets (control.rank > 0): the copy trains through LoRAs on the frozen base weights, the file holds
only what differs from the base model, and it loads, converts and serves with the model it steers."""

import copy
from dataclasses import replace

import pytest
import torch

from ldmkit import checkpoint
from ldmkit.cli import main
from ldmkit.conditioning.types import Conditioning
from ldmkit.config import ControlConfig, DataConfig, DenoiserRun, TrainConfig
from ldmkit.denoisers.controlnet import OWN, ControlNet, is_low_rank, load_controlnet, save_controlnet
from ldmkit.denoisers.unet import UNet
from ldmkit.errors import CheckpointError, InputError
from ldmkit.ldm import LatentDiffusion
from ldmkit.serve.controls import ServedControlNets
from ldmkit.serve.schemas import FieldError
from ldmkit.training import runs
from tests.denoisers.test_control import CFG, generate_args


def _randomised(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _inputs(b=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 4, 8, 8, generator=g)
    cond = Conditioning(context=torch.randn(b, 5, 16, generator=g))
    return x, torch.tensor([10.0, 700.0])[:b], cond, torch.rand(b, 3, 32, 32, generator=g)


@pytest.fixture
def low_rank():
    """(a random U-Net, a low-rank ControlNet of it with random LoRAs and own layers)."""
    unet = UNet(CFG).eval()
    _randomised(unet.parameters())
    net = ControlNet.from_unet(unet, factor=4).make_low_rank(2, alpha=4).eval()
    _randomised(p for p in net.parameters() if p.requires_grad)
    return unet, net


def test_only_the_loras_and_the_controlnets_own_layers_train(low_rank):
    unet, net = low_rank
    trained = {k for k, p in net.named_parameters() if p.requires_grad}
    assert trained and all(k.startswith(OWN) or ".lora." in k for k in trained)
    copies = [k for k in net.state_dict() if not k.startswith(OWN) and ".lora." not in k]
    assert copies and not trained & set(copies)
    assert sum(".lora.down" in k for k in trained) == len(net.copy_layers())
    # B starts at zero: a fresh low-rank ControlNet is its full copy, output for output
    fresh = ControlNet.from_unet(unet, factor=4).eval()
    _randomised((p for k, p in fresh.named_parameters() if k.startswith(OWN)), seed=5)
    hooked = copy.deepcopy(fresh).make_low_rank(2)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(fresh(*_inputs()), hooked(*_inputs())))
    with pytest.raises(InputError, match="low-rank already"):
        hooked.make_low_rank(2)


@torch.no_grad()
def test_the_file_holds_the_difference_and_loads_merged_on_its_model(tmp_path, low_rank):
    unet, net = low_rank
    path = save_controlnet(tmp_path / "cn.safetensors", net, condition="raw")
    full = save_controlnet(tmp_path / "full.safetensors", ControlNet.from_unet(unet, factor=4), condition="raw")
    tensors = checkpoint.load(path, "controlnet")[0]
    assert is_low_rank(path) and not is_low_rank(full)
    assert all(k.startswith(OWN) or ".lora." in k for k in tensors)
    copy_numbers = sum(v.numel() for k, v in net.state_dict().items() if not k.startswith(OWN) and ".lora." not in k)
    assert sum(v.numel() for k, v in tensors.items() if ".lora." in k) < copy_numbers / 2
    assert path.stat().st_size < full.stat().st_size
    loaded, meta = load_controlnet(path, unet=unet)
    assert meta["config"]["low_rank"] == {"rank": 2, "alpha": 4.0} and loaded.low_rank is None
    assert not any(".lora." in k for k in loaded.state_dict())  # merged: samples as fast as a full one
    want, got = net(*_inputs()), loaded(*_inputs())
    assert max(float((a - b).abs().max()) for a, b in zip(want, got)) < 1e-5
    assert max(float(a.abs().max()) for a in want) > 1e-3  # the residuals are not all zero
    with pytest.raises(InputError, match=r"low-rank ControlNet \(rank 2\).*--model MODEL --control"):
        load_controlnet(path)
    other = UNet(replace(CFG, model_channels=16, norm_groups=8))
    with pytest.raises(InputError, match="made for another denoiser: unet.model_channels=8"):
        load_controlnet(path, unet=other)
    damaged = dict(tensors)
    first = next(k for k in damaged if k.endswith(".lora.up"))
    damaged[first] = damaged[first][:-1]
    checkpoint.save(tmp_path / "bad.safetensors", damaged, "controlnet", checkpoint.read_metadata(path)["config"])
    with pytest.raises(CheckpointError, match="does not fit its layer"):
        load_controlnet(tmp_path / "bad.safetensors", unet=unet)


@torch.no_grad()
def test_a_deep_copy_carries_its_own_loras(low_rank):
    """EMA keeps a deep copy of the trained modules: its hooks must use its own LoRAs, not the live ones."""
    _, net = low_rank
    ema = copy.deepcopy(net)
    before = ema(*_inputs())
    _randomised((p for k, p in net.named_parameters() if ".lora." in k), seed=9)
    assert all(torch.equal(a, b) for a, b in zip(before, ema(*_inputs())))
    assert not all(torch.equal(a, b) for a, b in zip(before, net(*_inputs())))


def _run(init, **kw) -> DenoiserRun:
    return DenoiserRun(
        init=str(init),
        task="control",
        control=ControlConfig(rank=2),
        data=DataConfig(resolution=16, channels=1, holdout=0),
        train=TrainConfig(steps=2, batch_size=8, lr=1e-2, warmup_steps=1, log_every=1, ckpt_every=2, **kw),
    )


def test_a_control_rank_needs_the_control_task(tmp_path, tiny_ldm):
    run = _run(tiny_ldm)
    with pytest.raises(InputError, match="--control-rank.*add --task control"):
        runs.train_denoiser(DenoiserRun(init=run.init, control=run.control, data=run.data, train=run.train), tmp_path)


def test_training_writes_a_low_rank_file_that_generate_convert_and_serve_take(tmp_path, tiny_ldm, blobs, monkeypatch):
    monkeypatch.setattr(runs, "_datasets", lambda cfg, holdout: (blobs, None))
    res = runs.train_denoiser(_run(tiny_ldm, ema_decay=0.5), tmp_path / "run", progress=False)
    path = tmp_path / "run" / "controlnet.safetensors"
    assert res["checkpoint"] == str(path) and is_low_rank(path)
    tensors = checkpoint.load(path, "controlnet")[0]
    assert any(".lora.up" in k and v.abs().sum() > 0 for k, v in tensors.items()), "the LoRAs trained"
    runs.train_denoiser(_run(tiny_ldm, ema_decay=0.5), tmp_path / "run", resume=True, progress=False)

    args, out = generate_args(tmp_path, tiny_ldm)
    assert main(args + ["--control", f"{path}:{tmp_path / 'edges.png'}:0.8", "--quiet"]) == 0 and out.is_file()

    # convert writes it out whole, rebuilt on --base; without --base it says what is missing
    from ldmkit.interop.convert import convert

    with pytest.raises(InputError, match="low-rank ControlNet.*--base MODEL"):
        convert(path, tmp_path / "whole.safetensors")
    whole = convert(path, tmp_path / "whole.safetensors", base=tiny_ldm, to="ldm")
    unet = LatentDiffusion.load(tiny_ldm).unet
    a, _ = load_controlnet(whole)
    b, _ = load_controlnet(path, unet=unet)
    assert not is_low_rank(whole) and all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())

    # a server's folder: rebuilt once per model it steers
    folder = tmp_path / "served"
    folder.mkdir()
    (folder / "edges.safetensors").write_bytes(path.read_bytes())
    served = ServedControlNets(str(folder))
    assert served.model_list() == [f"edges [{checkpoint.file_sha256(path)[:8]}]"]
    name, net, _, _ = served.get("edges", "model", unet)
    assert name == "edges" and served.get("edges", "model", unet)[1] is net
    with pytest.raises(FieldError, match="model: .*low-rank ControlNet"):
        served.get("edges", "model")


def test_a_shipped_controlnet_is_named_and_a_missing_one_says_how_to_restore_it(tmp_path, monkeypatch):
    from ldmkit.errors import MissingFileError
    from ldmkit.shipped import resolve_control_spec

    monkeypatch.setenv("LDMKIT_WEIGHTS", str(tmp_path))
    assert resolve_control_spec("runs/x/controlnet.safetensors:a.png:0.5") == "runs/x/controlnet.safetensors:a.png:0.5"
    with pytest.raises(MissingFileError, match="recipes/build.py fashion-mnist-mask"):
        resolve_control_spec("fashion-mnist-mask:a.png")
    (tmp_path / "fashion-mnist-mask.safetensors").write_bytes(b"x")
    assert (
        resolve_control_spec("fashion-mnist-mask:a.png:0.5") == f"{tmp_path}/fashion-mnist-mask.safetensors:a.png:0.5"
    )
