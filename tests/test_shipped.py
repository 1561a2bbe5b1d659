"""The models in weights/: small enough to ship, half precision, documented, and drawing what they are asked for.

Skipped where the weights are absent (a checkout without them, or a user's own LDMKIT_WEIGHTS folder).
"""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ldmkit import checkpoint
from ldmkit.adapters.files import META_KEY
from ldmkit.config import DataConfig
from ldmkit.data import build_dataset
from ldmkit.diffusion.lowres import downscale
from ldmkit.errors import InputError
from ldmkit.ldm import LatentDiffusion
from ldmkit.pipelines.generate import generate
from ldmkit.pipelines.inpaint import inpaint
from ldmkit.pipelines.request import SampleRequest
from ldmkit.pipelines.upscale import upscale
from ldmkit.shipped import CONTROLNETS, SHIPPED, default_model, load_model, plan_generation, weights_dir

PRESENT = [n for n in sorted(SHIPPED) if (weights_dir() / f"{n}.safetensors").exists()]
PRESENT_CONTROLNETS = [n for n in sorted(CONTROLNETS) if (weights_dir() / f"{n}.safetensors").exists()]


def needs(name: str):
    present = PRESENT + PRESENT_CONTROLNETS
    return pytest.mark.skipif(name not in present, reason=f"weights/{name}.safetensors is not in this checkout")


@pytest.mark.skipif(not PRESENT, reason="no shipped weights in this checkout")
def test_shipped_weights_are_small_half_precision_and_documented():
    total = 0
    for name in PRESENT:
        path = weights_dir() / f"{name}.safetensors"
        total += path.stat().st_size
        if META_KEY in checkpoint.read_header(path):  # a LoRA that names its shipped base (an LCM-LoRA)
            base = json.loads(checkpoint.read_header(path)[META_KEY])["base"]
            assert base in SHIPPED and base != name, name
            assert {t.dtype for t in load_file(str(path)).values()} == {torch.float16}, name
        else:
            meta = checkpoint.read_metadata(path)
            assert meta["kind"] == "ldm" and meta["stored_dtype"] == "float16", name
        for suffix in (".md", ".png", ".json"):
            assert (weights_dir() / f"{name}{suffix}").exists(), f"{name}{suffix}"
        assert "recipes/build.py" in (weights_dir() / f"{name}.md").read_text()
    for name in PRESENT_CONTROLNETS:  # a ControlNet names the shipped model it steers, whose file it was made on
        path = weights_dir() / f"{name}.safetensors"
        total += path.stat().st_size
        meta = checkpoint.read_metadata(path)
        assert meta["kind"] == "controlnet" and meta["base"] in SHIPPED, name
        assert meta["base_sha256"] == checkpoint.file_sha256(weights_dir() / f"{meta['base']}.safetensors"), name
        assert {t.dtype for t in load_file(str(path)).values()} == {torch.float16}, name
        for suffix in (".md", ".png", ".json"):
            assert (weights_dir() / f"{name}{suffix}").exists(), f"{name}{suffix}"
        assert "recipes/build.py" in (weights_dir() / f"{name}.md").read_text()
    everything = sum(p.stat().st_size for p in weights_dir().iterdir() if p.is_file())
    assert total <= everything < 60 * 2**20  # weights/ in all, cards and grids included


def _class_means() -> torch.Tensor:
    """The mean image (10, 1024) of each class among the first 2000 Fashion-MNIST test images."""
    from ldmkit.data.fashion_mnist import FashionMNIST

    ds = FashionMNIST(DataConfig(dataset="fashion-mnist", resolution=32, channels=1, split="test"))
    real = torch.stack([ds[i]["image"] for i in range(2000)]).flatten(1)
    labels = torch.tensor([ds[i]["label"] for i in range(2000)])
    return torch.stack([real[labels == c].mean(0) for c in range(10)])


