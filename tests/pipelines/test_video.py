"""ldmkit's video pipeline: clips written as GIF, MP4 or a PNG frame strip with their parameters, the screen on
every frame, image-to-video keeping the first frame, and one-line refusals before any sampling."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.data.clips import read_clip_parameters
from ldmkit.denoisers.temporal import temporal_parameters, temporal_state
from ldmkit.denoisers.unet import UNet
from ldmkit.errors import InputError
from ldmkit.ldm import LatentDiffusion, LdmFile
from ldmkit.pipelines.generate import generate
from ldmkit.pipelines.request import SampleRequest
from ldmkit.pipelines.video import ClipRequest, first_frame_latents, generate_clips, video_to_file

REQ = SampleRequest(n=2, prompts=["bag left"], steps=2, cfg=2.0, seed=3, batch_size=2)


@pytest.fixture(scope="module")
def tiny_video(tmp_path_factory, tiny_text_ldm):
    """The tiny text model with random temporal layers (at most 8 frames), as a video model file."""
    f = LdmFile.read(tiny_text_ldm)
    unet_cfg = replace(f.run.unet, temporal_heads=2, temporal_conv=True, max_frames=8)
    unet = UNet(unet_cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in temporal_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    run = replace(f.run, task="video", unet=unet_cfg)
    path = tmp_path_factory.mktemp("video") / "model.safetensors"
    return LdmFile(run, f.ae_config, f.unet | temporal_state(unet), f.autoencoder, f.text, f.text_options).write(path)


def test_clips_are_written_as_gif_mp4_and_frame_strips_with_their_parameters(tmp_path, tiny_video):
    clip = ClipRequest(frames=3, fps=4)
    gifs = video_to_file(tiny_video, REQ, clip, tmp_path / "clip.gif", progress=False)
    assert [p.name for p in gifs] == ["clip-0.gif", "clip-1.gif"]
    with Image.open(gifs[1]) as im:
        assert im.n_frames == 3 and im.size == (16, 16) and im.info["duration"] == 250
    about = read_clip_parameters(gifs[1])
    assert about["seed"] == 4 and about["frames"] == 3 and about["fps"] == 4 and about["caption"] == "bag left"

    one = replace(REQ, n=1)
    (strip,) = video_to_file(tiny_video, one, clip, tmp_path / "strip.png", progress=False)
    with Image.open(strip) as im:
        assert im.size == (48, 16)
        strip_px = np.asarray(im.convert("L"), dtype=np.float32)
    assert read_clip_parameters(strip)["index"] == 0
    with Image.open(gifs[0]) as im:  # clip 0 is the same clip in every format (seed + 0)
        im.seek(2)
        assert np.abs(np.asarray(im.convert("L"), dtype=np.float32) - strip_px[:, 32:]).max() <= 2

    av = pytest.importorskip("av")
    (mp4,) = video_to_file(tiny_video, one, clip, tmp_path / "clip.mp4", progress=False)
    with av.open(str(mp4)) as f:
        frames = [fr.to_ndarray(format="gray") for fr in f.decode(video=0)]
    assert len(frames) == 3 and frames[0].shape == (16, 16)
    assert np.abs(frames[0].astype(np.float32) - strip_px[:, :16]).mean() < 12  # lossy, but the same pictures
    assert read_clip_parameters(mp4)["fps"] == 4


def test_a_clip_records_its_request_as_the_image_commands_do(tmp_path, tiny_video):
    one = replace(REQ, n=1)
    (gif,) = video_to_file(tiny_video, one, ClipRequest(frames=2), tmp_path / "r.gif", progress=False)
    about = read_clip_parameters(gif)
    own = {"model", "weights_sha256", "frames", "fps", "seed", "n", "index", "caption"}
    assert {k: v for k, v in about.items() if k not in own} == json.loads(json.dumps(one.record("seed", "n")))
    assert "precision" not in about and "loras" not in about  # fp32 and no LoRA record nothing, as for images


def test_every_frame_passes_the_screen(tmp_path, tiny_video):
    seen = []

    def invert(images, first):
        seen.append(len(images))
        return [(Image.eval(im, lambda v: 255 - v), {"request_id": "r1"}) for im in images]

    one = replace(REQ, n=1)
    (plain,) = video_to_file(tiny_video, one, ClipRequest(frames=4), tmp_path / "a.png", progress=False)
    (screened,) = video_to_file(tiny_video, one, ClipRequest(frames=4), tmp_path / "b.png", False, finish=invert)
    assert seen == [4]
    a, b = (np.asarray(Image.open(p).convert("L"), dtype=np.int32) for p in (plain, screened))
    assert np.array_equal(a, 255 - b)
    assert read_clip_parameters(screened)["request_id"] == "r1"


def test_image_to_video_keeps_the_first_frame(tmp_path, tiny_video):
    img = np.zeros((20, 24), dtype=np.uint8)
    img[4:12, 6:14] = 255
    Image.fromarray(img).save(tmp_path / "first.png")
    ldm = LatentDiffusion.load(tiny_video)
    clip = ClipRequest(frames=4, first_frame=str(tmp_path / "first.png"))
    with pytest.warns(UserWarning, match="24x20; it is resized to the clip's 16x16"):
        x, _ = generate_clips(ldm, REQ, clip)
    with pytest.warns(UserWarning):
        kept = ldm.decode(first_frame_latents(ldm, tmp_path / "first.png", (16, 16)))
    assert x.shape == (2, 4, 1, 16, 16)
    for i in range(2):
        assert torch.allclose(x[i, 0], kept[0], atol=1e-5)
    assert not torch.allclose(x[:, 1], kept, atol=1e-2), "the other frames are sampled"


def test_bad_requests_and_wrong_models_are_refused_in_one_line(tmp_path, tiny_video, tiny_text_ldm):
    out = tmp_path / "c.gif"
    cases = [
        (ClipRequest(frames=0), out, "--frames 0: a clip needs at least 1 frame"),
        (ClipRequest(frames=300), out, "--frames 300 is more than the limit of 256 frames"),
        (ClipRequest(frames=9), out, "--frames 9 is more than this model's limit of 8 frames; ask for 8 or fewer"),
        (ClipRequest(fps=0), out, "--fps 0: frames per second must be above 0"),
        (ClipRequest(), tmp_path / "c.avi", "has its extension '.avi'; a clip is written as .gif, .mp4 or .png"),
    ]
    for clip, path, message in cases:
        with pytest.raises(InputError, match=message):
            video_to_file(tiny_video, REQ, clip, path, progress=False)
    with pytest.raises(InputError, match=r"is a generation model \(task generate\), so `ldmkit video` cannot use it"):
        video_to_file(tiny_text_ldm, REQ, ClipRequest(frames=2), out, progress=False)
    with pytest.raises(InputError, match=r"is a video model \(task video: it makes clips\), so `ldmkit generate`"):
        generate(LatentDiffusion.load(tiny_video), REQ)
    assert not list(tmp_path.iterdir()), "nothing was left behind"
