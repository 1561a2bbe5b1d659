"""--backend openvino: the backbone exported to OpenVINO gives the PyTorch numbers (fp32), keeps every image's numbers
whatever the batch (each image is one inference of its own rows), is exported once and cached (a damaged entry is
exported again), and is refused in one line where it cannot run."""

import importlib.util
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ldmkit.conditioning.types import Conditioning
from ldmkit.denoisers.unet import UNet
from ldmkit.errors import InputError
from ldmkit.ldm import LatentDiffusion
from ldmkit.nn.invariant import image_rows
from ldmkit.pipelines.generate import generate
from ldmkit.pipelines.request import LoRASpec, SampleRequest
from tests.factory import attention_unet, normal_init

if importlib.util.find_spec("openvino") is None:
    pytest.skip("the openvino extra is not installed", allow_module_level=True)
from ldmkit.pipelines import openvino as backend  # noqa: E402

ov = backend.load_openvino()  # as the backend imports it, without usage reports


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LDMKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "openvino"


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return normal_init(UNet(attention_unet(context_dim=8)), std=0.05).eval()


def inputs(b: int, seed: int = 1):
    """b guided images: x, c_noise and a masked context for their 2b rows (conditional rows, then unconditional)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 8, 8, generator=g)
    c_noise = torch.rand(b, generator=g)
    context = torch.randn(2 * b, 5, 8, generator=g)
    mask = torch.ones(2 * b, 5, dtype=torch.bool)
    mask[::2, 3:] = False  # some rows with padding tokens
    return torch.cat([x, x]), torch.cat([c_noise, c_noise]), Conditioning(context=context, context_mask=mask)


def run(net, x, c_noise, cond):
    with torch.no_grad(), image_rows(2, x.shape[0]):
        return net(x, c_noise, cond)


def test_fp32_gives_the_pytorch_numbers_and_each_image_its_own_alone(unet, cache):
    net = backend.OpenVINOBackbone(unet, "f32")
    x, c_noise, cond = inputs(3)
    together = run(net, x, c_noise, cond)
    assert (together - run(unet, x, c_noise, cond)).abs().max() < 1e-4
    for i in range(3):
        rows = [i, i + 3]
        alone = run(net, x[rows], c_noise[rows], cond.map(lambda t, rows=rows: t[rows]))
        assert torch.equal(alone, together[rows])  # bit for bit, alone or in a batch of 3
    assert len(list(cache.iterdir())) == 1  # one export for one signature (k rows, shapes)


def test_the_numbers_do_not_depend_on_the_streams(unet, cache):
    x, c_noise, cond = inputs(4)
    one = run(backend.OpenVINOBackbone(unet, "f32", streams=1), x, c_noise, cond)
    two = run(backend.OpenVINOBackbone(unet, "f32", streams=2), x, c_noise, cond)
    assert torch.equal(one, two)


def test_an_export_is_cached_and_a_damaged_one_is_made_again(unet, cache, monkeypatch, capsys):
    x, c_noise, cond = inputs(1)
    first = run(backend.OpenVINOBackbone(unet, "f32"), x, c_noise, cond)
    assert "exporting the denoiser to OpenVINO" in capsys.readouterr().err
    monkeypatch.setattr(ov, "convert_model", lambda *a, **k: pytest.fail("exported again"))
    assert torch.equal(run(backend.OpenVINOBackbone(unet, "f32"), x, c_noise, cond), first)
    (entry,) = cache.iterdir()
    (entry / "model.xml").write_text("<net>cut short")
    monkeypatch.undo()
    monkeypatch.setenv("LDMKIT_CACHE", str(cache.parent))
    again = run(backend.OpenVINOBackbone(unet, "f32"), x, c_noise, cond)
    assert torch.equal(again, first) and "could not be read" in capsys.readouterr().err
    assert [p.name for p in cache.iterdir()] == [entry.name]  # no temporary folder left behind


def test_an_export_killed_mid_write_leaves_no_entry_and_is_cleared_later(unet, cache, monkeypatch):
    import os
    import time

    x, c_noise, cond = inputs(1)
    monkeypatch.setattr(ov, "save_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run(backend.OpenVINOBackbone(unet, "f32"), x, c_noise, cond)
    assert list(cache.iterdir()) == []  # nothing half-written is ever read back
    killed = cache / ".0123-abcd"  # what kill -9 between the write and the rename leaves
    killed.mkdir()
    os.utime(killed, (time.time() - 7200,) * 2)
    monkeypatch.undo()
    monkeypatch.setenv("LDMKIT_CACHE", str(cache.parent))
    run(backend.OpenVINOBackbone(unet, "f32"), x, c_noise, cond)
    assert not killed.exists() and len(list(cache.iterdir())) == 1


def test_other_weights_are_another_export(unet, cache):
    x, c_noise, cond = inputs(1)
    run(backend.OpenVINOBackbone(unet, "f32"), x, c_noise, cond)
    other = UNet(attention_unet(context_dim=8)).eval()
    other.load_state_dict(unet.state_dict())
    with torch.no_grad():
        next(other.parameters()).add_(0.5)
    run(backend.OpenVINOBackbone(other, "f32"), x, c_noise, cond)
    assert len(list(cache.iterdir())) == 2


def test_refusals_name_what_to_do(unet, cache, monkeypatch, tiny_ldm):
    x, c_noise, cond = inputs(1)
    hinted = Conditioning(context=cond.context, context_mask=cond.context_mask, hint=(torch.zeros(2, 3, 32, 32),))
    with pytest.raises(InputError, match="cannot run a backbone conditioned on hint.*--backend torch"):
        run(backend.OpenVINOBackbone(unet, "f32"), x, c_noise, hinted)
    with pytest.raises(InputError, match="--backend"):
        SampleRequest(backend="onnx")
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(InputError, match=r"pip install 'ldmkit\[openvino\]'"):
        backend.OpenVINOBackbone(unet, "f32")


def test_generate_with_openvino_draws_the_pytorch_images_alone_or_batched(tiny_ldm, cache):
    ldm = LatentDiffusion.load(tiny_ldm)

    def images(backend_name, batch_size):
        req = SampleRequest(n=3, steps=3, cfg=2.0, seed=5, batch_size=batch_size, backend=backend_name)
        return generate(ldm, req)[0]

    batched = images("openvino", 3)
    assert (batched - images("torch", 3)).abs().max() < 1e-3
    assert torch.equal(images("openvino", 1), batched)
    assert SampleRequest(backend="openvino").record()["backend"] == "openvino"
    assert "backend" not in SampleRequest().record()


def test_img2img_and_inpaint_on_openvino_draw_the_pytorch_images_alone_or_batched(tiny_ldm, cache):
    from ldmkit.pipelines.img2img import img2img
    from ldmkit.pipelines.inpaint import InpaintOptions, inpaint

    ldm = LatentDiffusion.load(tiny_ldm)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 16, 16, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 3:9, 6:14] = 1
    kw = dict(n=3, labels=[0, 1], steps=3, cfg=2.0, seed=11)

    def edits(backend_name, batch_size):
        req = SampleRequest(**kw, batch_size=batch_size, backend=backend_name)
        return img2img(ldm, x, req, 0.6)[0], inpaint(ldm, req, x, mask, InpaintOptions())[0]

    batched = edits("openvino", 3)
    for ov_images, torch_images, alone in zip(batched, edits("torch", 3), edits("openvino", 1)):
        assert (ov_images - torch_images).abs().max() < 1e-3
        assert torch.equal(alone, ov_images)  # image i the same at any batch size on OpenVINO too


def test_a_controlnet_is_refused_before_the_steps(tiny_ldm, cache, tmp_path):
    import numpy as np
    from PIL import Image

    from ldmkit.pipelines.control import apply_controls, parse_control
    from tests.pipelines.test_control_edits import _controlnet

    edges = np.zeros((16, 16, 3), np.uint8)
    edges[3:13, 6] = 255
    Image.fromarray(edges).save(tmp_path / "edges.png")
    net = _controlnet(tmp_path / "a.safetensors", tiny_ldm, 0)
    ldm = LatentDiffusion.load(tiny_ldm)
    apply_controls(ldm, [parse_control(f"{net}:{tmp_path}/edges.png:0.8")], (16, 16), 2)
    with pytest.raises(InputError, match="does not take ControlNets.*--backend torch"):
        generate(ldm, SampleRequest(n=1, labels=[1], steps=2, backend="openvino"))
    assert not cache.exists()  # refused before any export


def test_weights_changed_in_place_are_exported_again(cache):
    torch.manual_seed(0)
    net = normal_init(UNet(attention_unet(context_dim=8)), std=0.05).eval()
    ov_net = backend.OpenVINOBackbone(net, "f32")
    x, c_noise, cond = inputs(1)
    before = run(ov_net, x, c_noise, cond)
    with torch.no_grad():
        next(net.parameters()).add_(0.5)  # what merging a LoRA into the weights does
    after = run(ov_net, x, c_noise, cond)
    assert not torch.equal(before, after) and (after - run(net, x, c_noise, cond)).abs().max() < 1e-4
    assert len(list(cache.iterdir())) == 2
    weight = next(net.parameters())
    weight.data = weight.data * 2  # swapped, not written in place (as Module.to(dtype) does): no version bump
    swapped = run(ov_net, x, c_noise, cond)
    assert not torch.equal(after, swapped) and (swapped - run(net, x, c_noise, cond)).abs().max() < 1e-4
    assert len(list(cache.iterdir())) == 3


def test_loras_run_on_openvino_each_image_its_alone_image(tiny_ldm, cache, tmp_path):
    """Requests with different LoRAs (and none) batched together on OpenVINO: each image is the one it gets alone
    on OpenVINO, within 1e-3 of PyTorch's; each LoRA combination is an export of its own."""
    from ldmkit.pipelines.batching import generate_together
    from tests.pipelines.test_batching_loras import random_lora

    ldm = LatentDiffusion.load(tiny_ldm)
    ink = random_lora(ldm.unet, tmp_path / "ink.safetensors", 1)
    toy = random_lora(ldm.unet, tmp_path / "toy.safetensors", 2, "attn")
    base = SampleRequest(n=2, labels=[0, 1], steps=2, cfg=2.0, seed=4)
    reqs = [
        replace(base, loras=(LoRASpec(str(ink), 0.8),)),
        base,
        replace(base, seed=9, loras=(LoRASpec(str(ink), -0.5), LoRASpec(str(toy), 1.0))),
    ]
    ov_reqs = [replace(r, backend="openvino") for r in reqs]
    together = generate_together(ldm, ov_reqs)
    for r, ov_r, got in zip(reqs, ov_reqs, together):
        assert torch.equal(generate_together(ldm, [ov_r])[0], got)  # alone or batched
        assert (generate_together(ldm, [r])[0] - got).abs().max() < 1e-3  # PyTorch's image
    assert not torch.equal(together[0], together[1])  # the LoRA acts
    assert len(list(cache.iterdir())) == 3  # no LoRA, ink, ink + toy (the scale is an input, not an export)
    ldm2 = LatentDiffusion.load(tiny_ldm)  # generate --lora: one request's LoRAs, hooked at one scale
    single = generate(ldm2, replace(base, backend="openvino", loras=(LoRASpec(str(ink), 0.3),)))[0]
    assert (single - generate(ldm2, replace(base, loras=(LoRASpec(str(ink), 0.3),)))[0]).abs().max() < 1e-3
    assert len(list(cache.iterdir())) == 3


