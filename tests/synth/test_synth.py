"""`ldmkit synth`: a labelled data set from a model, reproducible per image, resumable, gated, reloadable."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.checkpoint import file_sha256
from ldmkit.cli import main
from ldmkit.config import DataConfig
from ldmkit.data import build_dataset
from ldmkit.data.images import read_parameters
from ldmkit.errors import InputError
from ldmkit.governance.similarity import SimilarityIndex, index_path_for
from ldmkit.ldm import LatentDiffusion
from ldmkit.synth.classifier import Classifier, SmallCNN, augment, train_classifier
from ldmkit.synth.export import SynthOptions, _lock, read_prompts_csv, seed_of, synthesize
from tests.factory import with_training_data

QUICK = dict(steps=2, cfg=1.0, device="cpu")


def _rows(out: Path, name: str = "metadata.jsonl") -> dict[str, dict]:
    return {r["file_name"]: r for r in map(json.loads, (out / name).read_text().splitlines())}


def _run(model, out, **kw):
    return synthesize(model, out, SynthOptions(**(QUICK | kw)), progress=False, report=lambda m: None)


def test_writes_one_folder_per_class_with_traceable_metadata(tiny_ldm, tmp_path):
    out = tmp_path / "syn"
    result = _run(tiny_ldm, out, per_class=3, batch_size=4)
    assert result["written"] == 6 and result["planned"] == 6
    rows = _rows(out)
    assert sorted(rows) == [f"{f}/{k:05d}.png" for f in ("0-top-left", "1-bottom-right") for k in range(3)]
    sha = file_sha256(tiny_ldm)
    for name, row in rows.items():
        assert row["sha256"] == file_sha256(out / name)
        assert row["model_sha256"] == sha and row["steps"] == 2 and row["sampler"] == "dpmpp_2m"
        assert row["seed"] == seed_of(0, row["label"], row["index"])
        assert row["text"] == ("top-left" if row["class"] == 0 else "bottom-right")
        embedded = json.loads(read_parameters(out / name)["ldmkit"])
        assert embedded["seed"] == row["seed"] and embedded["class"] == row["class"]
    # the folder reloads as a labelled data set with the same labels
    ds = build_dataset(DataConfig(dataset=str(out), resolution=16, channels=1))
    assert len(ds) == 6 and [ds[i]["label"] for i in range(6)] == [0, 0, 0, 1, 1, 1]


def test_image_k_of_a_label_does_not_depend_on_batch_size_or_count(tiny_ldm, tmp_path):
    _run(tiny_ldm, tmp_path / "a", per_class=3, batch_size=1)
    _run(tiny_ldm, tmp_path / "b", per_class=2, batch_size=4, labels=[1])
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    for name in b:
        assert a[name]["sha256"] == b[name]["sha256"], name
    _run(tiny_ldm, tmp_path / "c", per_class=2, batch_size=4, labels=[1], seed=1)
    c = _rows(tmp_path / "c")
    assert all(c[n]["sha256"] != b[n]["sha256"] for n in b)  # another --seed, other images


def test_rerun_skips_intact_images_and_draws_lost_ones_again_identically(tiny_ldm, tmp_path):
    out = tmp_path / "syn"
    _run(tiny_ldm, out, per_class=3, batch_size=2)
    first = _rows(out)
    untouched = out / "0-top-left/00000.png"
    stamp = untouched.stat().st_mtime_ns
    (out / "0-top-left/00001.png").unlink()
    (out / "1-bottom-right/00002.png").write_bytes(b"not a png")
    with (out / "metadata.jsonl").open("a") as f:
        f.write('{"file_name": "0-top-left/000')  # a crash in the middle of an append
    result = _run(tiny_ldm, out, per_class=4, batch_size=2)
    assert result["already_there"] == 4 and result["drawn_again"] == 2 and result["written"] == 4
    rows = _rows(out)
    assert len(rows) == 8 and len((out / "metadata.jsonl").read_text().splitlines()) == 8
    for name, row in first.items():
        assert rows[name]["sha256"] == row["sha256"] == file_sha256(out / name)  # the same pixels again
    assert untouched.stat().st_mtime_ns == stamp
    again = _run(tiny_ldm, out, per_class=4)
    assert again["written"] == 0 and again["already_there"] == 8


def test_other_settings_are_refused_unless_overwrite(tiny_ldm, tmp_path):
    out = tmp_path / "syn"
    _run(tiny_ldm, out, per_class=1)
    with pytest.raises(InputError, match=r"steps 2 -> 3"):
        _run(tiny_ldm, out, per_class=1, steps=3)
    result = _run(tiny_ldm, out, per_class=1, steps=3, overwrite=True)
    assert result["written"] == 2 and all(r["steps"] == 3 for r in _rows(out).values())


def test_a_second_writer_into_the_same_folder_is_refused(tiny_ldm, tmp_path):
    out = tmp_path / "syn"
    out.mkdir()
    held = _lock(out)
    try:
        with pytest.raises(InputError, match="another `ldmkit synth` is writing"):
            _run(tiny_ldm, out, per_class=1)
    finally:
        held.release()
    assert _run(tiny_ldm, out, per_class=1)["written"] == 2


def test_synth_under_torchrun_is_refused_before_any_work(tiny_ldm, tmp_path, monkeypatch, capsys):
    """Its folder takes one writer: a second rank would be refused mid-job, so a torchrun start is refused at once."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["synth", str(tiny_ldm), "--out", str(tmp_path / "syn"), "--per-class", "1", "--quiet"]) == 2
    assert "ldmkit synth runs as one process" in capsys.readouterr().err
    assert not (tmp_path / "syn").exists()


