"""ControlNet: the U-Net's residual hook, the ControlNet and its wrapper, the detectors, training with --init and
generating with --control."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit import checkpoint
from ldmkit.cli import main
from ldmkit.conditioning.types import Conditioning
from ldmkit.config import ControlConfig, DataConfig, DenoiserRun, TrainConfig, UNetConfig
from ldmkit.data.conditions import canny, colour_layout, condition_image, detect, foreground_mask
from ldmkit.denoisers.controlnet import (
    Control,
    Controlled,
    ControlNet,
    check_control,
    check_fits,
    load_controlnet,
    step_window,
)
from ldmkit.denoisers.unet import UNet
from ldmkit.errors import InputError
from ldmkit.ldm import LatentDiffusion
from ldmkit.training import runs

CFG = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_levels=(1,),
    num_heads=(2,),
    norm_groups=4,
    context_dim=16,
)


def _randomised(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


@pytest.fixture
def pair():
    unet = _randomised(UNet(CFG).eval())
    return unet, ControlNet.from_unet(unet, factor=4).eval()


def _inputs(b=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 4, 8, 8, generator=g)
    t = torch.tensor([10.0, 700.0])[:b]
    cond = Conditioning(context=torch.randn(b, 5, 16, generator=g))
    hint = torch.rand(b, 3, 32, 32, generator=g)
    return x, t, cond, hint


def test_an_untrained_controlnet_leaves_the_unet_bit_for_bit(pair):
    unet, net = pair
    x, t, cond, hint = _inputs()
    with torch.no_grad():
        plain = unet(x, t, cond)
        residuals = net(x, t, cond, hint)
        assert all(torch.equal(r, torch.zeros_like(r)) for r in residuals)  # zero projections
        assert torch.equal(Controlled(unet, [Control(net, hint)])(x, t, cond), plain)


def test_the_residuals_enter_through_one_hook_scaled_and_summed(pair):
    unet, net = pair
    _randomised(net, seed=3)
    other = _randomised(ControlNet.from_unet(unet, factor=4), seed=4)
    x, t, cond, hint = _inputs()
    with torch.no_grad():
        r1, r2 = net(x, t, cond, hint), other(x, t, cond, 1 - hint)
        summed = tuple(0.5 * a + 1.5 * b for a, b in zip(r1, r2))
        want = unet(x, t, Conditioning(context=cond.context, control=summed))
        got = Controlled(unet, [Control(net, hint, 0.5), Control(other, 1 - hint, 1.5)])(x, t, cond)
        assert torch.allclose(got, want, atol=1e-6)
        assert not torch.allclose(got, unet(x, t, cond), atol=1e-3)
        # the same through the conditioning's hints (training), with guidance's doubled batch from one image
        assert torch.allclose(
            Controlled(unet, [Control(net)])(x, t, Conditioning(context=cond.context, hint=(hint,))),
            unet(x, t, Conditioning(context=cond.context, control=tuple(r1))),
            atol=1e-6,
        )
        one = Controlled(unet, [Control(net, hint[:1])])(x[:1], t[:1], Conditioning(context=cond.context[:1]))
        res = tuple(net(x[:1], t[:1], Conditioning(context=cond.context[:1]), hint[:1]))
        assert torch.allclose(one, unet(x[:1], t[:1], Conditioning(context=cond.context[:1], control=res)), atol=1e-6)


def test_residuals_of_another_shape_are_refused(pair):
    unet, net = pair
    x, t, cond, hint = _inputs()
    res = net(x, t, cond, hint)
    with pytest.raises(InputError, match="made for another denoiser"):
        unet(x, t, Conditioning(context=cond.context, control=tuple(res[:-2])))
    small = UNet(
        UNetConfig(
            in_channels=4,
            out_channels=4,
            model_channels=4,
            channel_mult=(1,),
            num_res_blocks=1,
            attention_levels=(),
            norm_groups=4,
        )
    )
    with pytest.raises(InputError, match="made for another denoiser: unet.model_channels=8"):
        check_fits(net, small, 4, "cn.safetensors")


def test_the_step_window_follows_diffusers_rule(tiny_ldm):
    ldm = LatentDiffusion.load(tiny_ldm)
    den = ldm.denoiser
    sigmas = den.sigmas(10)
    assert step_window(den, sigmas, 0.0, 1.0) is None
    lo, hi = step_window(den, sigmas, 0.2, 0.5)  # steps 2, 3, 4 of 10
    c = den.c_noise(sigmas[:-1].float())
    active = [i for i in range(10) if lo <= float(c[i]) <= hi]
    assert active == [2, 3, 4]
    for bad, match in (((float("nan"), 0, 1), "finite"), ((-1.0, 0, 1), "finite"), ((1.0, 0.6, 0.4), "not before")):
        with pytest.raises(InputError, match=match):
            check_control(*bad)


def test_the_detectors():
    x = -torch.ones(1, 3, 32, 32)
    x[:, :, 8:24, 8:24] = 1  # a white square on black
    e = canny(x)
    assert e.shape == (1, 3, 32, 32) and e.sum() > 0 and e[0, 0, 16, 16] == 0 and e[0, 0, 0, 0] == 0
    m = foreground_mask(-x)  # a black square on white: the border colour is the background
    assert m[0, 0, 16, 16] == 1 and m[0, 0, 2, 2] == 0 and m.sum() == 3 * 16 * 16
    rgba = torch.cat([torch.zeros(1, 3, 32, 32), x[:, :1]], dim=1)
    assert torch.equal(foreground_mask(rgba), foreground_mask(-x))
    c = colour_layout(x, cells=4)
    assert c.shape == (1, 3, 32, 32) and c[0, 0, 0, 0] == 0 and c[0, 0, 12, 12] == 1
    with pytest.raises(InputError, match="unknown detector 'depth'"):
        detect("depth", x)


def test_a_condition_image_is_resized_with_a_note_or_refused(tmp_path, capsys):
    img = np.zeros((40, 40, 4), np.uint8)
    img[10:30, 10:30] = 255
    Image.fromarray(img, "RGBA").save(tmp_path / "a.png")
    m = condition_image("mask", tmp_path / "a.png", (20, 20))
    assert m.shape == (1, 3, 20, 20) and "resized to 20x20" in capsys.readouterr().err
    Image.fromarray(img[:, :30]).save(tmp_path / "wide.png")
    with pytest.raises(InputError, match="aspect ratio"):
        condition_image("canny", tmp_path / "wide.png", (20, 20))
    Image.fromarray(img[..., 0], "L").save(tmp_path / "grey.png")
    assert condition_image("raw", tmp_path / "grey.png", (40, 40)).shape == (1, 3, 40, 40)
    assert "converted to three channels" in capsys.readouterr().err
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty, truncated or not an image"):
        condition_image("raw", tmp_path / "empty.png", (40, 40))


def _control_run(init, **kw) -> DenoiserRun:
    return DenoiserRun(
        init=str(init),
        task="control",
        data=DataConfig(resolution=16, channels=1, holdout=0),
        train=TrainConfig(steps=2, batch_size=8, lr=1e-3, warmup_steps=1, log_every=1, ckpt_every=2, **kw),
    )


def generate_args(tmp_path, model) -> tuple[list[str], object]:
    """(a short `ldmkit generate` of the tiny class model into tmp_path/out.png, that path); tmp_path/edges.png is a
    16x16 condition image (a black square on white) for its --control."""
    img = np.full((16, 16), 255, np.uint8)
    img[2:8, 2:8] = 0
    Image.fromarray(img, "L").save(tmp_path / "edges.png")
    out = tmp_path / "out.png"
    return ["generate", "--model", str(model), "--label", "0", "--n", "2", "--steps", "3", "--out", str(out)], out


def test_training_a_controlnet_keeps_the_base_frozen_and_generate_takes_it(tmp_path, tiny_ldm, blobs, monkeypatch):
    monkeypatch.setattr(runs, "_datasets", lambda cfg, holdout: (blobs, None))
    res = runs.train_denoiser(_control_run(tiny_ldm, sample_every=2), tmp_path / "run", progress=False)
    path = tmp_path / "run" / "controlnet.safetensors"
    assert res["checkpoint"] == str(path) and list((tmp_path / "run").glob("samples-*.png"))
    meta = checkpoint.read_metadata(path)
    assert meta["kind"] == "controlnet" and meta["condition"] == "canny"
    assert meta["base_sha256"] == checkpoint.file_sha256(tiny_ldm)
    net, _ = load_controlnet(path)
    assert not any(k.startswith(("up.", "conv_out", "norm_out")) for k in net.state_dict())  # no decoder copy
    assert set(LatentDiffusion.load(tiny_ldm).unet.state_dict()) > {
        k for k in net.state_dict() if k.startswith("down.")
    }
    moved = [k for k, v in net.state_dict().items() if k.startswith("zero_convs") and v.abs().sum() > 0]
    assert moved, "the zero projections trained"

    # resume continues the same run
    runs.train_denoiser(_control_run(tiny_ldm, sample_every=2), tmp_path / "run", resume=True, progress=False)

    args, out = generate_args(tmp_path, tiny_ldm)
    assert (
        main(
            args
            + [
                "--control",
                f"{path}:{tmp_path / 'edges.png'}:0.8",
                "--control",
                f"{path}:{tmp_path / 'edges.png'}:0.5:mask",
                "--control-end",
                "0.7",
                "--quiet",
            ]
        )
        == 0
    )
    record = json.loads(Image.open(out).info["ldmkit"])
    assert [c["scale"] for c in record["controls"]] == [0.8, 0.5] and record["controls"][1]["kind"] == "mask"
    assert main(args + ["--control", f"{path}:{tmp_path / 'edges.png'}:-1", "--overwrite"]) != 0


def test_control_training_needs_a_base_model_and_a_known_condition(tmp_path, tiny_ae):
    with pytest.raises(InputError, match="--init MODEL"):
        runs.train_denoiser(DenoiserRun(autoencoder=str(tiny_ae), task="control"), tmp_path / "run")
    from ldmkit.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="control.condition = 'depth' is not a condition"):
        from dataclasses import replace

        from ldmkit.config import validate

        validate(replace(DenoiserRun(), control=ControlConfig(condition="depth")))
    assert from_dict(DenoiserRun, {"control": {"condition": "mask"}}).control.condition == "mask"


def _paired_folder(root, n=8):
    (root / "images").mkdir(parents=True)
    (root / "conditions").mkdir()
    rows = []
    for i in range(n):
        img = np.zeros((16, 16), np.uint8)
        img[i % 8 : i % 8 + 6, 2:8] = 255
        Image.fromarray(img, "L").save(root / "images" / f"{i}.png")
        Image.fromarray(np.stack([255 - img] * 3, -1)).save(root / "conditions" / f"{i}.png")
        rows.append({"file_name": f"images/{i}.png", "conditioning_image": f"conditions/{i}.png", "label": i % 2})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_the_command_line_trains_on_paired_folders_and_reports_bad_rows(tmp_path, tiny_ldm, capsys):
    rows = _paired_folder(tmp_path / "data")
    args = [
        "train",
        "--task",
        "control",
        "--init",
        str(tiny_ldm),
        "--condition",
        "folder",
        "--data",
        str(tmp_path / "data"),
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--quiet",
        "--set",
        "train.sample_every=0",
        "--set",
        "train.num_workers=0",
    ]
    assert main(args + ["--out", str(tmp_path / "run")]) == 0
    meta = checkpoint.read_metadata(tmp_path / "run" / "controlnet.safetensors")
    assert meta["condition"] == "folder" and meta["base"] == str(tiny_ldm)

    rows[3]["conditioning_image"] = "conditions/missing.png"
    (tmp_path / "data" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "run2")]) != 0
    assert "line 4: conditioning_image 'conditions/missing.png' does not exist" in capsys.readouterr().err
    rows[3]["conditioning_image"] = "../outside.png"
    (tmp_path / "data" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(args + ["--out", str(tmp_path / "run3")]) != 0
    assert "line 4: conditioning_image '../outside.png' points outside the data folder" in capsys.readouterr().err


def test_the_condition_command_shows_what_the_controlnet_sees(tmp_path, capsys):
    img = np.zeros((24, 24, 4), np.uint8)
    img[6:18, 6:18] = 255
    Image.fromarray(img, "RGBA").save(tmp_path / "e.png")
    assert main(["condition", "mask", str(tmp_path / "e.png"), "--out", str(tmp_path / "m.png")]) == 0
    m = np.asarray(Image.open(tmp_path / "m.png"))
    assert m.shape == (24, 24, 3) and m[12, 12, 0] == 255 and m[0, 0, 0] == 0
    assert main(["condition", "canny", str(tmp_path / "e.png"), "--out", str(tmp_path / "e.png")]) != 0
    assert "is the input image" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["canny", "mask", "colour"])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_detected_conditions_are_kept_per_item_exactly_as_detected(kind, channels, monkeypatch):
    from ldmkit.data import conditions

    g = torch.Generator().manual_seed(channels)
    images = torch.rand(6, channels, 20, 20, generator=g) * 2 - 1
    cfg = ControlConfig(colour_cells=3)  # cells that do not divide the side
    cache = conditions.DetectedConditions(kind, cfg, max_bytes=10**6)
    idx = torch.tensor([4, 1, 3])
    first = cache.batch(idx, images[idx])
    assert torch.equal(first, detect(kind, images[idx], cfg))
    calls = []
    monkeypatch.setattr(conditions, "detect", lambda *a: calls.append(a) or detect(*a))
    again = cache.batch(torch.tensor([3, 0, 4]), images[[3, 0, 4]])  # 3 and 4 kept, 0 new
    assert torch.equal(again, detect(kind, images[[3, 0, 4]], cfg))
    assert len(calls) == (0 if kind == "colour" else 1) and (not calls or len(calls[0][1]) == 1)
    full = conditions.DetectedConditions(kind, cfg, max_bytes=cache.bytes // 4)  # room for one item
    assert torch.equal(full.batch(idx, images[idx]), first) and len(full.items) == 1
    assert torch.equal(full.batch(idx, images[idx]), first)
    with pytest.raises(InputError, match="unknown detector"):
        conditions.DetectedConditions("depth", cfg)
