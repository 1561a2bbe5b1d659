"""ControlNet files through `convert`: Stable Diffusion's single-file layout (control_model.input_blocks ...,
zero_convs, input_hint_block, middle_block_out) and diffusers' ControlNetModel folder, both ways, with parity
against diffusers (a test oracle only)."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldmkit.checkpoint import CheckpointError, file_sha256
from ldmkit.conditioning.types import Conditioning
from ldmkit.config import DataConfig, DenoiserRun
from ldmkit.denoisers.controlnet import load_controlnet
from ldmkit.errors import InputError
from ldmkit.interop.controlnet_files import controlnet_format
from ldmkit.interop.convert import convert
from ldmkit.interop.diffusers import unet_from_diffusers, vae_from_diffusers
from ldmkit.ldm import LatentDiffusion
from tests.tiny_sd import TINY_UNET, randomize

HINT = (8, 16, 16, 32)  # the hint encoder's widths: 3 halvings, so input_hint_block has convolutions 0, 2, ..., 14

# diffusers ControlNetModel -> Stable Diffusion ControlNet file for TINY_UNET (two levels, one block each, attention
# on the first), written out by hand from the original ControlNet layout (cldm.py: input_blocks as the U-Net's,
# input_hint_block = conv, SiLU, conv, SiLU, ..., zero_convs[i] = TimestepEmbedSequential(conv), middle_block_out
# likewise) and checked by hand against it; it shares no code with ldmkit's key maps, which it tests.
BLOCKS = [
    ("conv_in.", "input_blocks.0.0."),
    ("time_embedding.linear_1.", "time_embed.0."),
    ("time_embedding.linear_2.", "time_embed.2."),
    ("down_blocks.0.resnets.0.", "input_blocks.1.0."),
    ("down_blocks.0.attentions.0.", "input_blocks.1.1."),
    ("down_blocks.0.downsamplers.0.conv.", "input_blocks.2.0.op."),
    ("down_blocks.1.resnets.0.", "input_blocks.3.0."),
    ("mid_block.resnets.0.", "middle_block.0."),
    ("mid_block.attentions.0.", "middle_block.1."),
    ("mid_block.resnets.1.", "middle_block.2."),
    ("controlnet_cond_embedding.conv_in.", "input_hint_block.0."),
    *[(f"controlnet_cond_embedding.blocks.{j}.", f"input_hint_block.{2 * j + 2}.") for j in range(6)],
    ("controlnet_cond_embedding.conv_out.", "input_hint_block.14."),
    *[(f"controlnet_down_blocks.{i}.", f"zero_convs.{i}.0.") for i in range(4)],
    ("controlnet_mid_block.", "middle_block_out.0."),
]
RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def sd_layout(state):
    """A diffusers ControlNetModel state dict in Stable Diffusion's ControlNet names (control_model. prefix)."""
    out = {}
    for key, value in state.items():
        theirs, ours = next((t, o) for t, o in BLOCKS if key.startswith(t))
        leaf = key[len(theirs) :]
        if ".resnets." in theirs:
            head, _, tail = leaf.partition(".")
            leaf = f"{RESNET[head]}.{tail}"
        out[f"control_model.{ours}{leaf}"] = value
    assert len(out) == len(state)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    d = tmp_path_factory.mktemp("cn")
    unet = randomize(diffusers.UNet2DConditionModel(**TINY_UNET), 0, std=0.05)
    net = randomize(diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT), 1, std=0.05)
    net.save_pretrained(d / "cn-diffusers")
    save_file({k: v.contiguous() for k, v in sd_layout(net.state_dict()).items()}, d / "cn-sd.safetensors")
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=4,
    )
    ours_unet, ours_vae = unet_from_diffusers(unet), vae_from_diffusers(randomize(vae, 2, std=0.05))
    run = DenoiserRun(unet=ours_unet.cfg, data=DataConfig(resolution=16, channels=3))
    base = LatentDiffusion(ours_vae, ours_vae.cfg, ours_unet, run).save(d / "base.safetensors")
    return diffusers, d, base


