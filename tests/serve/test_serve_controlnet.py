"""ControlNets on a live server in the shape of AUTOMATIC1111's ControlNet extension: alwayson_scripts.controlnet
units on /sdapi/v1/txt2img and img2img, /controlnet/model_list and /controlnet/module_list, ControlNets from the
server's folder only, refusals naming the unit's field, the audit row naming each ControlNet's SHA-256, and
controlled requests batched with others, each image the one it gets alone."""

import base64
import concurrent.futures
import hashlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.checkpoint import file_sha256
from ldmkit.data.images import to_pil
from ldmkit.denoisers.controlnet import Control, ControlNet, save_controlnet
from ldmkit.ldm import LatentDiffusion
from ldmkit.pipelines.batching import generate_together
from ldmkit.pipelines.control import controlled
from ldmkit.pipelines.request import SampleRequest
from ldmkit.serve.audit import Audit
from ldmkit.serve.auth import Keys
from ldmkit.serve.store import open_store
from tests.serve_helpers import LiveServer, b64_png, finished, pixels

STEPS = 2


def random_controlnet(ldm, path, seed):
    net = ControlNet.from_unet(ldm.unet, ldm.factor)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_controlnet(path, net, condition="raw")
    return net


EDGES = np.zeros((16, 16, 3), np.uint8)
EDGES[2:14, 5] = 255
EDGES[8, 3:13] = 200


@pytest.fixture(scope="module")
def ldm(tiny_text_ldm):
    return LatentDiffusion.load(tiny_text_ldm)


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_text_ldm, tiny_ldm, ldm):
    root = tmp_path_factory.mktemp("controlnets")
    random_controlnet(ldm, root / "edges.safetensors", 1)
    random_controlnet(ldm, root / "colour.safetensors", 3)
    random_controlnet(LatentDiffusion.load(tiny_ldm), root / "other" / "labels.safetensors", 2)
    (root.parent / "outside.safetensors").write_bytes((root / "edges.safetensors").read_bytes())
    db = tmp_path_factory.mktemp("serve") / "ldmkit.db"
    server = LiveServer(db, models=(str(tiny_text_ldm),), watermark=False, timeout_s=3600, controlnets=str(root))
    server.key = Keys(open_store(str(db))).create("user-key", "user")[0]
    server.db, server.root = db, root
    yield server
    server.close()


def unit(**kw):
    return {"image": b64_png(EDGES), "module": "none", "model": "edges", "weight": 0.8} | kw


def txt2img(live, *units, **body):
    body = {"prompt": "red", "steps": STEPS, "seed": 5, "cfg_scale": 3.0} | body
    if units:
        body["alwayson_scripts"] = {"controlnet": {"args": list(units)}}
    return live.client(live.key).post("/sdapi/v1/txt2img", json=body)


def test_the_lists_answer_as_the_extension_does(live):
    client = live.client(live.key)
    sha = file_sha256(live.root / "edges.safetensors")
    assert client.get("/controlnet/model_list").json() == {
        "model_list": [
            f"colour [{file_sha256(live.root / 'colour.safetensors')[:8]}]",
            f"edges [{sha[:8]}]",
            f"other/labels [{file_sha256(live.root / 'other/labels.safetensors')[:8]}]",
        ]
    }
    assert client.get("/controlnet/module_list").json()["module_list"][:2] == ["none", "canny"]


def test_a_unit_steers_txt2img_as_the_library_does_and_is_audited(live, ldm):
    plain, on = txt2img(live), txt2img(live, unit(guidance_end=0.5))
    assert plain.status_code == on.status_code == 200, on.text
    assert pixels(on.json()["images"][0]) != pixels(plain.json()["images"][0]), "the ControlNet changes the image"
    assert "alwayson_scripts" not in on.json()["info"]  # used, so not among the ignored fields

    # the library, with the same ControlNet, condition image, weight and window
    net = random_controlnet(ldm, live.root.parent / "copy.safetensors", 1)  # the same weights as "edges"
    cond = torch.from_numpy(EDGES).permute(2, 0, 1)[None].float() / 255
    req = SampleRequest(n=1, prompts=["red"], steps=STEPS, seed=5, cfg=3.0)
    with controlled(ldm, [Control(net.eval(), cond, 0.8, 0.0, 0.5)], STEPS):
        want = generate_together(ldm, [req])[0][0]
    buf = io.BytesIO()
    to_pil(want).save(buf, format="PNG")
    assert pixels(on.json()["images"][0]) == pixels(buf.getvalue())
    assert ldm.denoiser.backbone is ldm.unet, "the model is left as it was"

    # a disabled unit is no unit, bit for bit
    off = txt2img(live, unit(enabled=False))
    assert pixels(off.json()["images"][0]) == pixels(plain.json()["images"][0])

    rows = Audit(open_store(str(live.db))).tail(10)
    row = next(r for r in rows if r["decision"] == "served" and (r["params"] or {}).get("controls"))
    (c,) = row["params"]["controls"]
    assert c["model"] == "edges" and c["sha256"] == file_sha256(live.root / "edges.safetensors")
    assert (c["weight"], c["guidance_start"], c["guidance_end"]) == (0.8, 0.0, 0.5)
    assert c["image_sha256"] == hashlib.sha256(base64.b64decode(unit()["image"])).hexdigest()
    assert str(live.root) not in str(row), "no server path in the record"


