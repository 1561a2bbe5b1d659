"""AnimateDiff motion modules: ldmkit's video U-Net gives diffusers' UNetMotionModel's outputs on the same clip and
conditioning, and converts to and from MotionAdapter and UNetMotionModel without changing a weight."""

from dataclasses import replace

import pytest
import torch

from ldmkit.conditioning.types import Conditioning
from ldmkit.config import UNetConfig
from ldmkit.denoisers.temporal import temporal_state
from ldmkit.denoisers.unet import UNet
from ldmkit.errors import InputError
from ldmkit.interop.diffusers import unet_to_diffusers
from ldmkit.interop.motion import (
    motion_adapter_from_unet,
    motion_unet_from_diffusers,
    motion_unet_to_diffusers,
    with_motion_adapter,
    write_motion_adapter,
)

diffusers = pytest.importorskip("diffusers")

VIDEO = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_levels=(0, 1),
    num_heads=(2,),
    norm_groups=8,
    context_dim=16,
    temporal_heads=4,
    max_frames=12,
)


def _video() -> UNet:
    torch.manual_seed(0)
    unet = UNet(VIDEO)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return unet.eval()


def _same_state(a: UNet, b: UNet) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_a_video_unet_gives_diffusers_unet_motion_model_outputs():
    ours = _video()
    theirs = motion_unet_to_diffusers(ours)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 4, 8, 8, generator=g)  # (B, F, C, H, W)
    ctx = torch.randn(2, 5, 16, generator=g)
    t = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        per_frame = ctx.repeat_interleave(6, dim=0)  # diffusers' motion U-Net takes one context per frame
        want = theirs(x.permute(0, 2, 1, 3, 4), t, encoder_hidden_states=per_frame).sample.permute(0, 2, 1, 3, 4)
        got = ours(x, t, Conditioning(context=ctx))
    assert (got - want).abs().max() < 1e-4


def test_a_motion_adapter_round_trips_and_joins_an_image_unet_as_diffusers_does(tmp_path):
    ours = _video()
    image = UNet(replace(VIDEO, temporal_heads=0))
    image.load_state_dict({k: v for k, v in ours.state_dict().items() if k not in temporal_state(ours)})

    config, state = motion_adapter_from_unet(ours)
    adapter = diffusers.MotionAdapter.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    missing, unexpected = adapter.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    joined = diffusers.UNetMotionModel.from_unet2d(unet_to_diffusers(image), adapter).eval()
    x, t = torch.randn(1, 4, 4, 8, 8), torch.tensor([300.0])
    ctx = torch.randn(1, 3, 16)
    with torch.no_grad():
        per_frame = ctx.repeat_interleave(4, dim=0)
        want = joined(x.permute(0, 2, 1, 3, 4), t, encoder_hidden_states=per_frame).sample.permute(0, 2, 1, 3, 4)
        assert (ours(x, t, Conditioning(context=ctx)) - want).abs().max() < 1e-4

    _same_state(with_motion_adapter(image, adapter), ours)  # the diffusers object
    _same_state(with_motion_adapter(image, write_motion_adapter(ours, tmp_path / "adapter")), ours)  # its folder
    _same_state(motion_unet_from_diffusers(joined), ours)


def test_what_animatediff_cannot_hold_is_refused():
    with pytest.raises(InputError, match="temporal convolutions"):
        motion_adapter_from_unet(UNet(replace(VIDEO, temporal_conv=True)))
    with pytest.raises(InputError, match="no temporal layers"):
        motion_adapter_from_unet(UNet(replace(VIDEO, temporal_heads=0)))
    _, state = motion_adapter_from_unet(_video())
    other = UNet(replace(VIDEO, temporal_heads=0, model_channels=16))
    config = motion_adapter_from_unet(_video())[0]
    with pytest.raises(InputError, match=r"motion modules for blocks \[32, 64\], but the U-Net's are 16x\[1, 2\]"):
        with_motion_adapter(other, type("A", (), {"config": config, "state_dict": lambda self: state})())
