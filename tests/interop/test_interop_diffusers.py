"""diffusers parity: the same weights in diffusers' and ldmkit's U-Net and autoencoder give the same numbers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldmkit.autoencoder.vae import AutoencoderKL
from ldmkit.conditioning.types import Conditioning
from ldmkit.config import AutoencoderConfig, UNetConfig
from ldmkit.denoisers.unet import UNet
from ldmkit.interop.diffusers import (
    unet_from_diffusers,
    unet_to_diffusers,
    vae_from_diffusers,
    vae_to_diffusers,
    write_diffusers_unet,
    write_diffusers_vae,
)
from ldmkit.interop.diffusers_config import unet_config_from_diffusers, vae_config_from_diffusers
from tests.tiny_sd import TINY_UNET, TINY_VAE, randomize, rel_err

ROOT = Path(__file__).resolve().parents[2]

# the parity tests' tiny U-Net without its head count: each layout below sets its own
BASE_UNET = {k: v for k, v in TINY_UNET.items() if k != "attention_head_dim"}
UNET_CONFIGS = {
    # SD 1.x: 1x1 convolution projections, one head count for every block.
    "sd1": dict(attention_head_dim=2),
    # SD 2.x: linear projections, one head count per block, float32 attention scores, attention at every level.
    "sd2": dict(
        attention_head_dim=[2, 4],
        use_linear_projection=True,
        upcast_attention=True,
        down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2,
    ),
    # Inpainting: 9 input channels (latent, mask, masked-image latent).
    "inpaint": dict(attention_head_dim=4, in_channels=9),
    # Three levels, two residual blocks, two transformer blocks per site, shifted sinusoid, other norm epsilon.
    "deep": dict(
        attention_head_dim=[2, 2, 4],
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        transformer_layers_per_block=2,
        freq_shift=1,
        flip_sin_to_cos=False,
        norm_eps=1e-6,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    # Class-conditional.
    "classes": dict(attention_head_dim=2, num_class_embeds=3),
}


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def make_unet(diffusers, name):
    return randomize(diffusers.UNet2DConditionModel(**{**BASE_UNET, **UNET_CONFIGS[name]}))


def make_vae(diffusers, **kw):
    return randomize(diffusers.AutoencoderKL(**TINY_VAE | dict(scaling_factor=0.13025) | kw))


# --- forward parity -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_unet_forward_matches_diffusers(diffusers, name):
    ref = make_unet(diffusers, name)
    ours = unet_from_diffusers(ref)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, ref.config.in_channels, 8, 8, generator=g)
    t = torch.tensor([3.0, 801.0])
    ctx = torch.randn(2, 5, 16, generator=g)
    labels = torch.tensor([0, 2]) if name == "classes" else None
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=ctx, class_labels=labels).sample
        got = ours(x, t, Conditioning(context=ctx, labels=labels))
    assert expected.abs().mean() > 0.1  # not trivially zero
    assert rel_err(expected, got) < 1e-5


def test_unet_attention_mask_and_inpaint_concat_match_diffusers(diffusers):
    ref = make_unet(diffusers, "inpaint")
    ours = unet_from_diffusers(ref)
    g = torch.Generator().manual_seed(0)
    latent, extra = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 8, 8, generator=g)
    ctx = torch.randn(2, 6, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    t = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        expected = ref(torch.cat([latent, extra], 1), t, encoder_hidden_states=ctx, encoder_attention_mask=mask).sample
        got = ours(latent, t, Conditioning(context=ctx, context_mask=mask.bool(), concat=extra))
        unmasked = ours(latent, t, Conditioning(context=ctx, concat=extra))
    assert rel_err(expected, got) < 1e-5
    assert rel_err(expected[:1], unmasked[:1]) > 1e-3  # the mask matters for the first sample


@pytest.mark.parametrize("mid_attention", [True, False])
def test_vae_encode_decode_match_diffusers(diffusers, mid_attention):
    ref = make_vae(diffusers, mid_block_add_attention=mid_attention)
    ours = vae_from_diffusers(ref)
    assert ours.cfg.scaling_factor == 0.13025 and ours.cfg.mid_attention is mid_attention
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        assert rel_err(ref.encode(x).latent_dist.mean, ours.encode(x).mean) < 1e-5
        assert rel_err(ref.decode(z).sample, ours.decode(z)) < 1e-5


# --- weights round trips --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd1", "sd2", "classes"])
def test_unet_round_trip_through_diffusers_is_exact(diffusers, tmp_path, name):
    ref = make_unet(diffusers, name)
    ours = unet_from_diffusers(ref)
    assert write_diffusers_unet(ours, tmp_path / "unet", sample_size=8) == tmp_path / "unet"
    back = unet_to_diffusers(ours, sample_size=8)

    def plain(v):
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    for k, v in ref.config.items():
        if not k.startswith("_"):
            assert plain(back.config[k]) == plain(v), k
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    reloaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in ref.state_dict().items())
    again = unet_from_diffusers(tmp_path / "unet")
    assert again.cfg == ours.cfg
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_vae_round_trip_through_diffusers_folder_is_exact(diffusers, tmp_path):
    ref = make_vae(diffusers)
    ref.save_pretrained(tmp_path / "ref")
    ours = vae_from_diffusers(tmp_path / "ref")  # read without diffusers
    write_diffusers_vae(ours, tmp_path / "vae")
    back = vae_to_diffusers(ours)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ref.state_dict().items())
    assert back.config.scaling_factor == ref.config.scaling_factor
    assert vae_from_diffusers(tmp_path / "vae").cfg == ours.cfg


def test_folders_are_written_and_read_without_diffusers(tmp_path):
    """ldmkit -> folder -> ldmkit in a process where diffusers cannot be imported."""
    code = f"""