SIGNALS_AFTER_FREED_CORES = """
import gc, signal, subprocess, sys, torch
from ldmkit.pipelines import openvino as backend
from tests.pipelines.test_openvino import inputs, run
from tests.factory import attention_unet, normal_init
from ldmkit.denoisers.unet import UNet
if sys.argv[1] == "one core a backbone":  # what the backend did: each backbone its own Core
    backend._core = lambda ov: ov.Core()
signal.signal(signal.SIGCHLD, lambda *a: None)  # as torch's DataLoader installs one
torch.manual_seed(0)
net = normal_init(UNet(attention_unet(context_dim=8)), std=0.05).eval()
x, c_noise, cond = inputs(1)
a = backend.OpenVINOBackbone(net, "f32"); run(a, x, c_noise, cond)
b = backend.OpenVINOBackbone(net, "bf16"); run(b, x, c_noise, cond)
del a; gc.collect()
del b; gc.collect()  # freed out of the order they were made
for _ in range(5):
    subprocess.run(["true"], check=True)  # each child's exit is a SIGCHLD to this process
print("signals delivered")
"""


def test_signals_are_delivered_after_backbones_are_freed_in_any_order(cache, tmp_path):
    """Each OpenVINO Core's CPU plugin installs an alternate signal stack and, freed, puts back the one before it:
    with a Core per backbone, freeing them out of order left a freed stack installed, and the next SIGCHLD killed the
    process (the full test suite died so, in the OpenAI client's `uname` subprocess). One Core per process now."""
    script = tmp_path / "signals.py"
    script.write_text(SIGNALS_AFTER_FREED_CORES)
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    done = subprocess.run(
        [sys.executable, str(script), "shared core"], cwd=root, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and "signals delivered" in done.stdout, done.stderr[-2000:]


NO_REPORTS = """
import os, sys, time, torch
forks = []
os.register_at_fork(before=lambda: forks.append(1))
from ldmkit.pipelines import openvino as backend
from tests.pipelines.test_openvino import inputs, run
from tests.factory import attention_unet, normal_init
from ldmkit.denoisers.unet import UNet
torch.manual_seed(0)
net = backend.OpenVINOBackbone(normal_init(UNet(attention_unet(context_dim=8)), std=0.05).eval(), "f32")
run(net, *inputs(1))  # exports the backbone with openvino.convert_model
time.sleep(1.0)  # the converter's reports went from a worker thread
print("forks", len(forks))
"""


def test_exporting_sends_no_usage_report_and_writes_nothing_to_home(cache, tmp_path):
    """OpenVINO's converter sent a usage report to Google Analytics on every export, from a process forked off a
    worker thread (a fork that hung the test suite when it met an OpenBLAS call in the main thread), and wrote a
    client ID to ~/intel. In a fresh home: no fork, nothing written there."""
    script, home = tmp_path / "reports.py", tmp_path / "home"
    script.write_text(NO_REPORTS)
    home.mkdir()
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root), HOME=str(home), LDMKIT_CACHE=str(tmp_path / "cache"))
    env.pop("CI", None)  # the converter reports nothing where CI=true
    done = subprocess.run([sys.executable, str(script)], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "forks 0" in done.stdout and not any(home.iterdir()), (done.stdout, list(home.rglob("*")))
