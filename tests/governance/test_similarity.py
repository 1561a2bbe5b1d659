"""The training-data similarity index: copies under common transforms match their source, other images do not."""

import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from ldmkit.data.fashion_mnist import load_arrays
from ldmkit.errors import InputError, MissingFileError
from ldmkit.governance import similarity
from ldmkit.governance.similarity import (
    DEFAULT_THRESHOLD,
    SimilarityIndex,
    build_index,
    index_path_for,
    load_index,
)
from ldmkit.shipped import resolve_model
from tests.factory import with_training_data


@pytest.fixture(scope="module")
def data():
    images, _ = load_arrays("test")
    rgb = [np.asarray(Image.fromarray(a).convert("RGB").resize((64, 64), Image.Resampling.BICUBIC)) for a in images]
    index = SimilarityIndex().build(rgb[:200], [f"train/{i}" for i in range(200)], progress=False)
    return rgb, index


def jpeg(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=60)
    return np.asarray(Image.open(buf).convert("RGB"))


def jitter(a):
    img = ImageEnhance.Contrast(ImageEnhance.Brightness(Image.fromarray(a)).enhance(1.1)).enhance(0.9)
    return np.asarray(img)


def crop(a, y=3, x=9):
    return np.asarray(Image.fromarray(a[y : y + 51, x : x + 51]).resize((64, 64), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("transform", [lambda a: a, lambda a: a[:, ::-1].copy(), jpeg, jitter, crop])
def test_transformed_copies_match_their_source(data, transform):
    rgb, index = data
    picks = list(range(0, 200, 25))
    matches = index.query([transform(rgb[i]) for i in picks])
    assert [m.index for m in matches] == picks
    assert all(m.similarity >= 0.9 for m in matches), [round(m.similarity, 3) for m in matches]


@pytest.mark.parametrize("y, x", [(3, 9), (12, 1)])  # boxes off the old fixed grid of crop boxes
def test_an_80_percent_crop_scores_as_a_copy_of_its_source(data, y, x):
    # a 51-pixel square of a 64-pixel training image, resized back: the crop search must find its box
    rgb, index = data
    picks = [0, 40, 90, 130, 199]
    matches = index.query([crop(rgb[i], y, x) for i in picks])
    assert [m.index for m in matches] == picks
    assert min(m.similarity for m in matches) >= DEFAULT_THRESHOLD, [round(m.similarity, 3) for m in matches]


def test_images_outside_the_index_score_below_the_threshold(data):
    rgb, index = data
    scores = [m.similarity for m in index.query(rgb[500:560])]
    assert max(scores) < DEFAULT_THRESHOLD


def test_save_load_and_errors(data, tmp_path):
    _, index = data
    path = index.save(tmp_path / "x.index.npz")
    again = SimilarityIndex.load(path)
    assert len(again) == 200 and again.names[7] == "train/7"
    with pytest.raises(MissingFileError, match="ldmkit index build"):
        SimilarityIndex.load(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not an index")
    with pytest.raises(InputError, match="not an ldmkit similarity index"):
        SimilarityIndex.load(tmp_path / "bad.npz")
    with pytest.raises(InputError, match="empty"):
        SimilarityIndex().query([np.zeros((8, 8, 3), np.uint8)])
    assert index_path_for("weights/emoji.safetensors").name == "emoji.index.npz"


def test_an_index_of_the_previous_version_says_how_to_rebuild_it(tmp_path):
    path = tmp_path / "old.index.npz"
    np.savez_compressed(
        path, version=1, thumbs=np.zeros((2, 32, 32), np.uint8), names=np.array(["a", "b"]), source=np.array("emoji")
    )
    with pytest.raises(InputError, match="version 1 .*ldmkit index build emoji --out"):
        SimilarityIndex.load(path)


def test_thumbnails_keep_up_to_64_pixels_of_the_training_images():
    small = [np.full((32, 32), 9 * i, np.uint8) for i in range(3)]
    large = [np.full((96, 80, 3), 9 * i, np.uint8) for i in range(3)]
    assert SimilarityIndex().build(small, ["a", "b", "c"], progress=False).thumbs.shape == (3, 32, 32)
    assert SimilarityIndex().build(large, ["a", "b", "c"], progress=False).thumbs.shape == (3, 64, 64)


def test_build_index_from_a_folder(tmp_path, data):
    rgb, _ = data
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(rgb[i]).save(folder / f"p{i}.png")
    index = build_index(str(folder), tmp_path / "f.npz", progress=False)
    assert len(index) == 6 and index.names[0].endswith("p0.png")
    assert index.query([rgb[3]])[0].name.endswith("p3.png")
    with pytest.raises(InputError, match="neither a model"):
        build_index(str(tmp_path / "nothing"), tmp_path / "g.npz", progress=False)


def test_a_model_of_a_built_in_set_has_its_index_built_once_and_reused(tmp_path, monkeypatch, capsys):
    """No index ships with emoji: the first screen builds it from the emoji set on this machine into the cache (the
    same index `ldmkit index build emoji` writes), and later ones read it from there without building."""
    monkeypatch.setattr(similarity, "cache_home", lambda: tmp_path / "cache")
    model = tmp_path / "emoji.safetensors"
    model.symlink_to(resolve_model("emoji"))
    first = load_index(model)
    assert "building the similarity index of emoji" in capsys.readouterr().err
    assert len(list((tmp_path / "cache" / "index").glob("emoji-*.index.npz"))) == 1
    by_name = build_index("emoji", tmp_path / "by-name.index.npz", progress=False)
    assert first.names == by_name.names and np.array_equal(first.thumbs, by_name.thumbs)

    def no_build(*a, **k):
        raise AssertionError("built again")

    monkeypatch.setattr(similarity, "build_index", no_build)
    again = load_index(model)
    assert np.array_equal(again.thumbs, first.thumbs) and "building" not in capsys.readouterr().err


def test_a_model_of_a_folder_still_needs_its_index_built(tmp_path, monkeypatch):
    monkeypatch.setattr(similarity, "cache_home", lambda: tmp_path / "cache")
    model = with_training_data(resolve_model("emoji"), tmp_path / "mine.safetensors", str(tmp_path / "photos"))
    with pytest.raises(MissingFileError, match="ldmkit index build .*mine.index.npz"):
        load_index(model)
    assert not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def many():
    """4,000 Fashion-MNIST test images at 32 pixels, the shipped model's size: many near neighbours for each."""
    images, _ = load_arrays("test")
    images = [np.asarray(Image.fromarray(a).resize((32, 32), Image.Resampling.BICUBIC)) for a in images[:4000]]
    return images, SimilarityIndex().build(images, [f"t/{i}" for i in range(len(images))], progress=False)


def test_80_percent_crops_are_retrieved_among_thousands_of_similar_images(many):
    # a crop changes the whole image's descriptor: retrieval must search the crop box, else the source falls out
    # of the candidates among 4,000 garments of the same few shapes
    images, index = many
    rng = np.random.default_rng(3)
    picks = rng.choice(len(images), 12, replace=False).tolist()
    probes = []
    for i in picks:
        y, x = rng.integers(0, 7, 2)  # a 26-pixel square: 80% of the side, anywhere
        square = Image.fromarray(images[i][y : y + 26, x : x + 26])
        probes.append(np.asarray(square.resize((32, 32), Image.Resampling.BICUBIC)))
    matches = index.query(probes)
    assert [m.index for m in matches] == picks
    assert min(m.similarity for m in matches) >= DEFAULT_THRESHOLD, [round(m.similarity, 3) for m in matches]


def test_an_image_with_a_blank_centre_is_found_by_its_whole(many):
    # the retrieval descriptor of an entry is its central box; a plain square with its detail in a corner has a
    # flat centre, and only the whole-image descriptor finds its copy
    images, _ = many
    rng = np.random.default_rng(0)
    corner = [np.full((64, 64), 200, np.uint8) for _ in range(40)]
    for a, g in zip(corner, rng.choice(len(images), 40, replace=False)):
        a[:12, :12] = np.asarray(Image.fromarray(images[g]).resize((12, 12), Image.Resampling.BICUBIC))
    pool = [np.asarray(Image.fromarray(a).resize((64, 64))) for a in images[:400]] + corner
    index = SimilarityIndex().build(pool, [str(i) for i in range(len(pool))], progress=False)
    matches = index.query([pool[400], pool[421], pool[439]])
    assert [m.index for m in matches] == [400, 421, 439]
    # the flat windows of these images once scored 20 (rounding error over a near-zero energy) and took the match
    assert all(DEFAULT_THRESHOLD <= m.similarity <= 1 + 1e-4 for m in matches), [m.similarity for m in matches]


def test_an_index_smaller_than_the_candidate_list(data):
    rgb, _ = data
    index = SimilarityIndex().build(rgb[:5], [str(i) for i in range(5)], progress=False)
    matches = index.query([rgb[3], crop(rgb[1]), rgb[2][:, ::-1].copy()])
    assert [m.index for m in matches] == [3, 1, 2]


def test_small_jpeg_copies_match_their_source_and_others_stay_below(many):
    # at 32 pixels JPEG's 8x8 block edges are part of the detail compared: only a JPEG round trip of the training
    # image puts them back; images outside the index must not rise above the threshold through the same round trips
    images, index = many
    picks = list(range(0, 4000, 400))
    matches = index.query([jpeg(np.stack([images[i]] * 3, -1)) for i in picks])
    assert [m.index for m in matches] == picks
    assert min(m.similarity for m in matches) >= DEFAULT_THRESHOLD, [round(m.similarity, 3) for m in matches]
    outside = [
        np.asarray(Image.fromarray(a).resize((32, 32), Image.Resampling.BICUBIC)) for a in load_arrays("test")[0][-40:]
    ]
    assert max(m.similarity for m in index.query(outside)) < DEFAULT_THRESHOLD
