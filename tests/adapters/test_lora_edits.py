"""LoRAs on the edit commands: `ldmkit img2img / inpaint / outpaint --lora FILE[:SCALE] [--lora-merge]`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.adapters import save_lora, target_paths
from ldmkit.checkpoint import file_sha256
from ldmkit.cli import main
from ldmkit.ldm import LatentDiffusion
from ldmkit.nn.lora import LoRASet


def _lora(path, tiny_ldm, seed):
    unet = LatentDiffusion.load(tiny_ldm).unet
    lora = LoRASet.for_modules(unet, target_paths(unet, "all"), 2, 4.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.items():
            m.up.copy_(torch.randn(m.up.shape, generator=g))  # a non-zero update
    return save_lora(path, lora, unet, "kohya")


@pytest.fixture
def loras(tmp_path, tiny_ldm):
    return _lora(tmp_path / "style.safetensors", tiny_ldm, 0), _lora(tmp_path / "other.safetensors", tiny_ldm, 1)


@pytest.fixture
def inputs(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "in.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[4:10, 5:12] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return arr, mask > 0


# each command: its arguments, and the input's pixels it must keep exactly (None: img2img keeps none)
COMMANDS = {
    "img2img": (["img2img", "{d}/in.png", "--strength", "0.75"], None),
    "inpaint": (["inpaint", "{d}/in.png", "--mask", "{d}/mask.png"], "mask"),
    "outpaint": (["outpaint", "{d}/in.png", "--right", "8"], "border"),
}


def _edit(tmp_path, tiny_ldm, command, name, *extra):
    argv = [a.format(d=tmp_path) for a in COMMANDS[command][0]]
    out = tmp_path / f"{command}-{name}.png"
    common = ["--model", str(tiny_ldm), "--label", "1", "--n", "1", "--steps", "4", "--seed", "3", "--quiet"]
    assert main([*argv, *common, "--out", str(out), *extra]) in (0, None)
    img = Image.open(out)
    return np.asarray(img).astype(int), json.loads(img.text["ldmkit"])


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_edit_with_a_lora_unmerged_merged_and_at_scale_0(tmp_path, tiny_ldm, loras, inputs, command):
    arr, regenerate = inputs
    style = loras[0]
    base, base_meta = _edit(tmp_path, tiny_ldm, command, "base")
    zero, _ = _edit(tmp_path, tiny_ldm, command, "zero", "--lora", f"{style}:0")
    on, meta = _edit(tmp_path, tiny_ldm, command, "on", "--lora", f"{style}:0.8")
    merged, merged_meta = _edit(tmp_path, tiny_ldm, command, "merged", "--lora", f"{style}:0.8", "--lora-merge")
    assert "loras" not in base_meta
    assert np.array_equal(zero, base), "scale 0 adds an exact zero"
    assert np.abs(merged - on).max() <= 2, "merged and unmerged agree to rounding"
    kept = {"mask": ~regenerate, "border": np.pad(np.ones((16, 16), bool), ((0, 0), (0, 8)))}.get(COMMANDS[command][1])
    if kept is None:
        assert (on != base).any(), "the LoRA changes the edited image"
    else:
        assert (on[~kept] != base[~kept]).any(), "the LoRA changes the regenerated region"
        ref = np.pad(arr, ((0, 0), (0, on.shape[1] - 16)))  # the input where it is kept
        for img in (on, merged, zero):
            assert np.array_equal(img[kept], ref[kept]), "kept pixels stay the input's bit for bit"
    sha = file_sha256(style)
    assert meta["loras"] == [{"file": "style.safetensors", "sha256": sha, "scale": 0.8, "merged": False}]
    assert merged_meta["loras"] == [{"file": "style.safetensors", "sha256": sha, "scale": 0.8, "merged": True}]


def test_repeated_loras_are_recorded_and_a_missing_file_is_one_line(tmp_path, tiny_ldm, loras, inputs, capsys):
    style, other = loras
    _, meta = _edit(tmp_path, tiny_ldm, "inpaint", "two", "--lora", f"{style}:0.8", "--lora", f"{other}:-0.5")
    assert [(r["file"], r["sha256"], r["scale"]) for r in meta["loras"]] == [
        ("style.safetensors", file_sha256(style), 0.8),
        ("other.safetensors", file_sha256(other), -0.5),
    ]
    capsys.readouterr()
    argv = ["img2img", str(tmp_path / "in.png"), "--model", str(tiny_ldm), "--label", "1", "--quiet"]
    assert main([*argv, "--lora", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "none.safetensors: no such file" in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()
