"""`ldmkit invert` and `ldmkit edit` on the tiny text model: the noise file, an edit from it with its record, and the
refusals before any work."""

import json

from PIL import Image

from ldmkit.cli import main


def write_square(path):
    img = Image.new("L", (16, 16), 0)
    img.paste(255, (4, 3, 11, 9))
    img.save(path)
    return str(path)


def test_invert_then_edit_from_the_noise_file(tmp_path, tiny_text_ldm, capsys):
    image = write_square(tmp_path / "square.png")
    noise = tmp_path / "noise.safetensors"
    base = ["--model", str(tiny_text_ldm), "--steps", "3", "--quiet"]
    assert main(["invert", image, "--prompt", "a square", "--out", str(noise), *base]) == 0
    assert f"wrote {noise}" in capsys.readouterr().out
    out = tmp_path / "edited.png"
    assert main(["edit", str(noise), "--to", "a circle", "--keep-layout", "1", "--out", str(out), *base]) == 0
    with Image.open(out) as im:
        assert im.size == (16, 16)
        record = json.loads(im.text["ldmkit"])
    assert record["edit"] | {"inversion_iterations": 0} == {
        "from": "a square",
        "to": "a circle",
        "keep_layout": 1,
        "inversion_iterations": 0,
    }
    assert record["sampler"] == "ddim" and record["steps"] == 3 and record["image"]["name"] == "noise.safetensors"


def test_bad_input_is_refused_in_one_line(tmp_path, tiny_text_ldm, capsys):
    image = write_square(tmp_path / "square.png")
    model = ["--model", str(tiny_text_ldm)]
    cases = [
        (["invert", image, "--out", str(tmp_path / "n.png")], "written as .safetensors"),
        (["invert", image, "--steps", "0", "--out", str(tmp_path / "n.safetensors")], "--steps 0"),
        (["edit", image, "--to", "x", "--keep-layout", "9", "--steps", "4"], "--keep-layout 9"),
        (["edit", str(tmp_path / "missing.png"), "--to", "x"], "does not exist"),
    ]
    for argv, message in cases:
        assert main([*argv, *model]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
