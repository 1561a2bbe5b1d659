"""The LoRAs of a SampleRequest (SampleRequest.loras) in the library's entry points: generate, generate_to_file,
img2img, inpaint and upscale hook them in per request, unmerged, as the server does; at scale 1 the image is the
command line's `--lora` image, at scale 0 the image without a LoRA bit for bit."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.cli import main
from ldmkit.data.images import to_pil
from ldmkit.errors import InputError
from ldmkit.ldm import LatentDiffusion
from ldmkit.pipelines.generate import generate, generate_to_file
from ldmkit.pipelines.img2img import img2img, img2img_to_file
from ldmkit.pipelines.inpaint import inpaint
from ldmkit.pipelines.lora import LoRASpec, apply_loras
from ldmkit.pipelines.request import SampleRequest
from ldmkit.pipelines.upscale import upscale
from tests.pipelines.test_batching_loras import random_lora
from tests.pipelines.test_upscale import data, upscaler  # noqa: F401 (fixtures: the trained tiny upscaler)

ARGS = dict(n=1, labels=[0], steps=3, seed=3, cfg=2.0)


@pytest.fixture(scope="module")
def ldm(tiny_ldm):
    return LatentDiffusion.load(tiny_ldm)


@pytest.fixture(scope="module")
def lora_file(ldm, tmp_path_factory):
    return random_lora(ldm.unet, tmp_path_factory.mktemp("lora") / "style.safetensors", 0)


def with_lora(req: SampleRequest, path, scale: float) -> SampleRequest:
    return replace(req, loras=(LoRASpec(str(path), scale),))


def hooked(ldm, path, fn):
    """fn() with the LoRA at `path` hooked into the whole model at scale 1, as the command's --lora does."""
    handles = apply_loras(ldm, [LoRASpec(str(path), 1.0)])
    try:
        return fn()
    finally:
        for h in handles:
            h.remove()


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_generate_applies_the_request_loras_as_the_command_line_does(tmp_path, tiny_ldm, ldm, lora_file):
    req = SampleRequest(**ARGS)
    base, _ = generate(ldm, req)
    on, _ = generate(ldm, with_lora(req, lora_file, 1.0))
    zero, _ = generate(ldm, with_lora(req, lora_file, 0.0))
    assert not torch.equal(on, base), "the request's LoRA changes the image of the same seed"
    assert torch.equal(zero, base), "scale 0 adds an exact zero"
    argv = ["generate", "--model", str(tiny_ldm), "--label", "0", "--n", "1", "--steps", "3", "--seed", "3"]
    cli = tmp_path / "cli.png"
    assert main([*argv, "--cfg", "2", "--quiet", "--lora", f"{lora_file}:1", "--out", str(cli)]) in (0, None)
    assert np.array_equal(np.asarray(to_pil(on[0])), pixels(cli))
    # the file writer takes the request's LoRAs too, and records each with its SHA-256
    lib = generate_to_file(tiny_ldm, with_lora(req, lora_file, 1.0), tmp_path / "lib.png", progress=False)[0]
    assert np.array_equal(pixels(lib), pixels(cli))
    assert '"scale": 1.0' in Image.open(lib).text["ldmkit"]


def test_the_record_lists_the_loras_argument_and_the_request_loras(tmp_path, tiny_ldm, ldm, lora_file):
    """A file writer given `loras=` and a request with LoRAs of its own applies both (the argument's hooked into the
    model, the request's by plan.draw); its record named only the argument's."""
    other = random_lora(ldm.unet, tmp_path / "other.safetensors", 1)
    req = with_lora(SampleRequest(**ARGS), other, 0.5)
    hook = [LoRASpec(str(lora_file), 1.0)]
    out = generate_to_file(tiny_ldm, req, tmp_path / "both.png", progress=False, loras=hook)[0]
    want = [("style.safetensors", 1.0, False), ("other.safetensors", 0.5, False)]
    listed = json.loads(Image.open(out).text["ldmkit"])["loras"]
    assert [(r["file"], r["scale"], r["merged"]) for r in listed] == want
    both, _ = hooked(ldm, lora_file, lambda: generate(ldm, req))
    assert np.array_equal(pixels(out), np.asarray(to_pil(both[0])))  # each of them steered the image
    image = tmp_path / "in.png"
    to_pil(torch.linspace(-1, 1, 256).view(1, 16, 16)).save(image)
    edited = img2img_to_file(tiny_ldm, image, req, 0.8, tmp_path / "edit.png", progress=False, loras=hook)[0]
    listed = json.loads(Image.open(edited).text["ldmkit"])["loras"]
    assert [(r["file"], r["scale"], r["merged"]) for r in listed] == want


@pytest.mark.parametrize("edit", ["img2img", "inpaint"])
def test_an_edit_applies_the_request_loras(ldm, lora_file, edit):
    image = torch.linspace(-1, 1, 256).view(1, 1, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    run = {
        "img2img": lambda r: img2img(ldm, image, r, 0.8)[0],
        "inpaint": lambda r: inpaint(ldm, r, image, mask)[0],
    }[edit]
    req = SampleRequest(**ARGS)
    base, on = run(req), run(with_lora(req, lora_file, 1.0))
    assert not torch.equal(on, base)
    assert torch.equal(on, hooked(ldm, lora_file, lambda: run(req)))
    assert torch.equal(run(with_lora(req, lora_file, 0.0)), base)


def test_upscale_applies_the_request_loras(upscaler, tmp_path):  # noqa: F811
    path = random_lora(upscaler.unet, tmp_path / "up.safetensors", 1)
    low = torch.linspace(-1, 1, 64).view(1, 1, 8, 8)
    req = SampleRequest(n=1, steps=2, seed=5)
    base, _ = upscale(upscaler, low, req)
    on, _ = upscale(upscaler, low, with_lora(req, path, 1.0))
    assert not torch.equal(on, base)
    assert torch.equal(on, hooked(upscaler, path, lambda: upscale(upscaler, low, req)[0]))
    assert torch.equal(upscale(upscaler, low, with_lora(req, path, 0.0))[0], base)


def test_a_missing_request_lora_is_refused_where_the_request_is_built(tmp_path):
    with pytest.raises(InputError, match="--lora .*none.safetensors: no such file"):
        with_lora(SampleRequest(**ARGS), tmp_path / "none.safetensors", 1.0)