def _inputs():
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 16, generator=g)
    return x, torch.tensor([3, 640]), ctx, torch.rand(2, 3, 64, 64, generator=g)


@torch.no_grad()
def test_a_stable_diffusion_controlnet_file_converts_to_diffusers_numbers(files):
    diffusers, d, base = files
    assert controlnet_format(d / "cn-sd.safetensors") == "single-file"
    assert controlnet_format(d / "cn-diffusers") == "diffusers" and controlnet_format(base) is None
    out = convert(d / "cn-sd.safetensors", d / "cn.safetensors", base=base)
    net, meta = load_controlnet(out)
    assert meta["condition"] == "raw" and len(meta["base_sha256"]) == 64
    theirs = diffusers.ControlNetModel.from_pretrained(d / "cn-diffusers").eval()
    x, t, ctx, image = _inputs()
    down, mid = theirs(x, t, encoder_hidden_states=ctx, controlnet_cond=image, return_dict=False)
    mine = net(x, t.float(), Conditioning(context=ctx), image)
    assert len(mine) == len(down) + 1
    err = max(float((a - b).abs().max()) for a, b in zip([*down, mid], mine))
    assert err < 1e-5, err
    assert float(mid.abs().max()) > 1e-3  # not trivially zero


def test_the_single_file_layout_round_trips_exactly(files):
    _, d, base = files
    ours = convert(d / "cn-sd.safetensors", d / "rt.safetensors", base=base)
    back = convert(ours, d / "rt-sd.safetensors")  # an ldmkit ControlNet to a .safetensors: the SD layout
    want, got = load_file(d / "cn-sd.safetensors"), load_file(back)
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    again = convert(back, d / "rt2.safetensors")  # no --base: the configuration comes back from the metadata
    a, meta = load_controlnet(again)
    b, _ = load_controlnet(ours)
    assert a.cfg == b.cfg and meta["base_sha256"] == load_controlnet(ours)[1]["base_sha256"]
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@torch.no_grad()
def test_the_diffusers_folder_both_ways(files):
    diffusers, d, _ = files
    with pytest.raises(InputError, match="say which with to="):
        convert(d / "cn-diffusers", d / "f.safetensors")
    ours = convert(d / "cn-diffusers", d / "f.safetensors", to="ldm")
    folder = convert(ours, d / "cn-diffusers-back")
    a = diffusers.ControlNetModel.from_pretrained(d / "cn-diffusers").eval()
    b = diffusers.ControlNetModel.from_pretrained(folder).eval()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_a_controlnet_for_another_model_is_refused(files, tiny_ldm):
    _, d, _ = files
    with pytest.raises(InputError, match="does not fit the --base model"):
        convert(d / "cn-sd.safetensors", d / "bad.safetensors", base=tiny_ldm)
    with pytest.raises(InputError, match="drop --base"):
        convert(tiny_ldm, d / "m.safetensors", base=tiny_ldm)
    assert not (d / "bad.safetensors").exists()


def test_the_convert_command_takes_a_controlnet_and_its_base(files, capsys):
    from ldmkit.cli import main

    _, d, base = files
    assert main(["convert", str(d / "cn-sd.safetensors"), str(d / "cli.safetensors"), "--base", str(base)]) == 0
    assert "cli.safetensors" in capsys.readouterr().out
    assert load_controlnet(d / "cli.safetensors")[1]["base_sha256"] == file_sha256(base)


def test_a_pth_controlnet_is_read_only_when_pickles_are_allowed(files):
    _, d, base = files
    torch.save(load_file(d / "cn-sd.safetensors"), d / "cn-sd.pth")
    with pytest.raises(CheckpointError, match="pickle"):
        convert(d / "cn-sd.pth", d / "p.safetensors", base=base)
    net, _ = load_controlnet(convert(d / "cn-sd.pth", d / "p.safetensors", base=base, unsafe_pickle=True))
    want, _ = load_controlnet(convert(d / "cn-sd.safetensors", d / "q.safetensors", base=base))
    assert all(torch.equal(v, want.state_dict()[k]) for k, v in net.state_dict().items())
