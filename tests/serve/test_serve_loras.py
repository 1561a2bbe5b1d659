"""LoRAs per request on a live server: a `loras` field (OpenAI, native), `<lora:name:scale>` in A1111 prompts,
GET /sdapi/v1/loras, only the server's folder, a role's allow-list, one batch for different LoRAs with each image
bit for bit its alone image, and the audit row naming each LoRA's SHA-256 and scale."""

import base64
import concurrent.futures
import hashlib
import io
import json

import numpy as np
import pytest

from ldmkit.data.images import to_pil
from ldmkit.ldm import LatentDiffusion
from ldmkit.pipelines.batching import generate_together
from ldmkit.pipelines.img2img import img2img
from ldmkit.pipelines.lora import LoRAFolder, LoRASpec
from ldmkit.pipelines.request import SampleRequest
from ldmkit.serve.audit import Audit
from ldmkit.serve.auth import Keys
from ldmkit.serve.loras import prompt_loras
from ldmkit.serve.schemas import FieldError, api_models, decode_image
from ldmkit.serve.store import open_store
from tests.pipelines.test_batching_loras import random_lora
from tests.serve_helpers import LiveServer, b64_png, finished, pixels

STEPS = 2


@pytest.fixture(scope="module")
def ldm(tiny_text_ldm):
    return LatentDiffusion.load(tiny_text_ldm)


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_text_ldm, ldm):
    root = tmp_path_factory.mktemp("loras")
    random_lora(ldm.unet, root / "ink.safetensors", 1)
    random_lora(ldm.unet, root / "styles" / "toy.safetensors", 2, "attn")
    (root.parent / "outside.safetensors").write_bytes((root / "ink.safetensors").read_bytes())
    db = tmp_path_factory.mktemp("serve") / "ldmkit.db"
    server = LiveServer(
        db,
        models=(str(tiny_text_ldm),),
        watermark=False,  # images compared bit for bit with the library's
        max_wait_ms=1500,  # long enough for the four requests of the batching test to meet
        timeout_s=3600,
        loras=str(root),
        lora_roles=("user:styles/*",),
    )
    keys = Keys(open_store(str(db)))
    server.keys = {role: keys.create(f"{role}-key", role)[0] for role in ("user", "admin")}
    server.db, server.folder = db, LoRAFolder(root)
    yield server
    server.close()


def alone(ldm, folder, prompt: str, seed: int, cfg: float, loras: list[tuple[str, float]], init=None) -> bytes:
    """The PNG pixels of the request alone, its LoRAs found in the folder as the server finds them; init: (a base64
    image, strength) for an img2img of it, the image decoded as the server decodes it."""
    specs = folder.resolve(ldm, [LoRASpec("", s, n) for n, s in loras])
    req = SampleRequest(n=1, prompts=[prompt], steps=STEPS, seed=seed, cfg=cfg, loras=specs)
    if init is None:
        image = generate_together(ldm, [req])[0][0]
    else:
        x = decode_image("init_images", init[0], ldm.ae_config.in_channels, 1 << 20)  # (1, C, H, W)
        image = img2img(ldm, x, req, init[1])[0][0]
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return pixels(buf.getvalue())


def test_the_a1111_prompt_syntax_is_taken_out_of_the_prompt():
    assert prompt_loras("a cat <lora:ink:0.8>, <lora:styles/toy> at night") == (
        "a cat, at night",
        [{"name": "ink", "scale": 0.8}, {"name": "styles/toy", "scale": 1.0}],
    )
    assert prompt_loras("<lora:ink:-1.5>") == ("", [{"name": "ink", "scale": -1.5}])
    for bad in ("<lora::1>", "<lora:ink:strong>"):
        with pytest.raises(FieldError, match="lora"):
            prompt_loras(bad)


def test_the_loras_listed_are_those_the_role_may_apply(live):
    names = lambda role: [x["name"] for x in live.client(live.keys[role]).get("/sdapi/v1/loras").json()]  # noqa: E731
    assert names("admin") == ["ink", "styles/toy"]
    assert names("user") == ["styles/toy"]


