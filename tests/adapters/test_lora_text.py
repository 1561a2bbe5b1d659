"""Text-encoder LoRAs: kohya's `lora_te_*` and PEFT's `text_encoder.*` layers applied to the CLIP and trainable text
encoders, with CLIP's output equal to diffusers' after `load_lora_weights`, and per image in a shared batch."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from ldmkit.adapters import load_lora_parts, read_lora, save_lora, target_paths
from ldmkit.conditioning.clip import CLIPTextEncoder
from ldmkit.errors import InputError
from ldmkit.ldm import LatentDiffusion
from ldmkit.nn.lora import LoRASet, attach
from ldmkit.pipelines.batching import generate_together
from ldmkit.pipelines.lora import LoRASpec
from ldmkit.pipelines.request import SampleRequest
from tests.tiny_sd import SD_SCHEDULE, rel_err, sd_pipeline, tiny_sd


def random_set(net, targets="all", seed=5, scale=0.3):
    lora = LoRASet.for_modules(net, target_paths(net, targets), 2, 3.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.items():
            m.down.copy_(torch.randn(m.down.shape, generator=g) * scale)
            m.up.copy_(torch.randn(m.up.shape, generator=g) * scale)
    return lora


@pytest.fixture(scope="module")
def sd():
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    return diffusers, *tiny_sd(diffusers)


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_a_clip_text_encoder_lora_matches_diffusers_load_lora_weights(sd, tmp_path, layout):
    diffusers, unet, vae, _, ldm = sd
    enc = CLIPTextEncoder("tiny")
    text = random_set(enc)
    assert any("self_attn.q_proj" in p for p in text.paths()) and any("mlp.fc1" in p for p in text.paths())
    path = save_lora(tmp_path / "l.safetensors", random_set(ldm.unet, "attn"), ldm.unet, layout, text=(text, enc))
    assert sorted(read_lora(path).parts) == ["text", "unet"]
    keys = load_file(str(path))  # the names SD 1.x files use for CLIP's layers
    first = {"kohya": "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"}
    assert first.get(layout, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight") in keys
    pipe = sd_pipeline(diffusers.StableDiffusionPipeline, unet, vae, diffusers.DDIMScheduler(**SD_SCHEDULE))
    pipe.register_modules(text_encoder=copy.deepcopy(enc.model))
    ids, mask = enc.tokenize(["a photo of a red apple", ""])
    with torch.no_grad():
        base = pipe.text_encoder(ids).last_hidden_state
        pipe.load_lora_weights(str(path), adapter_name="x")  # diffusers' kohya converter handles lora_te_ for SD 1.x
        expected = pipe.text_encoder(ids).last_hidden_state
        pipe.unload_lora_weights()  # the U-Net is the module's: leave it as it was
        _, ours = load_lora_parts(path, ldm.unet, enc)
        h = attach(enc, ours)
        got = enc(ids, mask)
        h.remove()
        assert torch.equal(enc(ids, mask), base), "removing the hooks restores the encoder"
    assert rel_err(expected, base) > 0.05  # the LoRA changes the output visibly
    assert rel_err(expected, got) < 1e-5


def test_text_layers_that_do_not_fit_are_refused(sd, tmp_path):
    _, _, _, _, ldm = sd
    enc = CLIPTextEncoder("tiny")
    path = save_lora(
        tmp_path / "l.safetensors", random_set(ldm.unet, "attn"), ldm.unet, "kohya", text=(random_set(enc), enc)
    )
    with pytest.raises(InputError, match="adapts a text encoder .* and this model has none"):
        load_lora_parts(path, ldm.unet, None)
    wider = CLIPTextEncoder("tiny", width=32, mlp_width=64)
    with pytest.raises(
        InputError, match=r"text-encoder layers do not fit .* 0 of its \d+ match, first unmatched lora_te_"
    ):
        load_lora_parts(path, ldm.unet, wider)


@pytest.fixture(scope="module")
def text_ldm(tiny_text_ldm):
    return LatentDiffusion.load(tiny_text_ldm)


def test_a_trainable_text_encoder_lora_changes_the_image_and_batches_per_image(text_ldm, tmp_path):
    unet, enc = text_ldm.unet, text_ldm.text_encoder
    empty = LoRASet({})
    both = save_lora(tmp_path / "both.safetensors", random_set(unet), unet, "peft", text=(random_set(enc, seed=2), enc))
    text_only = save_lora(tmp_path / "text.safetensors", empty, unet, "kohya", text=(random_set(enc, seed=3), enc))
    assert not read_lora(text_only).parts.get("unet")
    req = SampleRequest(n=1, prompts=["a red apple"], cfg=3.0, seed=2, steps=2)
    with_text = SampleRequest(**{**req.__dict__, "loras": (LoRASpec(str(text_only), 1.5),)})
    with_both = SampleRequest(**{**req.__dict__, "loras": (LoRASpec(str(both), -0.7),)})
    together = generate_together(text_ldm, [req, with_text, with_both])
    alone = [generate_together(text_ldm, [r])[0] for r in (req, with_text, with_both)]
    for a, b in zip(alone, together):
        assert torch.equal(a, b)
    assert not torch.equal(alone[0], alone[1]), "a LoRA on the text encoder alone changes the image"
