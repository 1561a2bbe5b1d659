"""Temporal layers: an image U-Net extended with them equals the image model frame by frame until they train, they
mix frames once they do, and samplers, guidance and per-sample scales work on clips unchanged."""

from dataclasses import replace

import pytest
import torch

from ldmkit.conditioning.types import Conditioning
from ldmkit.config import DiffusionConfig, UNetConfig
from ldmkit.denoisers.temporal import TemporalLayers, frame_positions, temporal_parameters, temporal_state
from ldmkit.denoisers.unet import UNet
from ldmkit.diffusion.parameterisation import make_denoiser
from ldmkit.diffusion.sample import sample_latents
from ldmkit.errors import InputError
from ldmkit.nn.frames import fold, unfold
from ldmkit.noise import generators_from_seed
from tests.factory import attention_unet

IMAGE = attention_unet(in_channels=2, out_channels=2, context_dim=8)
VIDEO = replace(IMAGE, temporal_heads=2, temporal_conv=True, max_frames=8)


def _randomize(m: torch.nn.Module, seed: int = 0, only=None) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in only if only is not None else m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _video_from(image: UNet, cfg: UNetConfig = VIDEO) -> UNet:
    video = UNet(cfg)
    video.load_state_dict(temporal_state(video) | image.state_dict())
    return video


def _inputs(b=2, f=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, f, 2, 8, 8, generator=g)
    cond = Conditioning(context=torch.randn(b, 3, 8, generator=g))
    return x, torch.tensor([3.0, 700.0][:b]), cond


def test_an_image_model_extended_with_temporal_layers_is_unchanged_frame_by_frame():
    image = UNet(IMAGE)
    _randomize(image)
    video = _video_from(image)
    assert temporal_state(video) and not temporal_state(image)
    assert sum(isinstance(m, TemporalLayers) for m in video.modules()) == 7  # 2 down, 1 middle, 4 up (2 per level)
    x, c, cond = _inputs()
    with torch.no_grad():
        out = video(x, c, cond)
        assert out.shape == x.shape
        assert torch.equal(out, image(x, c, cond))  # the image model on a clip: each frame alone
        for f in range(x.shape[1]):  # ... and that is each frame through the image model as an image
            one = image(x[:, f], c, cond)
            assert torch.allclose(out[:, f], one, atol=1e-6, rtol=0)


def test_trained_temporal_layers_mix_frames_and_only_within_a_clip():
    image = UNet(IMAGE)
    _randomize(image)
    video = _video_from(image)
    _randomize(video, seed=3, only=temporal_parameters(video))
    x, c, cond = _inputs()
    with torch.no_grad():
        out = video(x, c, cond)
        assert not torch.allclose(out, image(x, c, cond), atol=1e-4)
        y = x.clone()
        y[0, 4] += 1.0  # a change to the last frame of the first clip
        moved = video(y, c, cond)
    assert (moved[0, 0] - out[0, 0]).abs().max() > 1e-5, "the first frame sees the last one"
    assert torch.equal(moved[1], out[1]), "the other clip sees nothing of it"


def test_too_many_frames_are_refused_in_one_line():
    video = UNet(VIDEO)
    x = torch.zeros(1, 9, 2, 8, 8)
    with pytest.raises(InputError, match="9 frames is more than this model's limit of 8"):
        video(x, torch.tensor([1.0]), Conditioning(context=torch.zeros(1, 3, 8)))


def test_frame_folding_round_trips_and_positions_are_sinusoidal():
    x = torch.randn(2, 3, 4, 5, 5)
    assert torch.equal(unfold(fold(x), 3), x)
    assert torch.equal(fold(x)[3], x[1, 0])
    pe = frame_positions(4, 6)
    assert torch.allclose(pe[:, 0], torch.sin(torch.arange(4.0)))
    assert torch.allclose(pe[:, 1], torch.cos(torch.arange(4.0)))


def test_sampling_guidance_and_per_sample_scales_work_on_clips():
    """Each clip's result is the same alone or in a batch with its own guidance scale, with any sampler."""
    torch.manual_seed(0)
    video = UNet(VIDEO)
    _randomize(video)
    den = make_denoiser(video.eval(), DiffusionConfig())
    g = torch.Generator().manual_seed(5)
    cond, uncond = Conditioning(context=torch.randn(2, 3, 8, generator=g)), Conditioning(context=torch.zeros(2, 3, 8))
    shape = (2, 4, 2, 8, 8)
    for sampler in ("euler", "dpmpp_2m", "euler_ancestral", "unipc"):
        kw = dict(sampler=sampler, steps=3, cfg_scale=torch.tensor([1.5, 6.0]))
        both = sample_latents(den, shape, cond, uncond, generator=generators_from_seed(7, 2), **kw)
        kw["cfg_scale"] = 6.0
        second = sample_latents(
            den,
            (1, *shape[1:]),
            cond.map(lambda t: t[1:]),
            uncond.map(lambda t: t[1:]),
            generator=generators_from_seed(7, 2)[1:],
            **kw,
        )
        assert both.shape == shape and torch.isfinite(both).all()
        assert torch.allclose(both[1:], second, atol=1e-5), sampler