@pytest.mark.parametrize(
    "bad, field, says",
    [
        ({"module": "depth_leres"}, "module", "'depth_leres' is not available"),
        ({"model": "nope"}, "model", "'nope' is not in this server's folder"),
        ({"model": "../outside"}, "model", "is not in this server's folder"),
        ({"model": "edges [deadbeef]"}, "model", "another version"),
        ({"model": "other/labels"}, "model", "made for another denoiser"),
        ({"guidance_start": 0.7, "guidance_end": 0.2}, "guidance_start", "not before"),
        ({"weight": -1}, "weight", "weight -1.0"),
        ({"image": b64_png(np.zeros((16, 40, 3), np.uint8))}, "image", "aspect ratio"),
        ({"image": "not an image"}, "image", "not a base64-encoded"),
    ],
)
def test_bad_units_are_refused_naming_the_field(live, bad, field, says):
    r = txt2img(live, unit(), unit(**bad))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == f"alwayson_scripts.controlnet.args[1].{field}", r.text
    assert says in r.text


def control(**kw):
    """A native job's control: the same ControlNet, image and weight as unit(), in --control's names."""
    return {"image": b64_png(EDGES), "kind": "raw", "model": "edges", "scale": 0.8} | kw


def job(live, *controls, **body):
    body = {"prompt": "red", "steps": STEPS, "seed": 5, "cfg": 3.0, "sampler": "euler_ancestral"} | body
    text = json.dumps(body | {"controls": list(controls)})  # NaN as the JSON extension writes it
    return live.client(live.key).post("/v1/jobs", content=text, headers={"Content-Type": "application/json"})


def test_a_native_job_with_controls_equals_the_a1111_image_and_is_audited(live):
    queued = job(live, control(end=0.5))
    assert queued.status_code == 202, queued.text
    view = finished(live.client(live.key), queued.json()["id"])
    assert view["status"] == "done", view
    a1111 = txt2img(live, unit(guidance_end=0.5), sampler_name="Euler a")
    assert pixels(view["images"][0]) == pixels(a1111.json()["images"][0])
    plain = txt2img(live, sampler_name="Euler a")
    assert pixels(view["images"][0]) != pixels(plain.json()["images"][0]), "the control changes the image"

    want = {
        "model": "edges",
        "sha256": file_sha256(live.root / "edges.safetensors"),
        "kind": "raw",
        "scale": 0.8,
        "start": 0.0,
        "end": 0.5,
        "image_sha256": hashlib.sha256(base64.b64decode(control()["image"])).hexdigest(),
    }
    assert view["params"]["controls"] == [want]
    rows = Audit(open_store(str(live.db))).tail(10)
    row = next(r for r in rows if r["request_id"] == view["id"])  # the job's own row, written when it ended
    assert row["decision"] == "served" and row["params"]["controls"] == [want]
    assert str(live.root) not in str(row), "no server path in the record"


@pytest.mark.parametrize(
    "bad, field, says",
    [
        ({"model": "nope"}, "controls[1].model", "'nope' is not in this server's folder"),
        ({"model": "other/labels"}, "controls[1].model", "made for another denoiser"),
        ({"kind": "none"}, "controls[1].kind", "use one of: canny, mask, colour, raw"),
        ({"image": "bm90IGFuIGltYWdl"}, "controls[1].image", "not a base64-encoded"),
        ({"image": "%%%"}, "controls[1].image", "not a base64-encoded"),
        ({"image": b64_png(np.zeros((1100, 1100, 3), np.uint8))}, "controls[1].image", "limit is 1024 pixels"),
        ({"scale": float("nan")}, "controls.1.scale", "not a finite number"),
        ({"scale": -1}, "controls[1].scale", "the scale -1.0"),
        ({"start": 0.7, "end": 0.2}, "controls[1].start", "not before"),
        ({"weight": 1.0}, "controls[1]", "not weight"),
    ],
)
def test_bad_native_controls_are_refused_naming_the_field(live, bad, field, says):
    r = job(live, control(), control(**bad))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field, r.text
    assert says in r.text, r.text


