"""`ldmkit.interop.convert`: formats told from paths, and exact round trips through every format."""

import importlib
import json

import pytest
import torch
from safetensors.torch import load_file

from ldmkit import checkpoint
from ldmkit.autoencoder.vae import AutoencoderKL
from ldmkit.checkpoint import CheckpointError
from ldmkit.conditioning.clip import clip_config, clip_shapes
from ldmkit.config import AutoencoderConfig, DenoiserRun, DiffusionConfig, UNetConfig, to_dict
from ldmkit.denoisers.unet import UNet
from ldmkit.interop.bundle import ModelWeights
from ldmkit.interop.convert import convert, destination_format, read_ldm, source_format, write_ldm
from ldmkit.interop.diffusers_pipeline import write_pipeline
from ldmkit.interop.single_file import single_file_tensors, write_single_file

UNET = UNetConfig(
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_levels=(0, 1),
    num_heads=(2, 4),
    context_dim=32,
    use_linear_projection=True,
    norm_groups=32,
)
AE = AutoencoderConfig(
    base_channels=32, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4, norm_groups=32, scaling_factor=0.18215
)


def have_clip_encoder() -> bool:
    try:
        from ldmkit.conditioning.clip_tokenizer import find_bpe_vocab

        importlib.import_module("ldmkit.conditioning.text")
        importlib.import_module("transformers")

        find_bpe_vocab()
    except (ImportError, FileNotFoundError):
        return False
    return True


def random_state(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}


def model_weights(text: bool) -> ModelWeights:
    unet = random_state({k: v.shape for k, v in UNet(UNET).state_dict().items()}, 0)
    ae = random_state({k: v.shape for k, v in AutoencoderKL(AE).state_dict().items()}, 1)
    text_cfg = clip_config(32, 2, 2, "quick_gelu") if text else None
    state = random_state(clip_shapes(text_cfg), 2) if text else None
    diffusion = DiffusionConfig(parameterisation="v", zero_terminal_snr=True)
    return ModelWeights(UNET, unet, AE, ae, diffusion, 64, text_cfg, state, ("cat", "dog"), "test").validate()


@pytest.fixture(scope="module", params=["text", "no-text"])
def ldm_file(request, tmp_path_factory):
    if request.param == "text" and not have_clip_encoder():
        pytest.skip("the 'clip' text encoder needs transformers and open-clip-torch's vocabulary")
    w = model_weights(request.param == "text")
    return write_ldm(tmp_path_factory.mktemp("ldm") / "model.safetensors", w), w


def assert_same_weights(a: ModelWeights, b: ModelWeights):
    assert (a.unet_config, a.ae_config, a.diffusion, a.resolution, a.text_config, a.class_names) == (
        b.unet_config,
        b.ae_config,
        b.diffusion,
        b.resolution,
        b.text_config,
        b.class_names,
    )
    for x, y in ((a.unet, b.unet), (a.autoencoder, b.autoencoder), (a.text or {}, b.text or {})):
        assert set(x) == set(y)
        assert all(torch.equal(x[k], y[k]) for k in x)


# --- formats --------------------------------------------------------------------------------------------------------


def test_formats_are_told_from_paths(tmp_path, ldm_file):
    ldm, w = ldm_file
    write_single_file(tmp_path / "sd.safetensors", w)
    write_pipeline(tmp_path / "pipe", w)
    torch.save({"state_dict": single_file_tensors(w)}, tmp_path / "sd.ckpt")
    assert source_format(ldm) == "ldm"
    assert source_format(tmp_path / "sd.safetensors") == "single-file"
    assert source_format(tmp_path / "sd.ckpt") == "single-file"
    assert source_format(tmp_path / "pipe") == "diffusers"
    with pytest.raises(ValueError, match="model_index.json.*pipeline folder above"):
        source_format(tmp_path / "pipe" / "unet")
    with pytest.raises(FileNotFoundError, match="absent.safetensors does not exist"):
        source_format(tmp_path / "absent.safetensors")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="suffix '.txt'"):
        source_format(tmp_path / "notes.txt")
    checkpoint.save(tmp_path / "ae.safetensors", {"w": torch.zeros(1)}, "autoencoder", {})
    with pytest.raises(ValueError, match="'autoencoder' checkpoint"):
        source_format(tmp_path / "ae.safetensors")


def test_destination_formats_and_ambiguity():
    assert destination_format("out", "ldm") == "diffusers"
    assert destination_format("out.safetensors", "ldm") == "single-file"
    assert destination_format("out.safetensors", "single-file") == "ldm"
    assert destination_format("out.safetensors", "diffusers", to="ldm") == "ldm"
    with pytest.raises(ValueError, match="to='ldm' or to='single-file'"):
        destination_format("out.safetensors", "diffusers")
    with pytest.raises(ValueError, match="no pickle"):
        destination_format("out.ckpt", "ldm")
    with pytest.raises(ValueError, match="unknown format 'onnx'"):
        destination_format("out", "ldm", to="onnx")


# --- round trips ----------------------------------------------------------------------------------------------------