import sys, torch
sys.modules["diffusers"] = None  # any import of diffusers now fails
from ldmkit.config import AutoencoderConfig, UNetConfig
from ldmkit.denoisers.unet import UNet
from ldmkit.autoencoder.vae import AutoencoderKL
from ldmkit.errors import MissingDependencyError
from ldmkit.interop.diffusers import (unet_from_diffusers, unet_to_diffusers, vae_from_diffusers, vae_to_diffusers,
                                     write_diffusers_unet, write_diffusers_vae)
torch.manual_seed(0)
unet = UNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                       num_heads=(2,), norm_groups=8, context_dim=16, use_linear_projection=True))
vae = AutoencoderKL(AutoencoderConfig(base_channels=16, channel_mult=(1, 2), norm_groups=8))
write_diffusers_unet(unet, r"{tmp_path}/unet"); write_diffusers_vae(vae, r"{tmp_path}/vae")
try:
    unet_to_diffusers(unet)
    raise SystemExit('built a diffusers model without diffusers')
except MissingDependencyError as e:
    assert 'write_diffusers_unet' in str(e)
u2, v2 = unet_from_diffusers(r"{tmp_path}/unet"), vae_from_diffusers(r"{tmp_path}/vae")
assert u2.cfg == unet.cfg and v2.cfg == vae.cfg
assert all(torch.equal(u2.state_dict()[k], v) for k, v in unet.state_dict().items())
assert all(torch.equal(v2.state_dict()[k], v) for k, v in vae.state_dict().items())
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel" and config["use_linear_projection"] is True
    assert config["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D"]


def test_legacy_vae_attention_names_are_read(diffusers, tmp_path):
    from safetensors.torch import load_file, save_file

    ref = make_vae(diffusers)
    ref.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in load_file(path).items():
        for new, legacy in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        state[k] = v
    save_file(state, path)
    ours = vae_from_diffusers(tmp_path)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(ref.decode(z).sample, ours.decode(z)) < 1e-5


# --- what ldmkit cannot express --------------------------------------------------------------------------------------