def test_img2img_inpainting_with_a_unit_keeps_the_unmasked_pixels(live):
    init = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)  # the tiny model is greyscale
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    body = {"prompt": "red", "steps": STEPS, "seed": 3, "init_images": [b64_png(init)], "mask": b64_png(mask)}
    body["alwayson_scripts"] = {"controlnet": {"args": [unit()]}}
    r = live.client(live.key).post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    with Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))) as im:
        out = np.asarray(im.convert("L"))
    kept = mask == 0
    assert np.array_equal(out[kept], init[kept]) and not np.array_equal(out[~kept], init[~kept])


def test_an_img2img_units_controlnet_passes_count_in_its_cost(live, monkeypatch):
    """The scheduler estimates a job from its units of work; an img2img edit with a unit carries the unit's
    ControlNet, so its ControlNet passes count (they were left out, and a controlled edit could be admitted past its
    time limit)."""
    seen = []
    real = live.service.scheduler.submit
    monkeypatch.setattr(live.service.scheduler, "submit", lambda job: (seen.append(job), real(job))[1])
    init = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    body = {"prompt": "red", "steps": STEPS, "seed": 3, "init_images": [b64_png(init)], "denoising_strength": 0.5}
    plain = live.client(live.key).post("/sdapi/v1/img2img", json=body)
    body["alwayson_scripts"] = {"controlnet": {"args": [unit(), unit(model="colour")]}}
    steered = live.client(live.key).post("/sdapi/v1/img2img", json=body)
    assert plain.status_code == 200 and steered.status_code == 200, steered.text
    assert [len(j.controls) for j in seen] == [0, 2]
    assert seen[1].units > seen[0].units > 0
    rid = steered.headers["X-Request-Id"]
    row = next(r for r in Audit(open_store(str(live.db))).tail(20) if r["request_id"] == rid)
    assert [c["model"] for c in row["params"]["controls"]] == ["edges", "colour"]  # recorded once, as before


def test_controlled_and_plain_requests_share_a_batch_and_each_image_is_its_alone_image(live):
    client = live.client(live.key)

    def served(ask):
        """(the image, the job's view or None) of an A1111 txt2img or a native job."""
        if ask[0] == "job":
            view = finished(client, job(live, *ask[1], **ask[2]).json()["id"])
            assert view["status"] == "done", view
            return view["images"][0], view
        r = txt2img(live, *ask[1], sampler_name="Euler a", **ask[2])
        assert r.status_code == 200, r.text
        return r.json()["images"][0], None

    asks = [
        ("a1111", [unit(guidance_end=0.5)], {}),
        ("a1111", [unit(model="colour", weight=1.2, guidance_start=0.5), unit(weight=0.4)], {"prompt": "blue"}),
        ("a1111", [], {"seed": 7}),
        ("job", [control(model="colour", scale=0.6, end=0.5)], {"seed": 8}),
    ]
    scheduler = live.service.scheduler
    before, scheduler.max_wait = scheduler.max_wait, 5.0  # long enough for the four requests to meet
    try:
        with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
            together = list(pool.map(served, asks))
    finally:
        scheduler.max_wait = before
    view = together[-1][1]
    assert live.service.jobs[view["id"]][0].batch_images == len(asks), "one batch: controlled, plain and the job"
    assert [(c["model"], c["scale"], c["end"]) for c in view["params"]["controls"]] == [("colour", 0.6, 0.5)]
    for ask, (image, _) in zip(asks, together):
        alone, _ = served(ask)  # a batch of its own
        assert pixels(image) == pixels(alone), ask
    assert pixels(together[0][0]) != pixels(served(("a1111", [], {}))[0]), "the control changes the image"

    rows = Audit(open_store(str(live.db))).tail(30)
    weights = lambda r: [(c["model"], c.get("weight", c.get("scale"))) for c in r["params"].get("controls", [])]  # noqa: E731
    recorded = [weights(r) for r in rows if r["params"] and r["decision"] == "served"]
    assert [("colour", 1.2), ("edges", 0.4)] in recorded and [("edges", 0.8)] in recorded
    assert [("colour", 0.6)] in recorded, "the job's own row"
