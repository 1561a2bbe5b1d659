"""POST /v1/videos in OpenAI's shape on a tiny video model: created at once, polled to completed, its MP4 downloaded
(valid, watermarked frames, its SHA-256 in the job's audit row), the quota counted in frames, other keys kept out,
image models and bad clips refused naming the field, DELETE cancelling and forgetting a clip."""

from __future__ import annotations

import base64
import hashlib
import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmkit.data.clips import read_clip_parameters
from ldmkit.serve.audit import Audit
from ldmkit.serve.auth import Keys
from ldmkit.serve.store import open_store
from tests.pipelines.test_video import tiny_video  # noqa: F401  (the fixture)
from tests.serve_helpers import LiveServer

av = pytest.importorskip("av")

CLIP = {"prompt": "bag left", "frames": 4, "steps": 2, "seed": 7, "fps": 4}


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_video, tiny_text_ldm):  # noqa: F811
    db = tmp_path_factory.mktemp("videos") / "ldmkit.db"
    server = LiveServer(
        db, models=(str(tiny_video), str(tiny_text_ldm)), limits={"max_frames": 6, "max_steps": 4}, watermark=True
    )
    keys = Keys(open_store(str(db)))
    server.key = keys.create("video-user", "user")[0]
    server.other = keys.create("video-other", "user")[0]
    server.small = keys.create("video-small", "user", images_per_day=6)[0]  # one 4-frame clip, not two
    server.video, server.image = Path(tiny_video).parent.name, Path(tiny_text_ldm).parent.name
    server.db = db
    yield server
    server.close()