def test_kill_9_loses_at_most_the_batch_in_flight(tiny_ldm, tmp_path):
    out = tmp_path / "syn"
    cmd = [sys.executable, "-m", "ldmkit", "synth", str(tiny_ldm), "--out", str(out), "--per-class", "40"]
    cmd += ["--steps", "4", "--batch-size", "2", "--device", "cpu", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    meta = out / "metadata.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if meta.is_file() and len(meta.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _rows(out)
    assert 4 <= len(before) < 80
    assert all(r["sha256"] == file_sha256(out / n) for n, r in before.items())  # every recorded image is whole
    assert main(cmd[3:]) == 0
    rows = _rows(out)
    assert len(rows) == 80 and all(r["sha256"] == file_sha256(out / n) for n, r in rows.items())
    assert all(rows[n]["sha256"] == r["sha256"] for n, r in before.items())


def _gated_model(tiny_ldm, tmp_path) -> Path:
    """tiny_ldm, recorded as trained on a folder of 16x16 images in two class subfolders (so that training its
    --min-confidence classifier takes a moment)."""
    data = tmp_path / "real"
    g = np.random.default_rng(0)
    for c, name in enumerate(("top-left", "bottom-right")):
        (data / name).mkdir(parents=True)
        for i in range(24):
            a = g.integers(0, 40, (16, 16), dtype=np.uint8)
            if c == 0:
                a[1:8, 1:8] = 255
            else:
                a[8:15, 8:15] = 255
            Image.fromarray(a, "L").save(data / name / f"{i}.png")
    ldm = LatentDiffusion.load(tiny_ldm)
    run = replace(ldm.run, data=replace(ldm.run.data, dataset=str(data)))
    return replace(ldm, run=run).save(tmp_path / "gated.safetensors")


def test_min_confidence_drops_images_below_it_and_reruns_keep_them_dropped(tiny_ldm, tmp_path):
    model = _gated_model(tiny_ldm, tmp_path)
    out = tmp_path / "syn"
    everything = _run(model, out, per_class=6, min_confidence=0.0)
    assert everything["dropped_low_confidence"] == 0 and (out / "classifier.safetensors").is_file()
    conf = sorted(r["confidence"] for r in _rows(out).values())
    assert all(0 <= c <= 1 for c in conf) and conf[0] < conf[-1]
    cut = conf[len(conf) // 2]
    gated = tmp_path / "gated"
    result = _run(model, gated, per_class=6, min_confidence=cut, classifier=str(out / "classifier.safetensors"))
    kept, gone = _rows(gated), _rows(gated, "dropped.jsonl")
    assert result["dropped_low_confidence"] == len(gone) == sum(c < cut for c in conf) > 0
    assert all(r["confidence"] >= cut for r in kept.values()) and all(r["confidence"] < cut for r in gone.values())
    assert all(not (gated / n).exists() for n in gone)
    again = _run(model, gated, per_class=6, min_confidence=cut, classifier=str(out / "classifier.safetensors"))
    assert again["written"] == 0 and again["already_there"] == 12  # dropped ones are not drawn again


def test_dedupe_threshold_drops_copies_of_training_images(tiny_ldm, tmp_path):
    model = Path(shutil.copy(tiny_ldm, tmp_path / "model.safetensors"))
    first = tmp_path / "first"
    _run(tiny_ldm, first, per_class=3)
    names = sorted(_rows(first))
    index = SimilarityIndex().build([np.asarray(Image.open(first / n)) for n in names], names, progress=False)
    index.save(index_path_for(model))
    copies = _run(model, tmp_path / "copies", per_class=3, dedupe_threshold=0.975)
    assert copies["dropped_near_copies"] == 6 and copies["written"] == 0
    gone = _rows(tmp_path / "copies", "dropped.jsonl")
    assert {r["nearest_training_image"] for r in gone.values()} == set(names)
    fresh = _run(model, tmp_path / "fresh", per_class=3, seed=7, dedupe_threshold=0.999)
    assert fresh["dropped_near_copies"] == 0 and fresh["written"] == 6
    assert all(r["similarity"] < 0.999 for r in _rows(tmp_path / "fresh").values())


def test_text_models_draw_per_label_from_a_prompts_csv(tiny_text_ldm, tmp_path):
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt,label\na red apple,fruit\na green pear,fruit\na blue car,vehicle\n")
    out = tmp_path / "syn"
    assert (
        main(
            ["synth", str(tiny_text_ldm), "--prompts", str(csv), "--per-class", "3", "--out", str(out)]
            + ["--steps", "2", "--quiet", "--device", "cpu"]
        )
        == 0
    )
    rows = _rows(out)
    assert sorted(rows) == [f"{f}/{k:05d}.png" for f in ("fruit", "vehicle") for k in range(3)]
    assert [rows[f"fruit/{k:05d}.png"]["text"] for k in range(3)] == ["a red apple", "a green pear", "a red apple"]
    ds = build_dataset(DataConfig(dataset=str(out), resolution=16, channels=1))
    assert ds.class_names == ["fruit", "vehicle"] and ds[4]["caption"] == "a blue car"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompts", "{csv}"], "not text-conditional"),
        (["--per-class", "0"], "--per-class 0 is out of range"),
        (
            ["--label", "5"],
            r"--label 5 is out of range: this model has 2 classes, --label 0 to 1 \(0=top-left, 1=bottom-right\)",
        ),
        (["--label", "-1"], "class numbers from 0"),
        (["--classifier", "x.safetensors"], "give --min-confidence"),
        (["--min-confidence", "1.5"], "--min-confidence 1.5 must be a number in"),
        (["--dedupe-threshold", "0"], r"--dedupe-threshold 0.0 must be a number in \(0, 1\]"),
        (["--steps", "0"], "--steps 0 is out of range"),
    ],
)
def test_bad_options_are_one_line_errors(tiny_ldm, tmp_path, capsys, argv, message):
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,label\na,b\n")
    argv = [a.replace("{csv}", str(csv)) for a in argv]
    assert main(["synth", str(tiny_ldm), "--out", str(tmp_path / "o"), "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_dedupe_with_a_model_of_a_folder_says_how_to_build_its_index(tiny_ldm, tmp_path, capsys):
    """A model trained on a folder has no index until `ldmkit index build` writes one (one of a built-in set is built
    on first use, see tests/governance/test_similarity.py)."""
    model = with_training_data(tiny_ldm, tmp_path / "m.safetensors", str(tmp_path / "photos"))
    argv = ["synth", str(model), "--out", str(tmp_path / "o"), "--device", "cpu", "--dedupe-threshold", "0.9"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "ldmkit index build" in err, err
    assert not (tmp_path / "o").exists()


def test_text_models_need_prompts_and_labels_may_not_collide(tiny_text_ldm, tmp_path):
    with pytest.raises(InputError, match="--prompts prompts.csv"):
        _run(tiny_text_ldm, tmp_path / "o", per_class=1)
    rows = [("a", "Red Fruit"), ("b", "red-fruit")]
    with pytest.raises(InputError, match="would share the folder 'red-fruit'"):
        _run(tiny_text_ldm, tmp_path / "o", per_class=1, prompts=rows)


@pytest.mark.parametrize(
    "text, message",
    [
        ("text,label\na,b\n", "must name the columns prompt and label"),
        ("prompt,label\n", "no rows"),
        ("prompt,label\na,\n", "line 2: both prompt and label"),
    ],
)
def test_prompts_csv_errors_name_the_line(tmp_path, text, message):
    p = tmp_path / "p.csv"
    p.write_text(text)
    with pytest.raises(InputError, match=message):
        read_prompts_csv(str(p))


def test_classifier_learns_separable_classes_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, 16, 16, generator=g) * 0.2 - 1
    y = torch.arange(200) % 2
    x[y == 0, :, 2:7, 2:7] = 1
    x[y == 1, :, 9:14, 9:14] = 1
    clf = train_classifier(x, y, ["a", "b"], epochs=3, seed=0)
    assert clf.accuracy(x, y) > 0.95
    back = Classifier.load(clf.save(tmp_path / "c.safetensors"))
    assert back.class_names == ["a", "b"] and torch.allclose(back.probabilities(x), clf.probabilities(x))
    chance = Classifier(SmallCNN(1, 2), ["a", "b"])
    assert chance.accuracy(x, y) < 0.9  # an untrained network does not


def test_augment_crops_within_the_padding_and_keeps_content(tmp_path):
    x = torch.full((64, 1, 8, 8), -1.0)
    x[:, :, 3:5, 3:5] = 1
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.equal(out.sum((1, 2, 3)), x.sum((1, 2, 3)))  # the square stays whole
    assert len({tuple(o.nonzero().tolist()[0]) for o in (out > 0)}) > 3  # moved about
