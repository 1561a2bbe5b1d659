"""ControlNets at sampling time: each control's own scale and window of the steps (a hook around the denoiser, never a
sampler option), and `--control` on the edits (img2img, inpaint, outpaint), which keep their unmasked pixels."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.denoisers.controlnet import Controlled, ControlNet, save_controlnet
from ldmkit.errors import InputError
from ldmkit.ldm import LatentDiffusion
from ldmkit.pipelines.control import ControlSpec, apply_controls, parse_control
from ldmkit.pipelines.generate import generate
from ldmkit.pipelines.img2img import img2img, img2img_to_file
from ldmkit.pipelines.inpaint import inpaint_to_file
from ldmkit.pipelines.outpaint import Border, outpaint_to_file
from ldmkit.pipelines.request import SampleRequest


def _controlnet(path, tiny_ldm, seed):
    """A ControlNet for the tiny model whose weights (zero projections too) are random, so it changes the output."""
    ldm = LatentDiffusion.load(tiny_ldm)
    net = ControlNet.from_unet(ldm.unet, ldm.factor)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return save_controlnet(path, net, condition="raw")


@pytest.fixture
def files(tmp_path, tiny_ldm):
    arr = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "in.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[4:10, 5:12] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    edges = np.zeros((16, 16, 3), np.uint8)
    edges[3:13, 6] = 255
    Image.fromarray(edges).save(tmp_path / "edges.png")
    Image.fromarray(np.pad(edges, ((0, 0), (0, 8), (0, 0)))).save(tmp_path / "wide.png")  # the outpainted size
    a = _controlnet(tmp_path / "a.safetensors", tiny_ldm, 0)
    b = _controlnet(tmp_path / "b.safetensors", tiny_ldm, 1)
    return tmp_path, arr, mask > 0, str(a), str(b)


REQ = SampleRequest(n=2, labels=[1], steps=4, seed=3, sampler="euler")


def _generate(tiny_ldm, specs, req=REQ):
    ldm = LatentDiffusion.load(tiny_ldm)
    apply_controls(ldm, specs, (16, 16), req.steps)
    return generate(ldm, req)[0]


def test_each_control_spec_carries_its_own_window(files):
    d, _, _, a, _ = files
    spec = parse_control(f"{a}:{d}/edges.png:0.8::0.2:0.6", start=0.1, end=0.9)
    assert (spec.scale, spec.kind, spec.start, spec.end) == (0.8, "", 0.2, 0.6)
    spec = parse_control(f"{a}:{d}/edges.png:0.5:raw", start=0.1, end=0.9)  # the defaults of --control-start/-end
    assert (spec.kind, spec.start, spec.end) == ("raw", 0.1, 0.9)
    assert parse_control(f"{a}:{d}/edges.png:::0.5").start == 0.5
    for bad, match in (
        (f"{a}:{d}/edges.png:1:raw:0.7:0.3", "not before the end"),
        (f"{a}:{d}/edges.png:1:raw:x", "start 'x' is not a number"),
        (f"{a}:{d}/edges.png:1:raw:0:2", "between 0 and 1"),
        (f"{a}:{d}/edges.png:1:raw:0:1:9", "give CONTROLNET:IMAGE"),
    ):
        with pytest.raises(InputError, match=match):
            parse_control(bad)


def test_a_window_outside_every_step_is_no_control_bit_for_bit(files, tiny_ldm):
    d, _, _, a, b = files
    plain = _generate(tiny_ldm, [])
    on = _generate(tiny_ldm, [ControlSpec(a, f"{d}/edges.png")])
    assert not torch.equal(on, plain), "the control acts"
    # 4 steps: step 3 acts when 3/4 >= start and 4/4 <= end, so a window from 0.8 holds no step
    assert torch.equal(_generate(tiny_ldm, [ControlSpec(a, f"{d}/edges.png", 1.0, "", 0.8, 1.0)]), plain)
    assert torch.equal(_generate(tiny_ldm, [ControlSpec(a, f"{d}/edges.png", 0.0)]), plain), "scale 0"
    # several controls, each with its own scale and window: one whose window holds no step leaves the other alone
    both = [ControlSpec(a, f"{d}/edges.png", 0.7, "", 0.0, 0.5), ControlSpec(b, f"{d}/edges.png", 1.3, "", 0.8, 1.0)]
    assert torch.equal(_generate(tiny_ldm, both), _generate(tiny_ldm, both[:1]))
    assert not torch.equal(_generate(tiny_ldm, both[:1]), on)  # half the steps at 0.7 is not every step at 1


def test_two_windows_split_the_steps_between_two_controlnets(files, tiny_ldm):
    d, _, _, a, b = files
    ldm = LatentDiffusion.load(tiny_ldm)
    specs = [ControlSpec(a, f"{d}/edges.png", 0.7, "", 0.0, 0.5), ControlSpec(b, f"{d}/edges.png", 1.3, "", 0.5, 1.0)]
    apply_controls(ldm, specs, (16, 16), 4)
    ctl = ldm.denoiser.backbone
    assert isinstance(ctl, Controlled) and [c.scale for c in ctl.controls] == [0.7, 1.3]
    c = ldm.denoiser.c_noise(ldm.denoiser.sigmas(4)[:-1].float())
    acting = [[i for i in range(4) if k.window[0] <= float(c[i]) <= k.window[1]] for k in ctl.controls]
    assert acting == [[0, 1], [2, 3]]


def test_img2img_counts_the_window_over_the_steps_it_runs(files, tiny_ldm):
    d, _, _, a, _ = files
    ldm = LatentDiffusion.load(tiny_ldm)
    apply_controls(ldm, [ControlSpec(a, f"{d}/edges.png", 1.0, "", 0.0, 0.4)], (16, 16), 10, strength=0.5)
    lo, hi = ldm.denoiser.backbone.controls[0].window
    c = ldm.denoiser.c_noise(ldm.denoiser.sigmas(10)[5:-1].float())  # the 5 steps run from index 5
    assert [i for i in range(5) if lo <= float(c[i]) <= hi] == [0, 1]  # 2 of the 5 steps run: i/5 < 0.4

    image = torch.rand(1, 1, 16, 16) * 2 - 1
    req = SampleRequest(n=1, labels=[1], steps=4, seed=3, sampler="euler")
    steered = img2img(ldm, image, req, 0.75)[0]
    plain = img2img(LatentDiffusion.load(tiny_ldm), image, req, 0.75)[0]
    assert not torch.equal(steered, plain)


def _pixels(path):
    img = Image.open(path)
    return np.asarray(img).astype(int), json.loads(img.text["ldmkit"])


@pytest.mark.parametrize("command", ["img2img", "inpaint", "outpaint"])
def test_the_edits_take_controls_and_keep_their_pixels(files, tiny_ldm, command):
    d, arr, regenerate, a, b = files
    req = SampleRequest(n=1, labels=[1], steps=4, seed=3, sampler="euler")
    cond = "wide.png" if command == "outpaint" else "edges.png"

    def edit(name, controls):
        out = d / f"{command}-{name}.png"
        common = {"progress": False, "controls": controls}
        if command == "img2img":
            img2img_to_file(tiny_ldm, d / "in.png", req, 0.75, out, **common)
        elif command == "inpaint":
            inpaint_to_file(tiny_ldm, req, d / "in.png", d / "mask.png", out, **common)
        else:
            outpaint_to_file(tiny_ldm, req, d / "in.png", Border(right=8), out, **common)
        return _pixels(out)

    base, base_meta = edit("base", None)
    on, meta = edit("on", [ControlSpec(a, f"{d}/{cond}", 0.8), ControlSpec(b, f"{d}/{cond}", 0.5, "", 0.0, 0.5)])
    off, _ = edit("off", [ControlSpec(a, f"{d}/{cond}", 1.0, "", 0.8, 1.0)])  # a window holding no step
    assert "controls" not in base_meta and np.array_equal(off, base)
    assert [(c["controlnet"], c["scale"], c["end"]) for c in meta["controls"]] == [
        ("a.safetensors", 0.8, 1.0),
        ("b.safetensors", 0.5, 0.5),
    ]
    kept = {"inpaint": ~regenerate, "outpaint": np.pad(np.ones((16, 16), bool), ((0, 0), (0, 8)))}.get(command)
    if kept is None:
        assert (on != base).any(), "the controls change the edited image"
        return
    assert (on[~kept] != base[~kept]).any(), "the controls change the regenerated region"
    ref = np.pad(arr, ((0, 0), (0, on.shape[1] - 16)))
    assert np.array_equal(on[kept], ref[kept]), "kept pixels stay the input's bit for bit"


def test_an_edit_refuses_a_control_image_of_another_shape(files, tiny_ldm):
    d, _, _, a, _ = files
    req = SampleRequest(n=1, labels=[1], steps=2, seed=3)
    with pytest.raises(InputError, match="aspect ratio"):
        inpaint_to_file(
            tiny_ldm,
            req,
            d / "in.png",
            d / "mask.png",
            d / "x.png",
            progress=False,
            controls=[ControlSpec(a, f"{d}/wide.png")],
        )
    assert not (d / "x.png").exists()


def test_the_edit_commands_take_control(files, tiny_ldm, capsys):
    from ldmkit.cli import main

    d, arr, regenerate, a, _ = files
    out = d / "cli.png"
    common = ["--model", str(tiny_ldm), "--label", "1", "--steps", "3", "--quiet", "--out", str(out)]
    argv = ["inpaint", str(d / "in.png"), "--mask", str(d / "mask.png"), *common]
    assert main([*argv, "--control", f"{a}:{d}/edges.png:0.6:raw:0:0.5", "--control-end", "0.9"]) == 0
    img, meta = _pixels(out)
    assert [(c["scale"], c["kind"], c["start"], c["end"]) for c in meta["controls"]] == [(0.6, "raw", 0.0, 0.5)]
    assert np.array_equal(img[~regenerate], arr[~regenerate])
    assert main([*argv, "--overwrite", "--control", f"{a}:{d}/edges.png:1:depth"]) != 0
    assert "unknown detector 'depth'" in capsys.readouterr().err