@needs("fashion-mnist")
@pytest.mark.parametrize(
    "name, req",
    [
        ("fashion-mnist", SampleRequest(n=40, steps=20, device="cpu")),
        pytest.param(
            "fashion-mnist-lcm",
            SampleRequest(n=40, sampler="lcm", steps=4, cfg=1.0, device="cpu"),
            marks=needs("fashion-mnist-lcm"),
        ),
    ],
)
def test_fashion_mnist_model_draws_the_requested_class(name, req):
    """Generated images are classified by the nearest class mean of real test images (a crude classifier: 67% on
    real images, chance 10%). Ignoring the label would score about 10%; the shipped model scores about 90%, and its
    4-step LCM-LoRA (loaded as the base with the LoRA merged) must too."""
    means = _class_means()
    ldm = load_model(weights_dir() / f"{name}.safetensors")
    images, captions = generate(ldm, req)  # every class in turn
    assert images.shape == (40, 1, 32, 32) and torch.isfinite(images).all()
    assert captions[:10] == ldm.class_names
    wanted = torch.arange(40) % 10
    accuracy = (torch.cdist(images.flatten(1), means).argmin(1) == wanted).float().mean()
    assert accuracy >= 0.7, f"only {accuracy:.0%} of the images look like their class"


def _foreground_colour(x: torch.Tensor) -> torch.Tensor:
    """Mean RGB (B, 3) of the pixels that are not near-white (emoji are drawn on white); x (B, 3, H, W) in [-1, 1]."""
    x = x.flatten(2)
    fg = (x.min(1).values < 0.8).float()  # (B, HW)
    return (x * fg[:, None]).sum(-1) / fg.sum(-1, keepdim=True).clamp_min(1)


@needs("emoji")
def test_emoji_model_follows_its_prompt():
    """ "red apple" draws red and "grinning face" yellow: yellow is red plus green, so at least 6 of 8 apples hold less
    green than every one of 8 faces. A model ignoring the prompt draws both from one distribution, and 6 of its 8 would
    fall below all 8 of the others with odds of about 1 in 290. (The real emoji: apple green -0.35, face +0.37.)"""
    from ldmkit.data.emoji import load_or_render
    from ldmkit.data.images import uint8_to_tensor

    prompts = ["red apple", "grinning face"]
    arr, captions = load_or_render(("noto",), 64, progress=False)
    real = _foreground_colour(torch.stack([uint8_to_tensor(arr[captions.index(p)]) for p in prompts]))
    assert real[0, 1] < 0 < real[1, 1]  # the references: red and yellow
    ldm = LatentDiffusion.load(weights_dir() / "emoji.safetensors")
    images, caps = generate(
        ldm, SampleRequest(n=16, prompts=[p for p in prompts for _ in range(8)], steps=20, device="cpu")
    )
    assert images.shape == (16, 3, 64, 64) and torch.isfinite(images).all() and caps[0] == "red apple"
    green = _foreground_colour(images)[:, 1]
    below = int((green[:8] < green[8:].min()).sum())
    assert below >= 6, f"only {below} of 8 apples hold less green than every face: {green.tolist()}"


@needs("fashion-mnist-inpaint")
def test_the_inpainting_model_is_the_inpaint_default_and_keeps_what_it_is_not_asked_to_change():
    assert default_model("inpaint") == "fashion-mnist-inpaint"
    ldm = LatentDiffusion.load(weights_dir() / "fashion-mnist-inpaint.safetensors")
    assert ldm.task == "inpaint" and ldm.num_classes == 10
    x = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    m = torch.zeros(1, 1, 32, 32)
    m[..., 8:24, 8:24] = 1
    out, _ = inpaint(ldm, SampleRequest(n=1, labels=[0], steps=5), x, m)
    assert torch.equal(out[..., m[0, 0] == 0], x[..., m[0, 0] == 0])  # every kept pixel exactly
    assert (out - x).abs()[..., 10:22, 10:22].mean() > 0.05  # the box was regenerated


@needs("fashion-mnist-inpaint")
@needs("emoji")
def test_inpaint_without_a_model_takes_the_inpainting_model_or_for_a_prompt_a_text_model():
    assert plan_generation(None, [], [0], 1, task="inpaint").checkpoint.name == "fashion-mnist-inpaint.safetensors"
    assert plan_generation(None, ["red apple"], None, 1, task="inpaint").checkpoint.name == "emoji.safetensors"
    assert plan_generation(None, ["red apple"], None, 1).checkpoint.name == "emoji.safetensors"
    assert plan_generation(None, [], None, 1, task="upscale").checkpoint.name.startswith("emoji-upscale")
    with pytest.raises(InputError, match="the upscaler 'emoji-upscale' is not text-conditional.*drop --prompt"):
        plan_generation(None, ["a cat"], None, 1, task="upscale")


