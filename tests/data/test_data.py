"""Data sets: image folders (classes, captions, damaged files, modes, crops), Fashion-MNIST, holdout, image I/O."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.config import DataConfig
from ldmkit.data import build_dataset, split_holdout
from ldmkit.data.folder import ImageFolder
from ldmkit.data.images import load_image, resize_and_crop, save_grid, to_mode, to_pil, to_tensor
from ldmkit.errors import InputError

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _solid(path: Path, color, size=(20, 12), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


@pytest.fixture
def folder(tmp_path):
    """cats/ (2 images) and dogs/ (1 image), a metadata.jsonl caption, a sidecar caption, and one garbage .png."""
    root = tmp_path / "pets"
    _solid(root / "cats" / "a.png", (255, 0, 0))
    _solid(root / "cats" / "b.jpg", (0, 255, 0))
    _solid(root / "dogs" / "c.png", (0, 0, 255))
    (root / "cats" / "b.txt").write_text("a green cat\n")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "cats/a.png", "text": "a red cat"}) + "\n")
    (root / "dogs" / "broken.png").write_bytes(b"this is not an image at all")
    return root


def _cfg(root, **kw):
    return DataConfig(dataset=str(root), resolution=8, channels=3, **kw)


def test_folder_classes_captions_and_items(folder):
    with pytest.warns(UserWarning, match="broken.png"):
        ds = build_dataset(_cfg(folder))
    assert isinstance(ds, ImageFolder)
    assert ds.class_names == ["cats", "dogs"]
    assert len(ds) == 3  # the garbage file is dropped up front
    assert ds.captions == ["a red cat", "a green cat", ""]
    items = [ds[i] for i in range(3)]
    assert [it["label"] for it in items] == [0, 0, 1]
    assert [it["index"] for it in items] == [0, 1, 2]
    assert [it["caption"] for it in items] == ds.captions
    red = items[0]["image"]
    assert red.shape == (3, 8, 8) and red.dtype == torch.float32
    assert torch.allclose(red[:, 4, 4], torch.tensor([1.0, -1.0, -1.0]))


def test_root_images_have_no_class_and_limit(tmp_path):
    for i in range(5):
        _solid(tmp_path / f"{i}.png", (i * 50, 0, 0))
    ds = build_dataset(DataConfig(dataset=str(tmp_path), resolution=4, channels=1, limit=3))
    assert len(ds) == 3 and ds.class_names == [] and ds.captions is None
    it = ds[2]
    assert it["label"] == -1 and it["caption"] == "" and it["image"].shape == (1, 4, 4)


def test_file_unreadable_at_load_time_is_replaced_with_warning(tmp_path):
    _solid(tmp_path / "a.png", (255, 255, 255))
    _solid(tmp_path / "b.png", (0, 0, 0), size=(64, 64))
    ds = ImageFolder(_cfg(tmp_path))
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[:60])  # a valid header, truncated pixel data
    with pytest.warns(UserWarning, match="a.png"):
        item = ds[0]
    assert item["index"] == 0 and torch.all(item["image"] == -1)  # b.png (black) stands in
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the second load is silent
        assert torch.all(ds[0]["image"] == -1)


def test_missing_and_empty_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*data.dataset"):
        build_dataset(_cfg(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=f"no images .* under {tmp_path}"):
        build_dataset(_cfg(tmp_path))


def test_rgba_palette_cmyk_and_gray_images_convert(tmp_path):
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.save(tmp_path / "rgba.png")
    Image.new("RGB", (10, 10), (0, 0, 255)).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "pal.gif")
    Image.new("CMYK", (10, 10), (0, 0, 0, 255)).save(tmp_path / "cmyk.jpg")
    Image.new("L", (10, 10), 0).save(tmp_path / "gray.bmp")
    ds = build_dataset(_cfg(tmp_path))
    by_name = {f.name: ds[i]["image"] for i, f in enumerate(ds.files)}
    assert torch.allclose(by_name["rgba.png"], torch.ones(3, 8, 8))
    assert torch.allclose(by_name["pal.gif"][:, 0, 0], torch.tensor([-1.0, -1.0, 1.0]), atol=0.02)
    assert by_name["cmyk.jpg"].max() < -0.9  # black in CMYK stays black in RGB
    assert torch.all(by_name["gray.bmp"] == -1) and by_name["gray.bmp"].shape == (3, 8, 8)
    assert load_image(tmp_path / "rgba.png", 1).mode == "L"


def test_random_crop_and_flip_reproducible_under_seed(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "noise.png")
    ds = build_dataset(_cfg(tmp_path, crop="random", flip=True))
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(torch.stack([ds[0]["image"] for _ in range(6)]))
    assert torch.equal(draws[0], draws[1])
    assert len({tuple(x.flatten()[:16].tolist()) for x in draws[0]}) > 1  # different crops/flips within a run


def test_resize_and_crop_center_keeps_middle():
    img = Image.new("RGB", (30, 10), (0, 0, 0))
    img.paste((255, 255, 255), (10, 0, 20, 10))  # white middle third
    out = resize_and_crop(img, 10)
    assert out.size == (10, 10) and np.asarray(out).min() > 200
    with pytest.raises(ValueError, match="center"):
        resize_and_crop(img, 10, crop="top")


def test_tensor_pil_round_trip_and_clamp():
    x = torch.rand(2, 3, 5, 7) * 2 - 1
    pil = to_pil(x)
    assert isinstance(pil, list) and pil[0].size == (7, 5)
    assert torch.allclose(to_tensor(pil[1]), x[1], atol=1 / 127.5)
    assert np.asarray(to_pil(torch.full((1, 2, 2), 5.0))).tolist() == [[255, 255], [255, 255]]


def test_save_grid_text_chunks_round_trip(tmp_path):
    imgs = torch.linspace(-1, 1, 5).view(5, 1, 1, 1).expand(5, 3, 16, 16)
    meta = {"ldmkit": json.dumps({"prompt": "a red apple", "seed": 7}), "note": "ünïcode ✓"}
    path = save_grid(imgs, tmp_path / "sub" / "grid.png", nrow=3, labels=[f"L{i}" for i in range(5)], metadata=meta)
    assert path == tmp_path / "sub" / "grid.png"
    with Image.open(path) as im:
        assert im.text == meta
        assert im.width == 3 * 18 + 2 and im.height > 2 * 18  # two rows with a label strip each
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary file left behind
    with pytest.raises(ValueError, match="labels"):
        save_grid(imgs, tmp_path / "x.png", labels=["one"])


def test_split_holdout_last_items(tmp_path):
    for i in range(6):
        _solid(tmp_path / f"{i}.png", (i * 40, 0, 0))
        (tmp_path / f"{i}.txt").write_text(f"cap {i}")
    ds = build_dataset(_cfg(tmp_path))
    train, held = split_holdout(ds, 2)
    assert len(train) == 4 and len(held) == 2
    assert held.captions == ["cap 4", "cap 5"] and train.captions[-1] == "cap 3"
    assert held[0]["caption"] == "cap 4" and held[0]["index"] == 0
    assert torch.equal(held[1]["image"], ds[5]["image"])
    with pytest.raises(ValueError, match="data.holdout"):
        split_holdout(ds, 6)


@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_fashion_mnist_shapes_labels_padding():
    ds = build_dataset(DataConfig(dataset="fashion-mnist", limit=50, channels=1, resolution=32))
    assert len(ds) == 50 and len(ds.class_names) == 10 and ds.class_names[9] == "Ankle boot"
    it = ds[0]
    x = it["image"]
    assert x.shape == (1, 32, 32) and x.min() >= -1 and x.max() <= 1 and x.max() > 0.5
    assert it["label"] == 9 and it["caption"] == "Ankle boot"  # the first training image is an ankle boot
    border = torch.cat([x[0, :2].flatten(), x[0, -2:].flatten(), x[0, :, :2].flatten(), x[0, :, -2:].flatten()])
    assert torch.all(border == -1)  # 2 px of black background on every side
    assert {ds[i]["label"] for i in range(50)} <= set(range(10)) and len({ds[i]["label"] for i in range(50)}) > 5
    rgb = build_dataset(DataConfig(dataset="fashion-mnist", split="test", limit=4, channels=3, resolution=16))
    y = rgb[1]["image"]
    assert len(rgb) == 4 and y.shape == (3, 16, 16) and torch.equal(y[0], y[2])


def test_fashion_mnist_bad_split():
    with pytest.raises(ValueError, match="'train' or 'test'"):
        build_dataset(DataConfig(dataset="fashion-mnist", split="valid"))


def test_16bit_grayscale_keeps_its_brightness(tmp_path):
    """16-bit pixels are scaled by the bit depth, not stretched to each image's own maximum."""
    arr = np.full((8, 8), 1000, np.uint16)
    arr[0, 0] = 0
    Image.fromarray(arr).save(tmp_path / "dark16.png")  # a 16-bit PNG ("I;16"), max 1000 of 65535
    for channels in (1, 3):
        img = np.asarray(load_image(tmp_path / "dark16.png", channels))
        assert abs(int(img.max()) - round(1000 / 65535 * 255)) <= 1  # about 4: dark, not white
    for mode in ("I;16B", "I;16L"):
        assert np.asarray(to_mode(Image.fromarray(arr).convert("I").convert(mode), 1)).max() <= 5
    assert np.asarray(to_mode(Image.fromarray(arr.astype(np.int32), "I"), 1)).max() <= 5  # "I" within 16 bits
    full = Image.fromarray(np.array([[0, 1 << 24, (1 << 31) - 1]], np.int32), "I")  # beyond 16 bits: 32-bit range
    assert np.asarray(to_mode(full, 1)).tolist() == [[0, 2, 255]]


def test_metadata_rows_naming_no_image_warn(tmp_path):
    _solid(tmp_path / "a.png", (255, 0, 0))
    rows = [
        {"file_name": "a.png", "text": "red"},
        {"file_name": "gone.png", "text": "lost"},
        {"file_name": "./a.png", "text": "red again"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.warns(UserWarning, match=r"metadata.jsonl line 2 .*gone.png"):
        ds = build_dataset(_cfg(tmp_path))
    assert ds.captions == ["red again"]


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/../../x.png"])
def test_metadata_paths_outside_the_folder_are_refused(tmp_path, name):
    _solid(tmp_path / "a.png", (255, 0, 0))
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "ok"}) + "\n" + json.dumps({"file_name": name, "text": "x"}) + "\n"
    )
    with pytest.raises(InputError, match=r"metadata.jsonl line 2\b.*outside"):
        build_dataset(_cfg(tmp_path))
