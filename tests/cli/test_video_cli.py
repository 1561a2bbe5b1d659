"""`ldmkit video`: clips written from the command line, with its one-line refusals and its progress bar."""

from PIL import Image

from ldmkit.cli import main
from ldmkit.data.clips import read_clip_parameters
from tests.pipelines.test_video import tiny_video  # noqa: F401  (the fixture)


def test_video_writes_a_clip_and_shows_frames_times_steps(tmp_path, tiny_video, capsys):  # noqa: F811
    out = tmp_path / "clip.gif"
    argv = ["video", "bag left", "--model", str(tiny_video), "--frames", "3", "--fps", "6", "--steps", "2"]
    assert main([*argv, "--seed", "9", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.n_frames == 3
    about = read_clip_parameters(out)
    assert about["seed"] == 9 and about["fps"] == 6 and about["steps"] == 2 and about["prompts"] == ["bag left"]

    from ldmkit.ldm import LatentDiffusion
    from ldmkit.pipelines.request import SampleRequest
    from ldmkit.pipelines.video import ClipRequest, video_latents

    ldm = LatentDiffusion.load(tiny_video)
    list(video_latents(ldm, SampleRequest(n=2, prompts=["bag"], steps=2), ClipRequest(frames=3), progress=True))
    err = capsys.readouterr().err
    assert "video (2 clips x 3 frames x 2 steps)" in err and "12/12" in err


def test_bad_options_are_refused_in_one_line(tmp_path, tiny_video, capsys):  # noqa: F811
    base = ["video", "bag", "--model", str(tiny_video), "--steps", "1"]
    cases = [
        (["--frames", "-2"], "error: --frames -2: a clip needs at least 1 frame"),
        (["--fps", "0"], "error: --fps 0.0: frames per second must be above 0"),
        (["--out", str(tmp_path / "x.webp")], "has its extension '.webp'; a clip is written as .gif, .mp4 or .png"),
        (["--frames", "12"], "more than this model's limit of 8 frames"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())