def finished(c, video_id: str, timeout_s: float = 120) -> dict:
    """Poll GET /v1/videos/{id} until the clip is completed or failed."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = c.get(f"/v1/videos/{video_id}")
        assert r.status_code == 200, r.text
        if r.json()["status"] in ("completed", "failed") or time.monotonic() > deadline:
            return r.json()
        time.sleep(0.1)


def audit_row(live, request_id: str) -> dict:
    rows = Audit(open_store(str(live.db))).tail(1000)
    return next(r for r in rows if r["request_id"] == request_id)


def test_a_clip_is_created_polled_and_downloaded_as_an_mp4_whose_hash_the_audit_row_holds(live):
    with live.client(live.key) as c:
        r = c.post("/v1/videos", json=CLIP | {"model": live.video, "seconds": None})
        assert r.status_code == 200, r.text
        made = r.json()
        assert made["object"] == "video" and made["status"] in ("queued", "in_progress", "completed")
        assert made["model"] == live.video and made["size"] == "16x16" and made["seconds"] == "1"
        assert made["frames"] == 4 and made["prompt"] == "bag left" and isinstance(made["created_at"], int)
        done = finished(c, made["id"])
        assert done["status"] == "completed" and done["progress"] == 100 and done["error"] is None, done
        assert done["completed_at"] >= done["created_at"]
        content = c.get(f"/v1/videos/{made['id']}/content")
        listed = c.get("/v1/videos").json()
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    digest = hashlib.sha256(content.content).hexdigest()
    assert digest == done["sha256"]
    with av.open(io.BytesIO(content.content)) as f:
        frames = [fr.to_ndarray(format="gray") for fr in f.decode(video=0)]
    assert len(frames) == 4 and frames[0].shape == (16, 16)
    row = audit_row(live, made["id"])  # the job's own row, written when it ended
    assert row["route"] == "video" and row["decision"] == "served" and row["outputs"] == [digest]
    assert row["params"]["frames"] == 4 and row["params"]["steps"] == 2 and row["params"]["seed"] == 7
    assert "precision" not in row["params"] and "batch_size" not in row["params"]  # SampleRequest.record()
    assert listed["object"] == "list" and listed["data"][0]["id"] == made["id"]


def test_the_mp4_carries_its_record_and_every_frame_the_watermark(live, tmp_path):
    from ldmkit.governance import watermark

    with live.client(live.key) as c:
        made = c.post("/v1/videos", json=CLIP | {"model": live.video, "seed": 8, "size": "32x32"}).json()
        assert finished(c, made["id"])["status"] == "completed"
        mp4 = tmp_path / "clip.mp4"
        mp4.write_bytes(c.get(f"/v1/videos/{made['id']}/content").content)
    about = read_clip_parameters(mp4)
    assert about["request_id"] == made["id"] and about["seed"] == 8 and about["frames"] == 4
    assert about["watermark"] == watermark.tag_of(made["id"]).hex()  # frames of 32x32 carry the mark


def test_a_key_sees_only_its_own_clips(live):
    with live.client(live.key) as c:
        made = c.post("/v1/videos", json=CLIP | {"model": live.video, "seed": 9}).json()
        finished(c, made["id"])
    with live.client(live.other) as c:
        for path in (f"/v1/videos/{made['id']}", f"/v1/videos/{made['id']}/content"):
            assert c.get(path).status_code == 404
        assert c.delete(f"/v1/videos/{made['id']}").status_code == 404
        assert made["id"] not in [v["id"] for v in c.get("/v1/videos").json()["data"]]
    with live.client(live.key) as c:  # and a native job's listing does not show clips
        assert made["id"] not in [j["id"] for j in c.get("/v1/jobs").json()["data"]]
        assert c.get(f"/v1/jobs/{made['id']}").status_code == 404


def test_the_quota_counts_frames(live):
    with live.client(live.small) as c:
        first = c.post("/v1/videos", json=CLIP | {"model": live.video})
        assert first.status_code == 200, first.text
        assert finished(c, first.json()["id"])["status"] == "completed"
        second = c.post("/v1/videos", json=CLIP | {"model": live.video})  # 4 + 4 frames > 6 a day
    assert second.status_code == 429, second.text
    keys = {k["name"]: k for k in Keys(open_store(str(live.db))).list()}
    assert keys["video-small"]["images_today"] == 4


@pytest.mark.parametrize(
    "change, field, says",
    [
        ({"frames": 0}, "frames", "at least 1 frame"),
        ({"frames": 7}, "frames", "this server's limit of 6 frames"),
        ({"frames": None, "seconds": "60"}, "seconds", "240 frames) is more than this server's limit of 6"),
        ({"frames": None, "seconds": "soon"}, "seconds", "not a number"),
        ({"seconds": "1"}, "seconds", "not both"),
        ({"model": "no-such-model"}, "model", "is not served here"),
        ({"size": "17x16"}, "size", "not a multiple of"),
        ({"input_reference": "bm90IGFuIGltYWdl"}, "input_reference", "not a base64-encoded"),
        ({"fps": 0}, "fps", "frames per second must be above 0"),
        ({"shots": 2}, "shots", "Extra inputs"),
    ],
)
def test_bad_clips_are_refused_naming_the_field(live, change, field, says):
    with live.client(live.key) as c:
        r = c.post("/v1/videos", json=CLIP | {"model": live.video} | change)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and says in err["message"], err


def test_a_model_without_temporal_layers_is_refused_naming_the_video_models(live):
    with live.client(live.key) as c:
        r = c.post("/v1/videos", json=CLIP | {"model": live.image})
        back = c.post("/v1/images/generations", json={"prompt": "a", "model": live.video, "steps": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert f"use one of: {live.video}" in r.json()["error"]["message"]
    assert back.status_code == 400 and "it serves POST /v1/videos" in back.json()["error"]["message"]


def test_a_first_frame_starts_the_clip(live):
    img = np.zeros((16, 16), dtype=np.uint8)
    img[4:12, 4:12] = 255
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    ref = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with live.client(live.key) as c:
        made = c.post("/v1/videos", json=CLIP | {"model": live.video, "input_reference": {"image_url": ref}}).json()
        assert finished(c, made["id"])["status"] == "completed"
    row = audit_row(live, made["id"])
    assert row["params"]["first_frame"] == {"size": "16x16", "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}


def test_delete_forgets_a_clip(live):
    with live.client(live.key) as c:
        made = c.post("/v1/videos", json=CLIP | {"model": live.video, "seed": 11}).json()
        gone = c.delete(f"/v1/videos/{made['id']}")
        assert gone.status_code == 200 and gone.json() == {"id": made["id"], "object": "video.deleted", "deleted": True}
        assert c.get(f"/v1/videos/{made['id']}").status_code == 404


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the client's notice about OpenAI's own video service
def test_the_official_client_creates_polls_downloads_and_deletes_a_clip(live):
    from openai import OpenAI

    client = OpenAI(base_url=f"{live.url}/v1", api_key=live.key, max_retries=0)
    buf = io.BytesIO()
    Image.new("L", (16, 16), 200).save(buf, format="PNG")
    made = client.videos.create(  # a multipart form: every field a string, the first frame a file
        model=live.video,
        prompt="bag left",
        seconds="1",
        input_reference=("first.png", buf.getvalue(), "image/png"),
        extra_body={"fps": 4, "steps": 2, "seed": 5},
    )
    assert made.object == "video" and made.seconds == "1" and made.to_dict()["frames"] == 4
    done = client.videos.poll(made.id, poll_interval_ms=100)
    assert done.status == "completed", done
    mp4 = client.videos.download_content(made.id).content
    assert hashlib.sha256(mp4).hexdigest() == done.to_dict()["sha256"]
    assert audit_row(live, made.id)["params"]["first_frame"]["sha256"] == hashlib.sha256(buf.getvalue()).hexdigest()
    assert made.id in [v.id for v in client.videos.list()]
    assert client.videos.delete(made.id).deleted
