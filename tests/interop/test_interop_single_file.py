"""Stable Diffusion single-file checkpoints: layout (checked against diffusers' own converter), inference of the
architecture from shapes, exact round trips, and errors for unsafe, truncated or incomplete files."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldmkit.autoencoder.vae import AutoencoderKL
from ldmkit.checkpoint import CheckpointError
from ldmkit.conditioning.clip import clip_config, clip_shapes
from ldmkit.config import AutoencoderConfig, DiffusionConfig, UNetConfig
from ldmkit.denoisers.unet import UNet
from ldmkit.interop import keymaps
from ldmkit.interop.bundle import ModelWeights
from ldmkit.interop.single_file import read_single_file, single_file_tensors, write_single_file

UNETS = {
    "sd1": UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_levels=(0, 1),
        num_heads=(8,),
        context_dim=768,
        norm_groups=32,
    ),
    "sd2": UNetConfig(
        model_channels=64,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(0, 1),
        num_heads=(1, 2),
        context_dim=1024,
        use_linear_projection=True,
        upcast_attention=True,
        norm_groups=32,
    ),
    "sd2-inpaint": UNetConfig(
        in_channels=9,
        model_channels=64,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(0,),
        num_heads=(1, 2),
        context_dim=1024,
        use_linear_projection=True,
        upcast_attention=True,
        norm_groups=32,
    ),
}
AE = AutoencoderConfig(
    base_channels=32, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4, norm_groups=32, scaling_factor=0.18215
)
TEXT = {"sd1": clip_config(64, 2, 1, "quick_gelu"), "sd2": clip_config(64, 3, 1, "gelu")}


def random_state(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}


def weights(name, text=True, diffusion=None):
    unet_cfg = UNETS[name]
    unet = random_state({k: v.shape for k, v in UNet(unet_cfg).state_dict().items()}, 0)
    ae = random_state({k: v.shape for k, v in AutoencoderKL(AE).state_dict().items()}, 1)
    text_cfg = TEXT["sd1" if unet_cfg.context_dim == 768 else "sd2"] if text else None
    text_cfg = dict(text_cfg, vocab_size=100) if text_cfg else None
    state = random_state(clip_shapes(text_cfg), 2) if text else None
    return ModelWeights(
        unet_cfg, unet, AE, ae, diffusion or DiffusionConfig(), 512, text_cfg, state, source="test"
    ).validate()


def strip_metadata(path):
    """The same tensors without ldmkit's hints: what a file from another tool looks like."""
    save_file(load_file(path), path)


def assert_same(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- layout ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(UNETS))
def test_layout_matches_diffusers_converter(name):
    """diffusers' single-file converter reads our export back to exactly the diffusers-layout weights."""
    pytest.importorskip("diffusers")
    from diffusers.loaders import single_file_utils as sfu

    from ldmkit.interop.diffusers_config import unet_config_to_diffusers, vae_config_to_diffusers

    w = weights(name)
    flat = single_file_tensors(w)
    unet = sfu.convert_ldm_unet_checkpoint(flat, unet_config_to_diffusers(w.unet_config))
    assert_same(unet, keymaps.unet_to_layout(w.unet, w.unet_config, "diffusers"))
    vae = sfu.convert_ldm_vae_checkpoint(flat, vae_config_to_diffusers(w.ae_config))
    expected = keymaps.vae_to_layout(w.autoencoder, w.ae_config, "diffusers")
    assert set(vae) == set(expected)
    assert all(torch.equal(vae[k].reshape(expected[k].shape), expected[k]) for k in expected)
    if name == "sd1":
        text = sfu.convert_ldm_clip_checkpoint(flat)
    else:
        model = type("M", (), {"config": type("C", (), {"hidden_size": 64})()})()
        text = sfu.convert_open_clip_checkpoint(model, flat)
    assert_same(keymaps.with_text_model_prefix(text), w.text)