def test_ldm_to_diffusers_to_ldm_is_exact(tmp_path, ldm_file):
    ldm, w = ldm_file
    convert(ldm, tmp_path / "pipe")
    convert(tmp_path / "pipe", tmp_path / "back.safetensors", to="ldm")
    assert_same_weights(read_ldm(tmp_path / "back.safetensors"), w)
    sched = json.loads((tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["prediction_type"], sched["beta_schedule"], sched["rescale_betas_zero_snr"]) == (
        "v_prediction",
        "scaled_linear",
        True,
    )
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert ("text_encoder" in index) == (w.text is not None)


def test_ldm_to_single_file_to_ldm_is_exact(tmp_path, ldm_file):
    ldm, w = ldm_file
    convert(ldm, tmp_path / "sd.safetensors")
    convert(tmp_path / "sd.safetensors", tmp_path / "back.safetensors")
    assert_same_weights(read_ldm(tmp_path / "back.safetensors"), w)
    _, meta = checkpoint.load(tmp_path / "back.safetensors", "ldm")
    _, meta0 = checkpoint.load(ldm, "ldm")
    assert meta["config"] == meta0["config"] and meta["autoencoder"] == meta0["autoencoder"]
    assert meta["text_encoder_options"] == meta0["text_encoder_options"]


def test_diffusers_to_single_file_to_diffusers_keeps_every_tensor(tmp_path, ldm_file):
    _, w = ldm_file
    write_pipeline(tmp_path / "a", w)
    convert(tmp_path / "a", tmp_path / "sd.safetensors", to="single-file")
    convert(tmp_path / "sd.safetensors", tmp_path / "mid.safetensors", to="ldm")  # and through ldmkit's format
    convert(tmp_path / "mid.safetensors", tmp_path / "b")
    for part, stem in (
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ):
        if part == "text_encoder" and w.text is None:
            assert not (tmp_path / "b" / part).exists()
            continue
        a, b = (load_file(tmp_path / d / part / f"{stem}.safetensors") for d in "ab")
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), part
        assert json.loads((tmp_path / "a" / part / "config.json").read_text()) == json.loads(
            (tmp_path / "b" / part / "config.json").read_text()
        )


def test_converted_model_loads_as_latent_diffusion(tmp_path, ldm_file):
    try:
        from ldmkit.ldm import LatentDiffusion
    except ImportError as e:
        pytest.skip(f"ldmkit.ldm is not importable yet ({e})")
    ldm, w = ldm_file
    convert(ldm, tmp_path / "sd.safetensors")
    convert(tmp_path / "sd.safetensors", tmp_path / "back.safetensors")
    model = LatentDiffusion.load(tmp_path / "back.safetensors")
    assert all(torch.equal(model.unet.state_dict()[k], v) for k, v in w.unet.items())
    assert (model.text_encoder is None) == (w.text is None)


def test_exported_pipeline_loads_in_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    if not have_clip_encoder():
        pytest.skip("the tokenizer files come from open-clip-torch's vocabulary")
    w = model_weights(text=True)
    write_pipeline(tmp_path / "pipe", w)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", safety_checker=None)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    unet = pipe.unet.state_dict()
    from ldmkit.interop import keymaps

    expected = keymaps.unet_to_layout(w.unet, w.unet_config, "diffusers")
    assert set(unet) == set(expected) and all(torch.equal(unet[k], v) for k, v in expected.items())
    from ldmkit.conditioning.clip_tokenizer import CLIPTokenizer

    prompt = "A photo of an astronaut, riding a horse! 123"
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, CLIPTokenizer(pad_with="eot")([prompt]))


# --- errors ---------------------------------------------------------------------------------------------------------


def test_ckpt_source_needs_the_unsafe_flag(tmp_path):
    w = model_weights(text=False)
    write_single_file(tmp_path / "sd.safetensors", w)
    torch.save({"state_dict": load_file(tmp_path / "sd.safetensors")}, tmp_path / "sd.ckpt")
    with pytest.raises(CheckpointError, match="sd.ckpt is a pickle.*unsafe"):
        convert(tmp_path / "sd.ckpt", tmp_path / "out.safetensors", heads=(2, 4))
    convert(tmp_path / "sd.ckpt", tmp_path / "out.safetensors", unsafe_pickle=True, heads=(2, 4), prediction="eps")
    r = read_ldm(tmp_path / "out.safetensors")
    assert r.diffusion.parameterisation == "eps" and r.unet_config.num_heads == (2, 4)
    assert all(torch.equal(r.unet[k], v) for k, v in w.unet.items())


def test_unconvertible_models_are_clear_errors(tmp_path):
    w = model_weights(text=False)
    run = DenoiserRun(unet=UNET, text_encoder="minilm")
    tensors = {**checkpoint.prefixed(w.unet, "unet"), **checkpoint.prefixed(w.autoencoder, "autoencoder")}
    checkpoint.save(tmp_path / "minilm.safetensors", tensors, "ldm", to_dict(run), autoencoder=to_dict(AE))
    with pytest.raises(ValueError, match="'minilm' text encoder"):
        convert(tmp_path / "minilm.safetensors", tmp_path / "out")
    write_ldm(tmp_path / "ok.safetensors", w)
    with pytest.raises(ValueError, match="same path"):
        convert(tmp_path / "ok.safetensors", tmp_path / "ok.safetensors", to="ldm")
    with pytest.raises(ValueError, match="records its parameterisation"):
        convert(tmp_path / "ok.safetensors", tmp_path / "sd.safetensors", prediction="v")
    with pytest.raises(ValueError, match="prediction='x0'"):
        convert(tmp_path / "ok.safetensors", tmp_path / "sd.safetensors", prediction="x0")
    convert(tmp_path / "ok.safetensors", tmp_path / "sd.safetensors")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert(tmp_path / "ok.safetensors", tmp_path / "sd.safetensors")
    convert(tmp_path / "ok.safetensors", tmp_path / "sd.safetensors", overwrite=True)
    del tensors["unet.conv_out.bias"]
    checkpoint.save(
        tmp_path / "cut.safetensors", tensors, "ldm", to_dict(DenoiserRun(unet=UNET)), autoencoder=to_dict(AE)
    )
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*missing keys: conv_out\.bias"):
        convert(tmp_path / "cut.safetensors", tmp_path / "out2")
