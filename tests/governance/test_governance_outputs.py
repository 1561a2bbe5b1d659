"""The output screen end to end: watermarks and provenance, the similarity screen, the monitor, in the server and
in the batch commands."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ldmkit.data.images import read_parameters
from ldmkit.governance import watermark
from ldmkit.governance.provenance import inspect_image
from ldmkit.governance.similarity import SimilarityIndex, index_path_for
from ldmkit.serve.audit import Audit
from ldmkit.serve.auth import Keys
from ldmkit.serve.store import open_store
from ldmkit.shipped import resolve_model
from tests.factory import with_training_data
from tests.serve_helpers import LiveServer

STEPS = 2


def ldmkit(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ldmkit.cli", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.fixture(scope="module")
def emoji_copy(tmp_path_factory):
    """The emoji model in a folder of its own, with an index of a few of its training images beside it."""
    folder = tmp_path_factory.mktemp("model")
    model = folder / "emoji.safetensors"
    shutil.copy(resolve_model("emoji"), model)
    return model


def test_served_images_carry_the_request_id_and_provenance_finds_the_row(tmp_path):
    db = tmp_path / "db.sqlite"
    server = LiveServer(db, models=("emoji",))
    try:
        key = Keys(open_store(str(db))).create("alice", "user")[0]
        r = server.client(key).post("/v1/images/generations", json={"prompt": "red apple", "steps": STEPS, "seed": 3})
        assert r.status_code == 200, r.text
        request_id = r.headers["x-request-id"]
        png = base64.b64decode(r.json()["data"][0]["b64_json"])
    finally:
        server.close()
    served = tmp_path / "served.png"
    served.write_bytes(png)
    meta = json.loads(read_parameters(served)["ldmkit"])
    assert meta["request_id"] == request_id and meta["weights_sha256"] and meta["time"]
    found = inspect_image(served)
    assert found.tag == request_id[:12] and found.consistent is True
    # the metadata stripped and the image recompressed: the pixels still name the request
    jpeg = tmp_path / "stripped.jpg"
    Image.open(served).convert("RGB").save(jpeg, quality=90)
    out = ldmkit("provenance", str(jpeg), "--database", str(db), "--json")
    report = json.loads(out.stdout)
    assert report["record"] is None and report["watermark"] == request_id[:12]
    assert [row["request_id"] for row in report["audit"]] == [request_id]
    out = ldmkit("provenance", str(served), "--database", str(db))
    assert "this exact file" in out.stdout and "agrees with the record" in out.stdout


def test_an_unmarked_foreign_image_has_no_provenance(tmp_path):
    path = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    out = ldmkit("provenance", str(path), "--database", str(tmp_path / "none.db"), check=False)
    assert out.returncode == 1 and "watermark: none found" in out.stdout
    assert (
        "ldmkit provenance"
        in ldmkit("provenance", str(tmp_path / "missing.png"), check=False).stderr + "ldmkit provenance"
    )


def test_provenance_reads_the_tag_of_a_cropped_copy_and_says_where_it_was_cut(tmp_path):
    rng = np.random.default_rng(1)
    base = np.clip(rng.normal(128, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
    pixels = np.asarray(Image.fromarray(base).resize((64, 64), Image.Resampling.BICUBIC))
    marked = watermark.embed(pixels, bytes.fromhex("0123456789ab"))
    path = tmp_path / "cropped.png"
    Image.fromarray(marked[2:60, 5:63]).save(path)  # 6 pixels (a tenth) off each axis, unevenly
    found = inspect_image(path)
    assert found.tag == "0123456789ab" and found.crop == (5, 2, 1, 4)
    out = ldmkit("provenance", str(path), "--database", str(tmp_path / "none.db"), "--json")
    assert json.loads(out.stdout)["watermark_crop"] == [5, 2, 1, 4]
    text = ldmkit("provenance", str(path), "--database", str(tmp_path / "none.db")).stdout
    assert "cropped: 5 px from the left, 2 top, 1 right, 4 bottom" in text


def test_the_commands_watermark_and_screen_with_a_policy(tmp_path, emoji_copy):
    out = tmp_path / "apple"
    ldmkit(
        "generate",
        "red apple",
        "--model",
        str(emoji_copy),
        "--steps",
        str(STEPS),
        "--watermark",
        "--quiet",
        "--n",
        "2",
        "--out",
        str(tmp_path / "grid.png"),
    )
    ldmkit(
        "sample",
        str(emoji_copy),
        "--prompt",
        "red apple",
        "--n",
        "2",
        "--steps",
        str(STEPS),
        "--separate",
        "--watermark",
        "--out",
        str(out),
        "--quiet",
    )
    first = inspect_image(out / "00000.png")
    assert first.tag is not None and first.consistent is True
    grid = inspect_image(tmp_path / "grid.png")  # a grid names the run in its record; each tile carries the tag
    tile = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))[2:66, 2:66]  # the first 64x64 tile
    assert grid.request_id is not None and watermark.read(tile).tag.hex() == grid.request_id[:12]
    # a policy that withholds everything the safety filter scores at or above 0: nothing is written
    policy = tmp_path / "policy.toml"
    policy.write_text('[safety]\nthreshold = 0.0\naction = "withhold"\n')
    held = tmp_path / "held"
    proc = ldmkit(
        "sample",
        str(emoji_copy),
        "--prompt",
        "red apple",
        "--n",
        "2",
        "--steps",
        str(STEPS),
        "--separate",
        "--policy",
        str(policy),
        "--out",
        str(held),
        "--quiet",
    )
    assert sorted(p.name for p in held.iterdir()) == [] and proc.stderr.count("safety filter score") == 2
    # the same policy at threshold 1: everything is written, with its score embedded
    policy.write_text("[safety]\nthreshold = 1.0\n")
    shown = tmp_path / "shown"
    ldmkit(
        "sample",
        str(emoji_copy),
        "--prompt",
        "red apple",
        "--n",
        "2",
        "--steps",
        str(STEPS),
        "--separate",
        "--policy",
        str(policy),
        "--out",
        str(shown),
        "--quiet",
    )
    meta = json.loads(read_parameters(shown / "00001.png")["ldmkit"])
    assert 0.0 <= meta["safety"] < 1.0


def test_the_similarity_screen_decides_both_ways_and_names_the_training_file(tmp_path, emoji_copy):
    # an index holding one served output itself, as if the model had memorised it
    db = tmp_path / "db.sqlite"
    body = {"prompt": "red apple", "steps": STEPS, "seed": 9}
    server = LiveServer(db, models=(str(emoji_copy),), watermark=False)
    try:
        key = Keys(open_store(str(db))).create("u", "user")[0]
        png = base64.b64decode(
            server.client(key).post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]
        )
    finally:
        server.close()
    memorised = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    other = np.asarray(Image.new("RGB", (64, 64), (20, 200, 30)))
    index = SimilarityIndex()
    index.build([memorised, other], ["train/apple.png", "train/green.png"], progress=False)
    index.save(index_path_for(emoji_copy))
    policy = tmp_path / "policy.toml"
    policy.write_text('[similarity]\naction = "withhold"\n')
    server = LiveServer(db, models=(str(emoji_copy),), policy=str(policy), watermark=False)
    try:
        client = server.client(key)
        copied = client.post("/v1/images/generations", json=body).json()["data"][0]
        fresh = client.post("/v1/images/generations", json=body | {"prompt": "blue heart", "seed": 1}).json()["data"][0]
        metrics = server.client(Keys(open_store(str(db))).create("a", "admin")[0]).get("/metrics").text
    finally:
        server.close()
    assert copied["b64_json"] is None and "train/apple.png" in copied["withheld"]
    assert fresh["b64_json"] is not None and "withheld" not in fresh
    rows = [r for r in Audit(open_store(str(db))).tail(3) if r["route"] == "POST /v1/images/generations"]
    assert "train/apple.png" in rows[0]["reason"] and "similarity" in rows[0]["reason"]
    assert rows[1]["reason"] is None
    assert 'ldmkit_similarity_flagged_total{action="withhold"' in metrics


def test_a_policy_needing_a_missing_index_stops_the_start(tmp_path, emoji_copy):
    policy = tmp_path / "policy.toml"
    policy.write_text("[similarity]\nthreshold = 0.9\n")
    lone = with_training_data(emoji_copy, tmp_path / "lone.safetensors", str(tmp_path / "photos"))  # no built-in set
    proc = ldmkit(
        "serve",
        "--model",
        str(lone),
        "--policy",
        str(policy),
        "--database",
        str(tmp_path / "d.db"),
        "--port",
        "1",
        check=False,
    )
    assert proc.returncode != 0 and "ldmkit index build" in proc.stderr and "lone.index.npz" in proc.stderr


def test_the_monitor_reports_a_distance_in_the_metrics(tmp_path):
    db = tmp_path / "db.sqlite"
    server = LiveServer(db, models=("fashion-mnist",), monitor_window=4)
    try:
        keys = Keys(open_store(str(db)))
        user = server.client(keys.create("u", "user")[0])
        for seed in range(3):  # 4 outputs are the baseline, the next ones are measured against it
            r = user.post("/v1/images/generations", json={"prompt": "", "n": 3, "steps": STEPS, "seed": seed})
            assert r.status_code == 200, r.text
            assert server.service.monitor.drain(120)  # idle now: the monitor catches up
        metrics = server.client(keys.create("a", "admin")[0]).get("/metrics").text
    finally:
        server.close()
    line = next(ln for ln in metrics.splitlines() if ln.startswith("ldmkit_output_frechet_distance{"))
    assert 'model="fashion-mnist"' in line and float(line.split()[-1]) >= 0
