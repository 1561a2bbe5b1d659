"""The output safety filter: open_nsfw scores every image; at or above the policy's threshold an image is withheld or
blurred, its hash and score go to the audit trail, and it never reaches the gallery."""

import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

from ldmkit.data.images import to_pil
from ldmkit.errors import ConfigError
from ldmkit.governance.policy import load_policy
from ldmkit.governance.safety import SafetyFilter, SafetySettings, placeholder
from ldmkit.ldm import LatentDiffusion
from ldmkit.pipelines.generate import generate
from ldmkit.pipelines.request import SampleRequest
from ldmkit.serve.audit import Audit
from ldmkit.serve.auth import Keys
from ldmkit.serve.store import open_store
from ldmkit.shipped import resolve_model
from tests.serve_helpers import LiveServer, pixels


def test_shipped_model_outputs_pass_the_default_threshold():
    ldm = LatentDiffusion.load(resolve_model("emoji"))
    images, _ = generate(ldm, SampleRequest(n=8, prompts=["red apple", "grinning face", "blue heart"], steps=8))
    verdicts = SafetyFilter(SafetySettings()).screen(to_pil(images))
    assert len(verdicts) == 8 and not any(v.flagged for v in verdicts)
    assert all(0.0 <= v.score < 0.8 for v in verdicts)


def test_the_threshold_decides_both_ways():
    img = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    score = SafetyFilter().scores([img])[0]
    assert SafetyFilter(SafetySettings(threshold=score)).screen([img])[0].flagged  # at the threshold: flagged
    assert not SafetyFilter(SafetySettings(threshold=min(1.0, score + 1e-3))).screen([img])[0].flagged


def test_the_placeholder_shows_nothing_of_the_image():
    rng = np.random.default_rng(1)
    img = Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8"))
    blurred = np.asarray(placeholder(img), dtype=float)
    assert placeholder(img).size == img.size and blurred.std() < np.asarray(img, dtype=float).std() / 10


@pytest.mark.parametrize(
    "table, says", [("threshold = 2", "between 0 and 1"), ("action = 'hide'", "withhold, blur"), ("limit = 1", "takes")]
)
def test_bad_safety_settings_name_the_file(tmp_path, table, says):
    path = tmp_path / "policy.toml"
    path.write_text(f"[safety]\n{table}\n")
    with pytest.raises(ConfigError) as err:
        load_policy(path)
    assert str(path) in str(err.value) and says in str(err.value)


@pytest.mark.parametrize("action", ["withhold", "blur"])
def test_the_server_withholds_or_blurs_flagged_images_and_audits_them(tmp_path, action):
    policy, db = tmp_path / "policy.toml", tmp_path / "db"
    policy.write_text(f"[safety]\nthreshold = 0.0\naction = '{action}'\n")  # every image is flagged
    server = LiveServer(db, models=("emoji",), policy=str(policy))
    try:
        key = Keys(open_store(str(db))).create("u", "user")[0]
        with server.client(key) as c:
            body = {"prompt": "red apple", "n": 2, "steps": 3, "seed": 4}
            data = c.post("/v1/images/generations", json=body).json()["data"]
            assert all("safety filter score" in d["withheld"] for d in data)
            a1111 = c.post("/sdapi/v1/txt2img", json={"prompt": "red apple", "steps": 3, "seed": 4}).json()
            job = c.post("/v1/jobs", json=body).json()
            for _ in range(300):
                view = c.get(f"/v1/jobs/{job['id']}").json()
                if view["status"] == "done":
                    break
                time.sleep(0.05)
        rows = [r for r in Audit(open_store(str(db))).tail(2000) if r["route"] == "POST /v1/images/generations"]
        assert rows[-1]["decision"] == "served" and len(rows[-1]["outputs"]) == 2
        assert rows[-1]["outputs"][0][:16] in rows[-1]["reason"] and "score" in rows[-1]["reason"]
        ldm = LatentDiffusion.load(resolve_model("emoji"))
        original = to_pil(generate(ldm, SampleRequest(n=1, prompts=["red apple"], steps=3, seed=4, cfg=5.0))[0])
        if action == "withhold":
            assert all(d["b64_json"] is None for d in data) and a1111["images"] == []
            assert view["images"] == [None, None] and len(view["withheld"]) == 2
        else:
            shown = Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"])))
            assert shown.size == (64, 64) and pixels(data[0]["b64_json"]) != original[0].tobytes()
            assert len(a1111["images"]) == 1 and all(view["images"])
    finally:
        server.close()
