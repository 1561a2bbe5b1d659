"""Requests with different LoRAs in one forward pass: each image is bit for bit what its request alone gives."""

import pytest
import torch

from ldmkit.adapters import save_lora, target_paths
from ldmkit.adapters.files import Factors, LoRAFile, write_lora
from ldmkit.errors import InputError
from ldmkit.ldm import LatentDiffusion
from ldmkit.nn.lora import LoRASet
from ldmkit.pipelines.batching import generate_together, share_key
from ldmkit.pipelines.generate import SampleRequest, generate
from ldmkit.pipelines.lora import LoRAFolder, LoRASpec, apply_loras


def random_lora(unet, path, seed: int, targets: str = "all"):
    """A LoRA of rank 2 with random factors (a fresh one adds zero), written in the kohya layout."""
    lora = LoRASet.for_modules(unet, target_paths(unet, targets), 2, 4.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.items():
            m.up.copy_(torch.randn(m.up.shape, generator=g))
    return save_lora(path, lora, unet, "kohya")


@pytest.fixture(scope="module")
def ldm(tiny_text_ldm):
    return LatentDiffusion.load(tiny_text_ldm)


@pytest.fixture(scope="module")
def folder(ldm, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    random_lora(ldm.unet, root / "ink.safetensors", 1)
    random_lora(ldm.unet, root / "styles" / "toy.safetensors", 2, "attn")
    return LoRAFolder(root)


def test_requests_with_different_loras_share_a_batch_and_keep_their_images(ldm, folder):
    ink, toy = folder.resolve(ldm, [LoRASpec("", 0.8, "ink"), LoRASpec("", -0.5, "styles/toy")])
    reqs = [
        SampleRequest(n=1, prompts=["a red apple"], cfg=4.0, seed=3, steps=3),
        SampleRequest(n=2, prompts=["a red apple"], cfg=4.0, seed=3, steps=3, loras=(ink,)),
        SampleRequest(n=1, prompts=["blue"], cfg=1.0, seed=7, steps=3, loras=(toy,)),  # no guidance: its own key
        SampleRequest(n=1, prompts=["blue"], cfg=2.0, seed=7, steps=3, loras=(toy, ink)),
    ]
    assert share_key(reqs[0]) == share_key(reqs[1]) == share_key(reqs[3])
    guided = [reqs[0], reqs[1], reqs[3]]
    together = generate_together(ldm, guided, batch_size=3)  # passes of 3 and 1 images, across LoRAs
    for req, got in zip(guided, together):
        assert torch.equal(generate_together(ldm, [req])[0], got), req.loras
    assert not torch.equal(together[0][0], together[1][0]), "the LoRA changes the image of the same seed"
    # alone, as the command line applies a LoRA to the whole model: the same bits
    for req in (reqs[1], reqs[2]):
        hooked = apply_loras(ldm, list(req.loras))
        try:
            alone, _ = generate(ldm, SampleRequest(**{**req.__dict__, "loras": ()}))
        finally:
            for h in hooked:
                h.remove()
        assert torch.equal(alone, generate_together(ldm, [req])[0])


def test_a_zero_scale_is_no_lora_bit_for_bit(ldm, folder):
    (ink,) = folder.resolve(ldm, [LoRASpec("", 0.0, "ink")])
    req = SampleRequest(n=1, prompts=["x"], cfg=3.0, seed=1, steps=2)
    plain, zero = generate_together(ldm, [req, SampleRequest(**{**req.__dict__, "loras": (ink,)})])
    assert torch.equal(plain, zero)


def test_the_folder_lists_resolves_and_refuses_names_outside_it(ldm, folder, tmp_path):
    assert folder.names() == ["ink", "styles/toy"]
    (toy,) = folder.resolve(ldm, [LoRASpec("", 1.0, "styles/toy.safetensors")])
    assert toy.path.endswith("toy.safetensors") and len(toy.sha256) == 64
    record = SampleRequest(loras=(toy,)).record()
    assert record["loras"] == [{"name": "styles/toy.safetensors", "sha256": toy.sha256, "scale": 1.0}]
    assert "loras" not in SampleRequest().record(), "a request without LoRAs records none"
    outside = tmp_path / "secret.safetensors"
    random_lora(ldm.unet, outside, 3)
    (folder.root / "link.safetensors").symlink_to(outside)
    try:
        for name in ("../secret", "/etc/passwd", "link", "styles/../../x"):
            with pytest.raises(InputError, match="leaves the LoRA folder"):
                folder.resolve(ldm, [LoRASpec("", 1.0, name)])
        assert "link" not in folder.names()
    finally:
        (folder.root / "link.safetensors").unlink()
    with pytest.raises(InputError, match="'nope' is not in this server's LoRA folder"):
        folder.resolve(ldm, [LoRASpec("", 1.0, "nope")])


def test_a_lora_for_another_model_is_refused_by_its_name(folder, ldm):
    layer = Factors(torch.zeros(2, 320), torch.zeros(320, 2), 2.0)  # SD 1.5's width: another architecture
    write_lora(folder.root / "other.safetensors", LoRAFile("kohya", {"unet": {"down_blocks_0_attn_to_q": layer}}))
    try:
        with pytest.raises(InputError, match="'other': the LoRA does not fit this model") as err:
            folder.resolve(ldm, [LoRASpec("", 1.0, "other")])
        assert str(folder.root) not in str(err.value)
    finally:
        (folder.root / "other.safetensors").unlink()


def test_request_loras_are_checked():
    with pytest.raises(InputError, match="twice"):
        SampleRequest(loras=(LoRASpec("", 1.0, "a"), LoRASpec("", 0.5, "a")))
    with pytest.raises(InputError, match="finite"):
        SampleRequest(loras=(LoRASpec("a.safetensors", float("nan")),))