def test_sd1_keys_are_the_original_names(tmp_path):
    flat = single_file_tensors(weights("sd1"))
    for key in [
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.time_embed.2.bias",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",  # level 2 has no attention: upsampler at .1
        "model.diffusion_model.output_blocks.5.2.conv.weight",  # level 1 has attention: upsampler at .2
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "first_stage_model.decoder.up.1.upsample.conv.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.quant_conv.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight",
    ]:
        assert key in flat, key
    assert flat["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)


# --- round trips and inference --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(UNETS))
def test_round_trip_is_exact(tmp_path, name):
    w = weights(name, diffusion=DiffusionConfig(parameterisation="v", beta_end=0.02))
    write_single_file(tmp_path / "m.safetensors", w)
    r = read_single_file(tmp_path / "m.safetensors")
    assert (r.unet_config, r.ae_config, r.diffusion, r.text_config) == (
        w.unet_config,
        w.ae_config,
        w.diffusion,
        w.text_config,
    )
    assert_same(r.unet, w.unet)
    assert_same(r.autoencoder, w.autoencoder)
    assert_same(r.text, w.text)


@pytest.mark.parametrize(
    "name,prediction,resolution", [("sd1", "eps", 512), ("sd2", "v", 768), ("sd2-inpaint", "eps", 512)]
)
def test_architecture_is_inferred_from_shapes(tmp_path, name, prediction, resolution):
    w = weights(name)
    path = tmp_path / "m.safetensors"
    write_single_file(path, w)
    strip_metadata(path)
    r = read_single_file(path)
    unet_cfg = dataclasses.replace(w.unet_config, upcast_attention=name != "sd1")
    assert r.unet_config == unet_cfg
    assert r.ae_config == w.ae_config and r.text_config["num_hidden_layers"] == w.text_config["num_hidden_layers"]
    assert (r.diffusion.parameterisation, r.resolution) == (prediction, resolution)
    assert (r.diffusion.schedule, r.diffusion.beta_start, r.diffusion.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert read_single_file(path, prediction="eps").diffusion.parameterisation == "eps"
    assert_same(r.unet, w.unet)


def test_sd2_text_encoder_drops_the_unused_last_layer(tmp_path):
    """A 24-layer OpenCLIP tower (as SD 2.x ships it) imports as the 23 layers SD 2.x conditions on."""
    w = weights("sd2", text=False)
    text_cfg = dict(clip_config(64, 24, 1, "gelu"), vocab_size=100)
    full = random_state(clip_shapes(text_cfg), 3)
    flat = single_file_tensors(w)
    flat.update({"cond_stage_model.model." + k: v for k, v in keymaps.clip_to_open_clip(full).items()})
    flat["cond_stage_model.model.text_projection"] = torch.randn(64, 64)
    flat["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    flat["model_ema.decay"] = torch.tensor(0.999)
    save_file(flat, tmp_path / "sd2.safetensors")
    r = read_single_file(tmp_path / "sd2.safetensors")
    assert r.text_config["num_hidden_layers"] == 23 and r.text_config["hidden_act"] == "gelu"
    assert_same(r.text, {k: v for k, v in full.items() if ".layers.23." not in k})
    assert r.unused == ["model_ema.decay"]


def test_in_proj_is_split_into_q_k_v_in_order():
    cfg = dict(clip_config(8, 1, 1, "gelu"), vocab_size=10, max_position_embeddings=4)
    state = random_state(clip_shapes(cfg), 4)
    fused = keymaps.clip_to_open_clip(state)
    w = fused["transformer.resblocks.0.attn.in_proj_weight"]
    assert w.shape == (24, 8)
    assert torch.equal(w[8:16], state["text_model.encoder.layers.0.self_attn.k_proj.weight"])
    assert_same(keymaps.clip_from_open_clip(fused), state)


def test_text_weights_load_into_the_clip_text_encoder(tmp_path):
    text_mod = pytest.importorskip("ldmkit.conditioning.text")
    transformers = pytest.importorskip("transformers")
    try:
        from ldmkit.conditioning.clip_tokenizer import find_bpe_vocab

        find_bpe_vocab()
    except (ImportError, FileNotFoundError):
        pytest.skip("the CLIP vocabulary (open-clip-torch) is not installed")
    from ldmkit.conditioning.clip import clip_encoder_options, clip_state_to_encoder

    cfg = clip_config(64, 2, 2, "quick_gelu")
    state = random_state(clip_shapes(cfg), 5)
    encoder = text_mod.build_text_encoder("clip", **clip_encoder_options(cfg))
    encoder.load_state_dict(clip_state_to_encoder(encoder, state))
    ref = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    )
    ref.load_state_dict({k.removeprefix("text_model."): v for k, v in state.items()})
    ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 73])
    with torch.no_grad():
        assert torch.allclose(encoder(ids, ids > 0)[0], ref.eval()(input_ids=ids).last_hidden_state, atol=1e-5)
        cond = encoder.encode(["a photo"])
    assert cond.context.shape == (1, 77, 64) and bool(cond.context_mask.all())  # SD attends to padding


# --- errors ---------------------------------------------------------------------------------------------------------


def test_ckpt_needs_the_unsafe_flag(tmp_path):
    w = weights("sd1", text=False)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": single_file_tensors(w), "global_step": 10}, path)
    with pytest.raises(CheckpointError, match="unsafe_pickle"):
        read_single_file(path)
    r = read_single_file(path, unsafe_pickle=True)
    assert_same(r.unet, w.unet)
    assert r.text is None


