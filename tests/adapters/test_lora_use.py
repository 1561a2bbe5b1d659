"""LoRAs at sampling time: `ldmkit generate --lora FILE[:SCALE] [--lora-merge]` and `ldmkit lora inspect`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.adapters import save_lora, target_paths
from ldmkit.cli import main
from ldmkit.errors import InputError
from ldmkit.ldm import LatentDiffusion
from ldmkit.nn.lora import LoRASet
from ldmkit.pipelines.lora import LoRASpec, check_loras, parse_lora


@pytest.fixture
def lora_file(tmp_path, tiny_ldm):
    unet = LatentDiffusion.load(tiny_ldm).unet
    lora = LoRASet.for_modules(unet, target_paths(unet, "all"), 2, 4.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in lora.items():
            m.up.copy_(torch.randn(m.up.shape, generator=g))
    return save_lora(tmp_path / "style.safetensors", lora, unet, "kohya")


def test_scales_are_parsed_and_bad_ones_refused(tmp_path):
    assert parse_lora("a.safetensors:0.5") == LoRASpec("a.safetensors", 0.5)
    assert parse_lora("a.safetensors:-1") == LoRASpec("a.safetensors", -1.0)
    assert parse_lora("a.safetensors") == LoRASpec("a.safetensors", 1.0)
    for bad, why in (("a.safetensors:nan", "not finite"), ("a.safetensors:", "empty"), ("a.safetensors:x", "number")):
        with pytest.raises(InputError, match=why):
            parse_lora(bad)
    with pytest.raises(InputError, match="given twice"):
        check_loras([LoRASpec("a.safetensors", 1.0), LoRASpec("./a.safetensors", 0.5)])


def _generate(tmp_path, tiny_ldm, name, *extra):
    out = tmp_path / f"{name}.png"
    argv = ["generate", "--model", str(tiny_ldm), "--label", "0", "--n", "1", "--steps", "4", "--seed", "3"]
    assert main([*argv, "--out", str(out), "--quiet", *extra]) in (0, None)
    return np.asarray(Image.open(out)).astype(int)


def test_generate_with_a_lora_unmerged_and_merged(tmp_path, tiny_ldm, lora_file):
    base = _generate(tmp_path, tiny_ldm, "base")
    zero = _generate(tmp_path, tiny_ldm, "zero", "--lora", f"{lora_file}:0")
    on = _generate(tmp_path, tiny_ldm, "on", "--lora", f"{lora_file}:0.8")
    merged = _generate(tmp_path, tiny_ldm, "merged", "--lora", f"{lora_file}:0.8", "--lora-merge")
    assert np.array_equal(zero, base), "scale 0 adds an exact zero"
    assert (on != base).any(), "the LoRA changes the image (the untrained tiny model's output layer is near zero)"
    assert np.abs(merged - on).max() <= 2, "merged and unmerged agree to rounding"
    meta = json.loads(Image.open(tmp_path / "on.png").text["ldmkit"])
    assert meta["loras"][0]["scale"] == 0.8 and len(meta["loras"][0]["sha256"]) == 64


def test_inspect_shows_the_layout_and_the_layers_that_fit(tmp_path, tiny_ldm, lora_file, capsys):
    assert main(["lora", "inspect", str(lora_file), "--model", str(tiny_ldm)]) in (0, None)
    shown = json.loads(capsys.readouterr().out)
    assert shown["layout"] == "kohya" and shown["ranks"] == [2] and shown["alphas"] == [4.0]
    assert shown["fits"] and shown["unmatched"] == [] and shown["matched"] == shown["layers"]["unet"]