@needs("emoji-upscale")
def test_the_upscaler_is_the_upscale_default_and_sharper_than_its_blurred_input():
    """A held-out emoji shrunk 4x and brought back: the result has the original's size and is closer to it than the
    shrunk image enlarged by pixel repetition."""
    assert default_model("upscale") == "emoji-upscale"
    ldm = LatentDiffusion.load(weights_dir() / "emoji-upscale.safetensors")
    assert ldm.task == "upscale" and ldm.run.upscale.factor == 4
    data = build_dataset(DataConfig(dataset="emoji", resolution=64, channels=3))
    x = data[len(data) - 1]["image"][None]  # held out from the upscaler's training
    low = downscale(x, 4)
    out, _ = upscale(ldm, low, SampleRequest(n=1, steps=10, cfg=1.0))
    assert out.shape == (1, 3, 64, 64)
    blocky = F.interpolate(low, scale_factor=4, mode="nearest")
    assert (out - x).pow(2).mean() < (blocky - x).pow(2).mean()


@needs("emoji-pixel")
@needs("emoji")
def test_the_example_lora_loads_as_its_base_and_draws_nearer_pixel_art():
    """emoji-pixel, a style LoRA naming emoji, loads by name as emoji with the LoRA merged, and on the same prompts
    and seeds draws images nearer their own 4x4-cell version than emoji's own."""
    req = SampleRequest(n=4, prompts=["red apple", "red apple", "blue heart", "blue heart"], steps=10, device="cpu")
    base, _ = generate(load_model(weights_dir() / "emoji.safetensors"), req)
    styled, _ = generate(load_model(weights_dir() / "emoji-pixel.safetensors"), req)

    def off_the_cells(x):
        return (x - F.avg_pool2d(x, 4).repeat_interleave(4, -2).repeat_interleave(4, -1)).abs().mean()

    assert torch.isfinite(styled).all() and not torch.equal(styled, base)
    assert off_the_cells(styled) < 0.7 * off_the_cells(base)


@needs("emoji-pixel")
def test_a_style_lora_named_as_a_model_is_read_as_its_base_everywhere():
    """`--model emoji-pixel` (a LoRA naming emoji) is planned as a text model, edited with emoji's channels and
    screened against emoji's training data: each of these read the LoRA file as a model's and stopped with "not an
    ldmkit checkpoint"."""
    from ldmkit.governance.similarity import training_data
    from ldmkit.pipelines.img2img import checkpoint_channels

    plan = plan_generation("emoji-pixel", ["red apple"], None, 2)
    assert plan.checkpoint.name == "emoji-pixel.safetensors" and plan.prompts == ["red apple", "red apple"]
    assert checkpoint_channels(plan.checkpoint) == 3
    assert training_data("emoji-pixel").dataset == "emoji"


@needs("fashion-mnist-mask")
@needs("fashion-mnist")
def test_the_mask_controlnet_gives_garments_the_outline_asked_for():
    """fashion-mnist-mask, a low-rank ControlNet loaded on the shipped fashion-mnist: 8 held-out garments' masks,
    each drawn with its own label with and without the ControlNet (same seeds); the drawn garments' masks overlap the
    asked ones (IoU) more with it. Its card measures 0.68 without and about 0.9 with it on 200 images."""
    from ldmkit.config import ControlConfig
    from ldmkit.data.conditions import detect, foreground_mask
    from ldmkit.data.fashion_mnist import FashionMNIST
    from ldmkit.denoisers.controlnet import Control, load_controlnet
    from ldmkit.pipelines.control import controlled
    from ldmkit.shipped import controlnet_file

    ds = FashionMNIST(DataConfig(dataset="fashion-mnist", resolution=32, channels=1, split="test"))
    items = [ds[i * 37] for i in range(8)]
    masks = detect("mask", torch.stack([it["image"] for it in items]), ControlConfig())
    ldm = LatentDiffusion.load(weights_dir() / "fashion-mnist.safetensors")
    net, meta = load_controlnet(controlnet_file("fashion-mnist-mask"), unet=ldm.unet)
    assert meta["config"]["low_rank"] and meta["condition"] == "mask"
    req = SampleRequest(n=8, labels=[int(it["label"]) for it in items], steps=15, seed=0, device="cpu")
    plain, _ = generate(ldm, req)
    with controlled(ldm, [Control(net, masks)], req.steps):
        steered, _ = generate(ldm, req)

    def iou(images):
        got, want = foreground_mask(images)[:, 0] > 0.5, masks[:, 0] > 0.5
        return float(((got & want).sum((1, 2)) / (got | want).sum((1, 2)).clamp(min=1)).mean())

    assert iou(steered) > max(0.8, iou(plain) + 0.1)
