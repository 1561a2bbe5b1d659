"""LoRA files: both layouts round-trip, and a LoRA on a converted tiny SD U-Net gives diffusers' output after
`load_lora_weights` (PEFT underneath) to 1e-4."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldmkit.adapters import load_lora, match, read_lora, save_lora, target_paths
from ldmkit.conditioning.types import Conditioning
from ldmkit.errors import InputError
from ldmkit.nn.lora import LoRASet, attach
from tests.tiny_sd import SD_SCHEDULE, rel_err, sd_pipeline, tiny_sd

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")


def _random_set(unet, targets, rank=2, alpha=3.0, seed=5):
    lora = LoRASet.for_modules(unet, target_paths(unet, targets), rank, alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.items():
            m.down.copy_(torch.randn(m.down.shape, generator=g) * 0.3)
            m.up.copy_(torch.randn(m.up.shape, generator=g) * 0.3)
    return lora


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3.0, 801.0]), torch.randn(2, 5, 16, generator=g)


@pytest.fixture(scope="module")
def sd():
    return tiny_sd(diffusers)


@pytest.mark.parametrize("layout", ["peft", "kohya"])
@pytest.mark.parametrize("targets", ["attn", "attn+ff", "all", "all+conv"])
def test_lora_matches_diffusers_load_lora_weights(sd, tmp_path, layout, targets):
    unet, vae, _, ldm = sd
    ours = ldm.unet
    lora = _random_set(ours, targets)
    path = save_lora(tmp_path / "lora.safetensors", lora, ours, layout)
    pipe = sd_pipeline(diffusers.StableDiffusionPipeline, unet, vae, diffusers.DDIMScheduler(**SD_SCHEDULE))
    x, t, ctx = _inputs()
    with torch.no_grad():
        base = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        pipe.load_lora_weights(str(path), adapter_name="x")
        expected = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        pipe.unload_lora_weights()
        h = attach(ours, load_lora(path, ours))
        got = ours(x, t, Conditioning(context=ctx))
        h.remove()
    assert rel_err(expected, base) > 0.05  # the LoRA changes the output visibly
    assert rel_err(expected, got) < 1e-4


@pytest.mark.parametrize("layout", ["peft", "kohya"])
@pytest.mark.parametrize("targets", ["all", "all+conv"])
def test_both_layouts_round_trip(sd, tmp_path, layout, targets):
    ours = sd[3].unet
    lora = _random_set(ours, targets)
    back = load_lora(save_lora(tmp_path / "l.safetensors", lora, ours, layout), ours)
    assert sorted(back.paths()) == sorted(lora.paths())
    for p, m in lora.items():
        assert torch.allclose(back[p].delta_weight(), m.delta_weight(), atol=1e-6)
    f = read_lora(tmp_path / "l.safetensors")
    assert f.layout == layout and {x.rank for _, _, x in f.layers()} == {2}


def test_a_lora_for_another_architecture_names_the_matches_and_the_first_miss(sd, tmp_path):
    ours = sd[3].unet
    lora = _random_set(ours, "attn")
    path = save_lora(tmp_path / "l.safetensors", lora, ours, "kohya")
    assert not match(read_lora(path), ours).unmatched  # every layer fits the model it was made for
    state = {k.replace("down_blocks_0", "down_blocks_7"): v for k, v in load_file(str(path)).items()}
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(InputError, match=r"of its \d+ U-Net layers match, first unmatched lora_unet_down_blocks_7"):
        load_lora(tmp_path / "bad.safetensors", ours)


def test_bad_files_are_refused_in_one_line(tmp_path):
    (tmp_path / "a.ckpt").write_bytes(b"x")
    with pytest.raises(InputError, match="safetensors only"):
        read_lora(tmp_path / "a.ckpt")
    (tmp_path / "t.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(InputError, match="truncated"):
        read_lora(tmp_path / "t.safetensors")
    base = {"lora_unet_down.lora_down.weight": torch.zeros(2, 4), "lora_unet_down.lora_up.weight": torch.zeros(4, 2)}
    for extra in (
        {"lora_unet_down.lora_mid.weight": torch.zeros(2, 2, 3, 3)},
        {"lora_unet_x.hada_w1_a": torch.zeros(4, 2)},
    ):
        save_file(base | extra, str(tmp_path / "lycoris.safetensors"))
        with pytest.raises(InputError, match="a LyCORIS file .*(lora_mid|hada_w1_a) keys.*does not apply"):
            read_lora(tmp_path / "lycoris.safetensors")
