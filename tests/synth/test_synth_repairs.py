"""`ldmkit synth` says what it repaired when it resumes a folder: a torn metadata line, missing and damaged images."""

from ldmkit.cli import main


def test_a_resumed_folder_names_the_torn_line_and_the_images_it_draws_again(tiny_ldm, tmp_path, capsys):
    out = tmp_path / "syn"
    argv = ["synth", str(tiny_ldm), "--per-class", "2", "--steps", "2", "--cfg", "1", "--device", "cpu"]
    argv += ["--out", str(out), "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    (out / "0-top-left/00001.png").unlink()
    (out / "1-bottom-right/00000.png").write_bytes(b"not a png")
    with (out / "metadata.jsonl").open("a") as f:
        f.write('{"file_name": "0-top-left/000')  # a crash in the middle of an append
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "metadata.jsonl ended in a torn line" in said, said
    assert "2 image(s)" in said and "0-top-left/00001.png (missing)" in said, said
    assert "1-bottom-right/00000.png (damaged)" in said, said
    assert main(argv) == 0
    assert "torn" not in capsys.readouterr().out  # the folder is whole again
