"""`ldmkit serve` end to end over loopback: the OpenAI client, A1111's API, native jobs, roles, limits, audit."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import io
import json
import subprocess
import sys

import httpx
import pytest
from PIL import Image

from ldmkit.data.images import to_pil
from ldmkit.ldm import LatentDiffusion
from ldmkit.pipelines.generate import generate
from ldmkit.pipelines.request import SampleRequest
from ldmkit.serve.audit import Audit
from ldmkit.serve.auth import Keys
from ldmkit.serve.store import open_store
from ldmkit.shipped import resolve_model
from tests.serve_helpers import LiveServer, finished, pixels, png_size

STEPS = 3


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    db = tmp_path_factory.mktemp("serve") / "ldmkit.db"
    # no watermark here: these tests hold the server to bit-identical images across APIs and batches
    # a long time limit: admission control (refusing what cannot finish in time) must not refuse the deliberately
    # long job of the cancellation test on a slow or loaded machine
    server = LiveServer(db, models=("emoji", "fashion-mnist"), max_wait_ms=150, watermark=False, timeout_s=3600)
    keys = Keys(open_store(str(db)))
    server.keys = {role: keys.create(f"{role}-key", role)[0] for role in ("viewer", "user", "admin")}
    server.keys["limited"] = keys.create("limited", "user", images_per_day=3)[0]
    server.db = db
    yield server
    server.close()


@pytest.fixture(scope="module")
def emoji():
    return LatentDiffusion.load(resolve_model("emoji"))


def alone_pixels(ldm, prompt: str, n: int, seed: int, cfg: float = 5.0) -> list[bytes]:
    images, _ = generate(ldm, SampleRequest(n=n, prompts=[prompt], steps=STEPS, seed=seed, cfg=cfg))
    out = []
    for img in images:
        buf = io.BytesIO()
        to_pil(img).save(buf, format="PNG")
        out.append(pixels(buf.getvalue()))
    return out


def test_the_official_openai_client_generates_pngs_of_the_asked_size(live, emoji):
    from openai import OpenAI

    client = OpenAI(base_url=live.url + "/v1", api_key=live.keys["user"], max_retries=0)
    result = client.images.generate(
        model="emoji",
        prompt="red apple",
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={"steps": STEPS, "seed": 11},
    )
    assert len(result.data) == 2
    assert all(png_size(d.b64_json) == (64, 64) for d in result.data)
    assert [pixels(d.b64_json) for d in result.data] == alone_pixels(emoji, "red apple", 2, 11)
    assert [m.id for m in client.models.list().data] == ["emoji", "fashion-mnist"]


def test_same_request_same_image_through_every_api_and_alone_or_batched(live, emoji, tmp_path):
    user = live.client(live.keys["user"])
    body = {"prompt": "blue heart", "n": 1, "steps": STEPS, "seed": 42, "cfg": 4.0}
    openai = user.post("/v1/images/generations", json={**body, "model": "emoji"}).json()["data"][0]["b64_json"]
    a1111 = user.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "blue heart", "steps": STEPS, "seed": 42, "cfg_scale": 4.0, "sampler_name": "DPM++ 2M"},
    ).json()
    job = user.post("/v1/jobs", json={**body, "model": "emoji"}).json()
    view = finished(user, job["id"])
    assert view["status"] == "done"
    expected = alone_pixels(emoji, "blue heart", 1, 42, cfg=4.0)[0]
    assert pixels(openai) == pixels(a1111["images"][0]) == pixels(view["images"][0]) == expected
    out = tmp_path / "cli"
    cli = [sys.executable, "-m", "ldmkit.cli", "sample", str(resolve_model("emoji")), "--prompt", "blue heart"]
    cli += ["--n", "1", "--steps", str(STEPS), "--seed", "42", "--cfg", "4", "--separate", "--out", str(out)]
    subprocess.run(cli, check=True, capture_output=True)
    assert pixels((out / "00000.png").read_bytes()) == expected  # and what `ldmkit sample` writes
    assert json.loads(a1111["info"])["all_seeds"] == [42]

    # Eight strangers at once: batched into shared forward passes, each still gets its own image.
    asks = [(f"prompt {i}", 100 + i, 2.0 + i) for i in range(8)]

    def ask(a):
        r = live.client(live.keys["user"]).post(
            "/v1/images/generations",
            json={"prompt": a[0], "n": 1, "steps": STEPS, "seed": a[1], "cfg": a[2], "model": "emoji"},
        )
        return r.json()["data"][0]["b64_json"]

    before = live.service.metrics.batch._sum.get()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, asks))
    assert live.service.metrics.batch._sum.get() - before == 8
    batches = [s for s in live.service.metrics.batch.collect()[0].samples if s.name.endswith("_count")][0].value
    assert batches < 3 + 8  # at least some of the eight shared a batch
    for a, b64 in zip(asks, got):
        assert pixels(b64) == alone_pixels(emoji, a[0], 1, a[1], a[2])[0], a


def test_roles_keys_and_only_health_without_a_key(live):
    anon = live.client()
    assert anon.get("/healthz").status_code == 200 and anon.get("/readyz").status_code == 200
    for method, path in [
        ("GET", "/v1/models"),
        ("POST", "/v1/images/generations"),
        ("POST", "/sdapi/v1/txt2img"),
        ("POST", "/sdapi/v1/img2img"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/x"),
        ("DELETE", "/v1/jobs/x"),
        ("GET", "/metrics"),
        ("GET", "/v1/keys"),
        ("GET", "/v1/audit"),
        ("GET", "/v1/audit/verify"),
        ("GET", "/sdapi/v1/sd-models"),
    ]:
        r = anon.request(method, path, json={} if method == "POST" else None)
        assert r.status_code == 401, (method, path, r.status_code)
    assert live.client("ldk_nope_nope").get("/v1/models").status_code == 401
    viewer = live.client(live.keys["viewer"])
    assert viewer.get("/v1/models").status_code == 200
    r = viewer.post("/v1/images/generations", json={"prompt": "x", "steps": 2})
    assert r.status_code == 403 and "user" in r.json()["error"]["message"]
    assert live.client(live.keys["user"]).get("/metrics").status_code == 403
    admin = live.client(live.keys["admin"])
    assert "ldmkit_requests_total" in admin.get("/metrics").text
    # A1111 clients authenticate with HTTP Basic; the password is the key.
    basic = httpx.get(live.url + "/sdapi/v1/sd-models", auth=("anyone", live.keys["viewer"]))
    assert basic.status_code == 200 and basic.json()[0]["model_name"] == "emoji"


def test_revocation_takes_effect_at_once(live):
    keys = Keys(open_store(str(live.db)))
    secret, _ = keys.create("short-lived", "user")
    c = live.client(secret)
    assert c.get("/v1/models").status_code == 200
    keys.revoke("short-lived")
    assert c.get("/v1/models").status_code == 401


def test_daily_quota_answers_429_with_retry_after(live):
    c = live.client(live.keys["limited"])
    ok = c.post("/v1/images/generations", json={"prompt": "a", "n": 3, "steps": 2, "model": "emoji"})
    assert ok.status_code == 200
    r = c.post("/v1/images/generations", json={"prompt": "a", "n": 1, "steps": 2, "model": "emoji"})
    assert r.status_code == 429 and 0 < int(r.headers["Retry-After"]) <= 86400


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "a", "n": 0}, "n"),
        ({"prompt": "a", "n": 10_000}, "n"),
        ({"prompt": "a", "steps": 10**9}, "steps"),
        ({"prompt": "a", "size": "65x64"}, "size"),  # named as sent, not "request"
        ({"prompt": "a", "size": "0x0"}, "size"),
        ({"prompt": "a", "size": "64x64x"}, "size"),
        ({"prompt": "a", "size": "99999x64"}, "size"),
        ({"prompt": "a", "cfg": 1e308}, "cfg"),
        ({"prompt": "a", "sampler": "../../etc/passwd"}, "sampler"),
        ({"prompt": "a", "model": "../weights/emoji"}, "model"),
        ({"prompt": "a" * 5000}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "a", "stpes": 5}, "stpes"),
        ({"prompt": "a", "response_format": "url"}, "response_format"),
        ({"prompt": "a", "seed": -5}, "seed"),
    ],
)
def test_bad_requests_get_400_naming_the_field(live, body, field):
    r = live.client(live.keys["user"]).post("/v1/images/generations", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_a_class_model_takes_class_names_as_prompts(live):
    c = live.client(live.keys["user"])
    r = c.post(
        "/v1/images/generations", json={"prompt": "Ankle boot", "model": "fashion-mnist", "steps": 2, "size": "32x32"}
    )
    assert r.status_code == 200 and png_size(r.json()["data"][0]["b64_json"]) == (32, 32)
    r = c.post("/v1/images/generations", json={"prompt": "a red apple", "model": "fashion-mnist", "steps": 2})
    assert r.status_code == 400 and "Ankle boot" in r.json()["error"]["message"]


def test_a1111_img2img_and_inpainting(live):
    c = live.client(live.keys["user"])
    img = Image.new("RGB", (64, 64), (200, 30, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    body = {"prompt": "red apple", "init_images": [b64], "denoising_strength": 0.5, "steps": 4, "seed": 1}
    r = c.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    assert png_size(r.json()["images"][0]) == (64, 64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    r = c.post("/sdapi/v1/img2img", json={**body, "mask": base64.b64encode(buf.getvalue()).decode()})
    assert r.status_code == 200, r.text
    out = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
    assert out.getpixel((2, 2)) == (200, 30, 30)  # outside the mask: the original, exactly
    r = c.post("/sdapi/v1/img2img", json={**body, "init_images": ["not base64!"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "init_images"


def test_jobs_are_private_and_cancellable(live):
    user, other = live.client(live.keys["user"]), live.client(live.keys["admin"])
    job = user.post("/v1/jobs", json={"prompt": "cat", "steps": 2, "n": 1, "model": "emoji"}).json()
    assert user.get(f"/v1/jobs/{job['id']}").status_code == 200
    viewer = live.client(live.keys["viewer"])
    assert viewer.get(f"/v1/jobs/{job['id']}").status_code == 404  # not the viewer's job
    assert other.get(f"/v1/jobs/{job['id']}").status_code == 200  # an admin sees every job
    assert job["id"] in [j["id"] for j in user.get("/v1/jobs").json()["data"]]
    assert job["id"] not in [j["id"] for j in viewer.get("/v1/jobs").json()["data"]]
    long = user.post("/v1/jobs", json={"prompt": "dog", "steps": 100, "n": 8, "model": "emoji"}).json()
    assert user.delete(f"/v1/jobs/{long['id']}").status_code == 200
    assert finished(user, long["id"])["status"] == "cancelled"


def test_every_request_is_audited_and_no_key_leaks(live, capfd):
    admin = live.client(live.keys["admin"])
    audit = Audit(open_store(str(live.db)))
    assert audit.verify().ok
    rows = audit.tail(1000)
    decisions = {r["decision"] for r in rows}
    assert {"served", "refused-auth", "refused-validation"} <= decisions
    served = [r for r in rows if r["decision"] == "served" and r["outputs"]]
    assert served and all(len(h) == 64 for r in served for h in r["outputs"])
    assert all(r["weights_sha256"] for r in served if r["route"].startswith("POST /v1/images"))
    dump = json.dumps(rows) + admin.get("/metrics").text + json.dumps(admin.get("/v1/keys").json())
    out, err = capfd.readouterr()
    everything = dump + out + err + live.db.read_bytes().decode("latin-1")
    for secret in live.keys.values():
        assert secret not in everything
        assert secret.split("_")[-1] not in everything
    assert hashlib.sha256  # the database holds only salted hashes (checked above: no secret in its bytes)