def test_different_loras_share_one_batch_and_each_image_is_its_alone_image(live, ldm):
    admin = live.client(live.keys["admin"])
    model = next(iter(live.service.models))
    base = {"n": 1, "steps": STEPS, "model": model}

    def openai(prompt, seed, cfg, loras):
        body = base | {"prompt": prompt, "seed": seed, "cfg": cfg, "loras": [{"name": n, "scale": s} for n, s in loras]}
        return admin.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]

    def a1111(prompt, seed, cfg, loras):
        tags = " ".join(f"<lora:{n}:{s}>" for n, s in loras)
        body = {"prompt": f"{prompt} {tags}", "steps": STEPS, "seed": seed, "cfg_scale": cfg, "model": model}
        answer = admin.post("/sdapi/v1/txt2img", json=body).json()
        assert json.loads(answer["info"])["prompt"] == prompt
        return answer["images"][0]

    asks = [
        (openai, "red", 5, 3.0, [("ink", 0.8)]),
        (openai, "red", 5, 3.0, []),
        (a1111, "blue", 9, 4.0, [("styles/toy", -0.5), ("ink", 0.3)]),
        (openai, "green", 2, 2.0, [("styles/toy", 1.0)]),
    ]
    before = live.service.metrics.batch._sum.get()
    count = lambda: [s for s in live.service.metrics.batch.collect()[0].samples if s.name.endswith("_count")][0].value  # noqa: E731
    batches = count()
    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        got = list(pool.map(lambda a: a[0](*a[1:]), asks))
    assert live.service.metrics.batch._sum.get() - before == len(asks)
    assert count() - batches < len(asks), "requests with different LoRAs shared a batch"
    for (_, prompt, seed, cfg, loras), b64 in zip(asks, got):
        assert pixels(b64) == alone(ldm, live.folder, prompt, seed, cfg, loras), loras
    assert pixels(got[0]) != pixels(got[1]), "the LoRA changes the image of the same seed"

    rows = Audit(open_store(str(live.db))).tail(20)
    mine = [r for r in rows if r["decision"] == "served" and (r["params"] or {}).get("loras")]
    ink = next(r for r in mine if r["params"]["loras"] == [{"name": "ink", "sha256": _sha(live, "ink"), "scale": 0.8}])
    assert ink["params"]["prompts"] == ["red"]
    assert str(live.folder.root) not in json.dumps(rows), "no server path in the records"


def _sha(live, name: str) -> str:
    return hashlib.sha256(live.folder.path(name).read_bytes()).hexdigest()


def test_a_native_job_applies_its_loras(live, ldm):
    admin = live.client(live.keys["admin"])
    model = next(iter(live.service.models))
    body = {"prompt": "tree", "n": 1, "steps": STEPS, "seed": 4, "cfg": 3.0, "model": model}
    job = admin.post("/v1/jobs", json=body | {"loras": [{"name": "ink", "scale": -1.0}]}).json()
    view = finished(admin, job["id"])
    assert view["status"] == "done", view
    assert view["params"]["loras"] == [{"name": "ink", "sha256": _sha(live, "ink"), "scale": -1.0}]
    assert pixels(view["images"][0]) == alone(ldm, live.folder, "tree", 4, 3.0, [("ink", -1.0)])


def test_bodies_without_loras_are_dumped_without_serializer_warnings(live, recwarn):
    """The table's default for loras is `()`; the bodies declare a list, so a body that left loras out warned
    PydanticSerializationUnexpectedValue on every native job (and wherever a body is dumped whole)."""
    models = api_models()
    for body in (models.JobRequest(), models.VideoRequest(), models.OpenAIImageRequest()):
        assert body.model_dump()["loras"] == []
    user = live.client(live.keys["user"])
    job = user.post("/v1/jobs", json={"prompt": "tree", "n": 1, "steps": STEPS, "seed": 4}).json()
    assert finished(user, job["id"])["status"] == "done"
    assert not [str(w.message) for w in recwarn if "PydanticSerializationUnexpectedValue" in str(w.message)]