def test_truncated_file_names_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    write_single_file(path, weights("sd1", text=False))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="m.safetensors.*truncated"):
        read_single_file(path)


@pytest.mark.parametrize("hints", [True, False])
def test_missing_keys_are_named(tmp_path, hints):
    path = tmp_path / "m.safetensors"
    write_single_file(path, weights("sd1"))
    flat = load_file(path)
    del flat["model.diffusion_model.output_blocks.4.0.in_layers.2.weight"]
    del flat["first_stage_model.decoder.conv_out.bias"]
    meta = {"ldmkit_interop": __import__("safetensors").safe_open(str(path), "pt").metadata()["ldmkit_interop"]}
    save_file(flat, path, metadata=meta if hints else None)
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*missing keys: up\.1\.res\.1\.conv1\.weight"):
        read_single_file(path)
    flat["model.diffusion_model.output_blocks.4.0.in_layers.2.weight"] = torch.zeros(64, 128, 3, 3)
    save_file(flat, path, metadata=meta if hints else None)
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.conv_out\.bias"):
        read_single_file(path)


def test_unexpected_keys_and_non_sd_files_are_named(tmp_path):
    flat = single_file_tensors(weights("sd1", text=False))
    flat["model.diffusion_model.input_blocks.1.2.weight"] = torch.zeros(3)
    save_file(flat, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"extra\.safetensors.*input_blocks\.1\.2\.weight"):
        read_single_file(tmp_path / "extra.safetensors")
    save_file({"weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=r"other\.safetensors: no U-Net weights"):
        read_single_file(tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_single_file(tmp_path / "absent.safetensors")


def test_unknown_head_count_asks_for_heads(tmp_path):
    cfg = dataclasses.replace(UNETS["sd1"], context_dim=32, num_heads=(4,))
    w = weights("sd1", text=False)
    w = dataclasses.replace(
        w, unet_config=cfg, unet=random_state({k: v.shape for k, v in UNet(cfg).state_dict().items()}, 0)
    )
    path = tmp_path / "m.safetensors"
    write_single_file(path, w)
    strip_metadata(path)
    with pytest.raises(CheckpointError, match="heads="):
        read_single_file(path)
    assert read_single_file(path, heads=4).unet_config == cfg


# --- full-size Stable Diffusion shapes (meta tensors: no memory, no weights) ----------------------------------------

SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
SD21_UNET = {
    **SD15_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "upcast_attention": True,
    "use_linear_projection": True,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "sample_size": 96,
}
SD_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


@pytest.mark.parametrize(
    "raw,params", [(SD15_UNET, 859_520_964), (SD21_UNET, 865_910_724), ({**SD15_UNET, "in_channels": 9}, 859_535_364)]
)
def test_full_size_stable_diffusion_layouts(raw, params):
    from ldmkit.denoisers import UNET_PRESETS
    from ldmkit.interop.diffusers_config import unet_config_from_diffusers, vae_config_from_diffusers
    from ldmkit.interop.single_file import infer_unet_config, infer_vae_config

    cfg, ae_cfg = unet_config_from_diffusers(raw), vae_config_from_diffusers(SD_VAE)
    if raw is SD15_UNET:
        assert cfg == UNET_PRESETS["sd15"]
    with torch.device("meta"):
        unet, vae = UNet(cfg), AutoencoderKL(ae_cfg)
    assert sum(p.numel() for p in unet.parameters()) == params  # the published U-Net sizes
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    w = ModelWeights(cfg, unet.state_dict(), ae_cfg, vae.state_dict(), DiffusionConfig())
    flat = single_file_tensors(w)
    for key in [
        "input_blocks.3.0.op.weight",
        "input_blocks.9.0.op.weight",
        "input_blocks.11.0.out_layers.3.weight",
        "output_blocks.2.1.conv.weight",
        "output_blocks.5.2.conv.weight",
        "output_blocks.8.2.conv.weight",
        "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight",
        "middle_block.2.emb_layers.1.weight",
    ]:
        assert "model.diffusion_model." + key in flat, key
    unet_raw = {
        k[len("model.diffusion_model.") :]: v for k, v in flat.items() if k.startswith("model.diffusion_model.")
    }
    assert infer_unet_config(unet_raw) == cfg
    vae_raw = {k[len("first_stage_model.") :]: v for k, v in flat.items() if k.startswith("first_stage_model.")}
    assert infer_vae_config(vae_raw) == ae_cfg
    try:
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    except ImportError:
        return
    theirs = convert_ldm_unet_checkpoint(flat, raw)
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {
        k: tuple(v.shape) for k, v in keymaps.unet_to_layout(w.unet, cfg, "diffusers").items()
    }
