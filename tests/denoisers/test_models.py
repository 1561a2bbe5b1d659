import pytest
import torch

from ldmkit.autoencoder import build_autoencoder
from ldmkit.conditioning.types import Conditioning
from ldmkit.config import AutoencoderConfig, UNetConfig, check_multiple
from ldmkit.denoisers import UNET_PRESETS
from ldmkit.denoisers.unet import UNet
from tests.factory import attention_unet


@pytest.mark.parametrize("kind", ["kl", "vq"])
@pytest.mark.parametrize("mult", [(1, 2, 2), (1, 2, 2, 4)])
def test_autoencoder_shapes(kind, mult):
    cfg = AutoencoderConfig(
        kind=kind, in_channels=3, base_channels=8, channel_mult=mult, latent_channels=4, norm_groups=4, codebook_size=16
    )
    ae = build_autoencoder(cfg)
    x = torch.randn(2, 3, 32, 32)
    z = ae.latents(x)
    assert z.shape == (2, 4, 32 // cfg.factor, 32 // cfg.factor)
    recon, reg, stats = ae(x)
    assert recon.shape == x.shape and reg.shape == (2,) and torch.isfinite(reg).all()
    if kind == "vq":
        assert 0 < stats["codebook_usage"] <= 1


def test_unet_conditioning_paths():
    torch.manual_seed(0)
    cfg = attention_unet(in_channels=6, out_channels=4, context_dim=8, num_classes=3)
    unet = UNet(cfg)
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 10.0])
    base = Conditioning(context=torch.randn(2, 3, 8), labels=torch.tensor([0, 0]), concat=torch.randn(2, 2, 8, 8))
    out = unet(x, t, base)
    assert out.shape == (2, 4, 8, 8)
    # Each input changes the output: labels, context, context mask, concat channels and the noise level.
    for changed in (
        base.map(lambda v: v).__class__(context=base.context, labels=torch.tensor([1, 2]), concat=base.concat),
        base.__class__(context=base.context * 2, labels=base.labels, concat=base.concat),
        base.__class__(
            context=base.context,
            context_mask=torch.tensor([[1, 0, 0], [1, 1, 0]]).bool(),
            labels=base.labels,
            concat=base.concat,
        ),
        base.__class__(context=base.context, labels=base.labels, concat=base.concat + 1),
    ):
        assert not torch.allclose(unet(x, t, changed), out)
    assert not torch.allclose(unet(x, t * 50, base), out)
    with pytest.raises(ValueError, match="expects 6 input channels"):
        unet(x, t, Conditioning(context=base.context, labels=base.labels))


def test_untrained_unet_predicts_zero():
    unet = UNet(attention_unet())
    assert unet(torch.randn(1, 4, 8, 8), torch.tensor([5.0])).abs().max() == 0


def test_presets_sizes():
    tiny = UNet(UNET_PRESETS["tiny"])
    assert sum(p.numel() for p in tiny.parameters()) < 1_000_000
    sd = UNET_PRESETS["sd15"]
    assert sd.context_dim == 768 and sd.channel_mult == (1, 2, 4, 4)


def test_resolution_check_message():
    assert UNetConfig(channel_mult=(1, 2, 2)).factor == 4
    check_multiple("--height", 24, 8, "why")  # a multiple: no error
    with pytest.raises(ValueError, match=r"--height 20 is not a multiple of 8 \(the reason\); use 16 or 24"):
        check_multiple("--height", 20, 8, "the reason")
    with pytest.raises(ValueError, match=r"\(x\); use 8$"):
        check_multiple("--width", 3, 8, "x")


# --- ldmkit.shipped: what `ldmkit generate` runs ------------------------------------------------------------------


def test_generation_plan_for_a_text_model(tiny_text_ldm):
    from pathlib import Path

    from ldmkit.shipped import plan_generation

    plan = plan_generation(str(tiny_text_ldm), ["Red Apple!", "blue whale"], None, 2)
    assert plan.checkpoint == Path(tiny_text_ldm) and plan.n == 4
    assert plan.prompts == ["Red Apple!", "Red Apple!", "blue whale", "blue whale"]
    assert plan.out == Path("generated/red-apple.png")
    assert plan_generation(str(tiny_text_ldm), ["x"], None, 1, out="a/b.png").out == Path("a/b.png")


def test_generation_plan_for_a_class_model(tiny_ldm):
    from ldmkit.errors import InputError
    from ldmkit.shipped import plan_generation

    plan = plan_generation(str(tiny_ldm), [], [1], 3)
    assert plan.prompts is None and plan.n == 3 and plan.out.parent.name == "generated"
    with pytest.raises(InputError, match=r"not text-conditional.*--label N \(0=top-left, 1=bottom-right\)"):
        plan_generation(str(tiny_ldm), ["a cat"], None, 1)
    with pytest.raises(InputError, match="not both"):
        plan_generation(str(tiny_ldm), ["a cat"], [0], 1)