def test_a1111_img2img_applies_the_prompt_loras(live, ldm):
    admin, user = live.client(live.keys["admin"]), live.client(live.keys["user"])
    init = b64_png(np.linspace(0, 255, 256).astype(np.uint8).reshape(16, 16))
    body = {"init_images": [init], "denoising_strength": 0.7, "steps": STEPS, "seed": 6, "cfg_scale": 3.0}

    def edit(client, prompt):
        r = client.post("/sdapi/v1/img2img", json=body | {"prompt": prompt})
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["info"])["prompt"] == "dusk"
        return r.json()["images"][0]

    on, plain = edit(admin, "dusk <lora:ink:0.8>"), edit(admin, "dusk")
    assert pixels(on) != pixels(plain), "the LoRA changes the edit of the same seed"
    assert pixels(on) == alone(ldm, live.folder, "dusk", 6, 3.0, [("ink", 0.8)], (init, 0.7))
    assert pixels(plain) == alone(ldm, live.folder, "dusk", 6, 3.0, [], (init, 0.7))
    digest = hashlib.sha256(base64.b64decode(on)).hexdigest()
    row = next(r for r in Audit(open_store(str(live.db))).tail(5) if digest in (r["outputs"] or []))
    assert row["route"] == "POST /sdapi/v1/img2img"
    assert row["params"]["loras"] == [{"name": "ink", "sha256": _sha(live, "ink"), "scale": 0.8}], row
    # a role's allow-list and the folder hold for edits too
    r = user.post("/sdapi/v1/img2img", json=body | {"prompt": "dusk <lora:ink:0.8>"})
    assert r.status_code == 403 and "'ink'" in r.text, r.text
    r = user.post("/sdapi/v1/img2img", json=body | {"prompt": "dusk <lora:../outside:1>"})
    assert r.status_code == 400 and "leaves the LoRA folder" in r.text, r.text
    assert edit(user, "dusk <lora:styles/toy:0.5>") != plain


@pytest.mark.parametrize(
    "loras, status, says",
    [
        ([{"name": "../outside"}], 400, "'../outside' leaves the LoRA folder"),
        ([{"name": "/etc/passwd"}], 400, "leaves the LoRA folder"),
        ([{"name": "nope"}], 400, "'nope' is not in this server's LoRA folder"),
        ([{"name": "ink", "scale": "1e400"}], 400, "loras"),
        ([{"name": "ink"}, {"name": "ink", "scale": 2}], 400, "twice"),
        ([{"name": "ink", "weight": 1}], 400, "loras"),
    ],
)
def test_bad_loras_are_refused_naming_them(live, loras, status, says):
    body = {"prompt": "x", "n": 1, "steps": STEPS, "loras": loras}
    text = json.dumps(body).replace('"1e400"', "1e400")  # a number JSON reads as infinity
    r = live.client(live.keys["admin"]).post("/v1/images/generations", content=text)
    assert r.status_code == status, r.text
    assert says in r.text and r.json()["error"]["param"].startswith("loras"), r.text


def test_a_role_uses_only_its_allow_list(live):
    user = live.client(live.keys["user"])
    r = user.post("/sdapi/v1/txt2img", json={"prompt": "x <lora:ink:1>", "steps": STEPS})
    assert r.status_code == 403 and "'ink'" in r.text and "styles/*" in r.text
    r = user.post("/sdapi/v1/txt2img", json={"prompt": "x <lora:../outside:1>", "steps": STEPS})
    assert r.status_code == 400 and "leaves the LoRA folder" in r.text
    ok = user.post("/sdapi/v1/txt2img", json={"prompt": "x <lora:styles/toy:0.5>", "steps": STEPS})
    assert ok.status_code == 200, ok.text
