"""`ldmkit index screen IMAGE`: any image against a similarity index, from the command line."""

import json

import numpy as np
from PIL import Image

from ldmkit.cli import main
from ldmkit.governance.similarity import SimilarityIndex


def _blocks(seed: int) -> np.ndarray:
    """A 32x32 RGB image of random 4x4 blocks: detail the screen can align on."""
    rng = np.random.default_rng(seed)
    return np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((4, 4, 1))).astype(np.uint8)


def test_screen_names_the_nearest_training_image_and_flags_a_copy(tmp_path, capsys):
    index = tmp_path / "train.index.npz"
    names = ["a.png", "b.png", "c.png", "d.png"]
    SimilarityIndex().build([_blocks(s) for s in range(4)], names, progress=False).save(index)
    Image.fromarray(_blocks(2)[:, ::-1]).save(tmp_path / "copy.png")  # a mirrored copy of c.png
    Image.fromarray(_blocks(99)).save(tmp_path / "new.png")
    assert main(["index", "screen", str(tmp_path / "copy.png"), "--index", str(index)]) == 1
    said = capsys.readouterr().out
    assert "nearest training image: c.png" in said and "flagged (>=" in said, said
    assert main(["index", "screen", str(tmp_path / "new.png"), "--index", str(index), "--json"]) == 0
    about = json.loads(capsys.readouterr().out)
    assert about["flagged"] is False and about["similarity"] < about["threshold"] and about["nearest"]


def test_screen_without_an_index_says_how_to_build_it(tmp_path, capsys):
    Image.fromarray(_blocks(0)).save(tmp_path / "x.png")
    missing = tmp_path / "none.index.npz"
    assert main(["index", "screen", str(tmp_path / "x.png"), "--index", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "ldmkit index build" in err and str(missing) in err, err