UNSUPPORTED_UNET = [
    ("class_embed_type", "timestep"),
    ("addition_embed_type", "text"),
    ("only_cross_attention", True),
    ("dual_cross_attention", True),
    ("resnet_time_scale_shift", "scale_shift"),
    ("time_cond_proj_dim", 8),
    ("transformer_layers_per_block", [1, 2]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("mid_block_type", "UNetMidBlock2D"),
    ("mid_block_type", None),
    ("attention_type", "gated"),
    ("num_attention_heads", 8),
    ("act_fn", "gelu"),
    ("conv_in_kernel", 7),
    ("encoder_hid_dim", 32),
    ("time_embedding_type", "fourier"),
    ("cross_attention_dim", [16, 32]),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
    ("block_out_channels", [32, 48]),
    ("up_block_types", ["CrossAttnUpBlock2D", "UpBlock2D"]),
    ("some_future_option", "on"),
]


@pytest.mark.parametrize("key,value", UNSUPPORTED_UNET, ids=[k for k, _ in UNSUPPORTED_UNET])
def test_unsupported_unet_option_is_a_clear_error(key, value):
    base = {k: list(v) if isinstance(v, tuple) else v for k, v in BASE_UNET.items()}
    unet_config_from_diffusers({**base, "attention_head_dim": 2})  # the base itself is fine
    with pytest.raises(ValueError, match=f"{key}={value!r}".replace("[", r"\[").replace("]", r"\]")):
        unet_config_from_diffusers({**base, key: value})


@pytest.mark.parametrize(
    "key,value",
    [
        ("latents_mean", [0.0] * 4),
        ("use_quant_conv", False),
        ("act_fn", "relu"),
        ("up_block_types", ["UpDecoderBlock2D"]),
        ("out_channels", 1),
    ],
)
def test_unsupported_vae_option_is_a_clear_error(key, value):
    base = dict(
        block_out_channels=[16, 32],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
    )
    assert vae_config_from_diffusers(base).channel_mult == (1, 2)
    with pytest.raises(ValueError, match=key):
        vae_config_from_diffusers({**base, key: value})


def test_head_counts_and_classes_map_as_diffusers_means_them():
    cfg = unet_config_from_diffusers(
        {**BASE_UNET, "attention_head_dim": [5, 10], "num_class_embeds": 4, "block_out_channels": [320, 640]}
    )
    assert [cfg.heads_at(i) for i in range(2)] == [5, 10]  # attention_head_dim counts heads
    assert cfg.num_classes == 3  # the 4th embedding is ldmkit's null label
    assert unet_config_from_diffusers({**BASE_UNET, "force_upcast": None}).context_dim == 16  # inert unknown option


def test_exporting_what_diffusers_cannot_hold_is_a_clear_error():
    self_attn = UNet(
        UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), norm_groups=8)
    )
    with pytest.raises(ValueError, match="context_dim=0"):
        write_diffusers_unet(self_attn, "unused")
    wide_first = UNet(
        UNetConfig(
            model_channels=16,
            channel_mult=(2, 2),
            num_res_blocks=1,
            attention_levels=(),
            mid_attention=False,
            norm_groups=8,
        )
    )
    with pytest.raises(ValueError, match="channel_mult"):
        write_diffusers_unet(wide_first, "unused")
    no_mid = UNet(
        UNetConfig(
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_levels=(1,),
            norm_groups=8,
            context_dim=16,
            mid_attention=False,
        )
    )
    with pytest.raises(ValueError, match="mid_attention=False"):
        write_diffusers_unet(no_mid, "unused")
    vq = AutoencoderConfig(kind="vq", base_channels=16, channel_mult=(1, 2), norm_groups=8)
    from ldmkit.autoencoder import build_autoencoder

    with pytest.raises(ValueError, match="'vq'"):
        write_diffusers_vae(build_autoencoder(vq), "unused")
    assert isinstance(build_autoencoder(vq), torch.nn.Module) and not isinstance(build_autoencoder(vq), AutoencoderKL)
