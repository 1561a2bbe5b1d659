"""The pictures of docs/editing.md and the README's editing quick start: docs/img2img.png, docs/inpaint.png,
docs/outpaint.png, docs/upscale.png.

    .venv/bin/python docs/make_pictures.py

Each picture is a labelled strip "input | mask | output" (the mask for inpainting only), every panel scaled up
4x with nearest neighbour so that the pixels stay visible. It uses the shipped models (weights/emoji.safetensors,
weights/fashion-mnist.safetensors, and fashion-mnist-inpaint and emoji-upscale when present) with fixed seeds and
takes about a minute on a CPU; inputs are emoji drawn from the installed Noto font and a Fashion-MNIST test image.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ldmkit.config import DataConfig  # noqa: E402
from ldmkit.data import build_dataset  # noqa: E402
from ldmkit.data.emoji import NotoRenderer, finish  # noqa: E402
from ldmkit.data.images import to_pil, uint8_to_tensor  # noqa: E402
from ldmkit.diffusion.lowres import downscale  # noqa: E402
from ldmkit.ldm import LatentDiffusion  # noqa: E402
from ldmkit.pipelines.img2img import img2img  # noqa: E402
from ldmkit.pipelines.inpaint import InpaintOptions, inpaint  # noqa: E402
from ldmkit.pipelines.outpaint import Border, outpaint_canvas  # noqa: E402
from ldmkit.pipelines.request import SampleRequest  # noqa: E402
from ldmkit.pipelines.upscale import upscale  # noqa: E402

OUT = ROOT / "docs"
SCALE = 4  # nearest-neighbour upscaling of every panel
LABEL_H = 18  # pixels of caption above each panel
GAP = 6  # pixels between panels


def emoji(ch: str, size: int) -> torch.Tensor:
    """(1, 3, size, size) in [-1, 1]: the emoji `ch` as the emoji data set draws it (Noto, on white)."""
    return uint8_to_tensor(finish(NotoRenderer()(ch), size).copy())[None]


def strip(panels: list[tuple[str, torch.Tensor]], path: Path) -> Path:
    """Write the (caption, image (1, C, H, W) in [-1, 1]) panels side by side, each scaled SCALE x, captioned."""
    pics = [to_pil(x[0]).convert("RGB") for _, x in panels]
    pics = [p.resize((p.width * SCALE, p.height * SCALE), Image.Resampling.NEAREST) for p in pics]
    w = sum(p.width for p in pics) + GAP * (len(pics) + 1)
    h = max(p.height for p in pics) + LABEL_H + 2 * GAP
    sheet = Image.new("RGB", (w, h), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    x = GAP
    for (caption, _), p in zip(panels, pics):
        draw.text((x, GAP // 2), caption, fill="black", font=font)
        sheet.paste(p, (x, GAP + LABEL_H))
        x += p.width + GAP
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    return path


def make_img2img(ldm: LatentDiffusion) -> Path:
    """A red apple turned into an orange at strength 0.6."""
    x = emoji("\U0001f34e", 64)  # red apple
    req = SampleRequest(n=1, prompts=["orange"], steps=25, cfg=5.0, seed=0)
    out, _ = img2img(ldm, x, req, 0.6)
    return strip([("input", x), ('"orange", strength 0.6', out)], OUT / "img2img.png")


def make_inpaint(ldm: LatentDiffusion, model: LatentDiffusion | None) -> Path:
    """A Fashion-MNIST test image with its centre regenerated under its own class: by the generation model with
    RePaint resampling, and by the inpainting model when there is one."""
    ds = build_dataset(replace(ldm.run.data, split="test", limit=0, holdout=0, crop="center", flip=False))
    item = ds[0]
    x = item["image"][None]  # (1, 1, 32, 32)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    label = int(item["label"])
    req = SampleRequest(n=1, labels=[label], steps=20, cfg=3.0, seed=0)
    out, _ = inpaint(ldm, req, x, mask, InpaintOptions(resample=4, jump=5))
    name = ldm.class_names[label]
    panels = [("input", x), ("mask", mask * 2 - 1), (f"{name}, RePaint", out)]
    if model is not None:
        panels.append((f"{name}, inpaint model", inpaint(model, req, x, mask)[0]))
    return strip(panels, OUT / "inpaint.png")


def make_outpaint(ldm: LatentDiffusion) -> Path:
    """The middle 40x40 of a 64x64 grinning face, enlarged back to 64x64 by 12 pixels on every side."""
    face = emoji("\U0001f600", 64)[..., 12:52, 12:52]  # (1, 3, 40, 40)
    canvas, mask = outpaint_canvas(face, Border.of(12))
    req = SampleRequest(n=1, prompts=["grinning face"], steps=25, cfg=5.0, seed=0)
    out, _ = inpaint(ldm, req, canvas, mask, InpaintOptions())
    shown = torch.where(mask > 0.5, torch.ones_like(canvas), canvas)  # the input, centred on white
    return strip([("input", shown), ('"grinning face", +12 px', out)], OUT / "outpaint.png")


def make_upscale(ldm: LatentDiffusion) -> Path:
    """A held-out emoji (the data set's last) shrunk 4x and brought back by bicubic interpolation and the upscaler."""
    data = build_dataset(DataConfig(dataset="emoji", resolution=ldm.run.data.resolution, channels=3))
    x = data[len(data) - 1]["image"][None]  # (1, 3, 64, 64)
    k = ldm.run.upscale.factor
    low = downscale(x, k)
    out, _ = upscale(ldm, low, SampleRequest(n=1, steps=25, cfg=1.0, seed=0))
    big = F.interpolate(low, scale_factor=k, mode="nearest")
    bicubic = F.interpolate(low, scale_factor=k, mode="bicubic", align_corners=False).clamp(-1, 1)
    panels = [(f"input {low.shape[-1]}px", big), ("bicubic", bicubic), ("ldmkit upscale", out), ("original", x)]
    return strip(panels, OUT / "upscale.png")


def optional(name: str) -> LatentDiffusion | None:
    path = ROOT / "weights" / f"{name}.safetensors"
    return LatentDiffusion.load(path) if path.is_file() else None


def main() -> int:
    torch.manual_seed(0)
    emoji_model = LatentDiffusion.load(ROOT / "weights" / "emoji.safetensors")
    fashion = LatentDiffusion.load(ROOT / "weights" / "fashion-mnist.safetensors")
    paths = [make_img2img(emoji_model), make_inpaint(fashion, optional("fashion-mnist-inpaint"))]
    paths.append(make_outpaint(emoji_model))
    upscaler = optional("emoji-upscale")
    if upscaler is not None:
        paths.append(make_upscale(upscaler))
    for path in paths:
        print(f"written {path} ({path.stat().st_size / 1024:.0f} KB, {np.asarray(Image.open(path)).shape})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
