"""A served consistency-distilled model (issue 34): an LCM-LoRA served as a model of its own samples with its own
sampler, steps and guidance (lcm, its steps, cfg 1) wherever a request leaves them out, on every image route, and
keeps what a request gives; more LCM steps than useful are allowed, with a note where the API has a place for one; a
plain model keeps the APIs' defaults. serve.precision: the sampling precision of every request, refused at start
where bf16 is not native, batch-invariant in bf16 too."""

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from ldmkit import config, runtime
from ldmkit.cli import main
from ldmkit.config import ServeConfig, ServeRun
from ldmkit.data.images import to_pil
from ldmkit.errors import InputError
from ldmkit.ldm import LatentDiffusion
from ldmkit.pipelines.batching import generate_together
from ldmkit.pipelines.request import SampleRequest
from ldmkit.serve.audit import Audit
from ldmkit.serve.server import build
from ldmkit.serve.store import open_store
from ldmkit.training import runs
from tests.conftest import TensorDataset
from tests.serve.test_serve_web import CHROMIUM
from tests.serve_helpers import LiveServer, b64_png, finished, pixels
from tests.training.test_distill import distill_run

DISTILLED = {"sampler": "lcm", "steps": 2, "cfg": 1.0}  # distill_run's student: 2 LCM steps, guidance folded in


@pytest.fixture(scope="module")
def lcm_lora(tmp_path_factory, tiny_ldm):
    """An LCM-LoRA of tiny_ldm after one training step: a file that names its base and its 2 distilled steps."""
    images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    data = TensorDataset(images, torch.arange(8) % 2, class_names=["top-left", "bottom-right"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runs, "_datasets", lambda cfg, holdout: (data, None))
        run = distill_run(tiny_ldm, steps=1, lora=4)
        return runs.train_denoiser(run, tmp_path_factory.mktemp("lcm"), progress=False)["checkpoint"]


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_ldm, lcm_lora):
    db = tmp_path_factory.mktemp("serve") / "ldmkit.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runtime, "native_bf16", lambda device: False)  # precision auto samples in float32 here
        server = LiveServer(db, models=(lcm_lora, str(tiny_ldm)), no_auth=True, precision="auto", timeout_s=3600)
        server.db = db
        server.lcm, server.plain = list(server.service.models)
        yield server
        server.close()


def audited(live, request_id: str) -> dict:
    """The parameters the audit row of `request_id` records."""
    return next(r["params"] for r in Audit(open_store(str(live.db))).tail(50) if r["request_id"] == request_id)


def sampling(params: dict) -> dict:
    return {k: params[k] for k in ("sampler", "steps", "cfg")}


def test_models_say_what_they_sample_with(live):
    with live.client() as c:
        listed = {m["id"]: m["sampling"] for m in c.get("/v1/models").json()["data"]}
    assert listed == {live.lcm: DISTILLED, live.plain: {}}
    assert live.service.models[live.lcm].path.name == "lora.safetensors"  # the LoRA, served as a model


def test_openai_requests_take_the_models_own_settings_unless_they_give_theirs(live):
    with live.client() as c:
        own = c.post("/v1/images/generations", json={"model": live.lcm, "seed": 1})
        given = c.post("/v1/images/generations", json={"model": live.lcm, "seed": 1, "steps": 3})
        plain = c.post("/v1/images/generations", json={"model": live.plain, "seed": 1})
    assert own.status_code == given.status_code == plain.status_code == 200, own.text + given.text + plain.text
    assert sampling(audited(live, own.headers["x-request-id"])) == DISTILLED
    assert sampling(audited(live, given.headers["x-request-id"])) == DISTILLED | {"steps": 3}  # the rest: the model's
    assert sampling(audited(live, plain.headers["x-request-id"])) == {"sampler": "dpmpp_2m", "steps": 25, "cfg": 5.0}
    assert audited(live, own.headers["x-request-id"])["precision"] == "auto"  # the server's, on every request
    assert "notes" not in own.json()  # OpenAI's shape gets no field of ours


def test_a1111_txt2img_and_img2img_take_the_models_own_settings_and_note_many_lcm_steps(live):
    image = b64_png(np.full((16, 16), 200, np.uint8))
    with live.client() as c:
        txt = c.post("/sdapi/v1/txt2img", json={"model": live.lcm, "seed": 1})
        img = c.post("/sdapi/v1/img2img", json={"model": live.lcm, "seed": 1, "init_images": [image]})
        many = c.post("/sdapi/v1/txt2img", json={"model": live.lcm, "seed": 1, "steps": 12})
        plain = c.post("/sdapi/v1/txt2img", json={"model": live.plain, "seed": 1})
    for r in (txt, img, many, plain):
        assert r.status_code == 200, r.text
    for r in (txt, img):
        info = json.loads(r.json()["info"])
        assert (info["sampler_name"], info["steps"], info["cfg_scale"], info["notes"]) == ("LCM", 2, 1.0, [])
        assert sampling(audited(live, r.headers["x-request-id"])) == DISTILLED
    info = json.loads(many.json()["info"])
    assert info["steps"] == 12 and info["sampler_name"] == "LCM"  # allowed: the steps asked for
    assert len(info["notes"]) == 1 and "12 LCM steps" in info["notes"][0] and "(steps 4 is usual)" in info["notes"][0]
    info = json.loads(plain.json()["info"])
    assert (info["sampler_name"], info["steps"], info["cfg_scale"]) == ("DPM++ 2M", 20, 7.0)  # A1111's defaults


def test_native_jobs_take_the_models_own_settings_and_note_many_lcm_steps(live):
    with live.client() as c:
        own = c.post("/v1/jobs", json={"model": live.lcm, "seed": 2})
        many = c.post("/v1/jobs", json={"model": live.lcm, "seed": 2, "steps": 9, "cfg": 2.0})
        plain = c.post("/v1/jobs", json={"model": live.plain, "seed": 2, "sampler": "euler"})
        assert own.status_code == many.status_code == plain.status_code == 202, own.text + many.text + plain.text
        views = [finished(c, r.json()["id"]) for r in (own, many, plain)]
    assert "notes" not in own.json() and "9 LCM steps" in many.json()["notes"][0]
    assert [v["status"] for v in views] == ["done"] * 3, views
    assert sampling(views[0]["params"]) == DISTILLED
    assert sampling(views[1]["params"]) == {"sampler": "lcm", "steps": 9, "cfg": 2.0}
    assert sampling(views[2]["params"]) == {"sampler": "euler", "steps": 25, "cfg": 5.0}
    assert sampling(audited(live, views[0]["id"])) == DISTILLED


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason="the page test drives Debian's chromium")
def test_the_web_page_offers_a_distilled_models_own_settings(live):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the web page test needs playwright")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(live.url + "/")
            page.fill("#key", "any")  # the server takes no keys
            page.click("#login")
            page.wait_for_selector(f"#model option[value='{live.plain}']", state="attached")
            shown = {}
            for model in (live.lcm, live.plain):
                page.select_option("#model", model)
                shown[model] = [page.input_value(f"#{i}") for i in ("sampler", "steps", "cfg")]
        finally:
            browser.close()
    assert shown == {live.lcm: ["lcm", "2", "1"], live.plain: ["dpmpp_2m", "25", "5"]}


def test_bf16_serving_without_native_bf16_is_refused_at_start_in_one_line(tmp_path, tiny_ldm, monkeypatch, capsys):
    assert config.SAMPLING_PRECISIONS == runtime.SAMPLING_PRECISIONS  # serve.precision takes --precision's values
    assert config.BACKENDS == runtime.BACKENDS  # serve.backend takes --backend's
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    run = ServeRun(serve=ServeConfig(models=(str(tiny_ldm),), database=str(tmp_path / "db"), precision="bf16"))
    with pytest.raises(InputError, match="--precision bf16: this CPU has neither AVX-512 BF16 nor AMX"):
        build(run, no_auth=True)
    args = ["serve", "--model", str(tiny_ldm), "--database", str(tmp_path / "db"), "--precision", "bf16"]
    assert main(args) not in (0, None)
    err = capsys.readouterr().err.strip()
    assert "--precision bf16" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "db").exists()  # refused before the store opens or a model loads


@pytest.mark.skipif(not runtime.native_bf16(torch.device("cpu")), reason="this CPU has neither AVX-512 BF16 nor AMX")
@pytest.mark.slow  # a bf16 server's warm-up, two jobs and two library images: minutes on a loaded 2-core machine
def test_a_bf16_server_samples_every_request_in_bf16_and_batching_changes_no_bit(tmp_path, tiny_ldm):
    server = LiveServer(tmp_path / "db", models=(str(tiny_ldm),), no_auth=True, precision="bf16", watermark=False)
    try:
        assert server.service.invariance["holds"]  # measured under bf16 autocast
        body = {"labels": [0], "steps": 2, "seed": 5}
        with server.client() as c:
            ids = [c.post("/v1/jobs", json=body | {"n": n}).json()["id"] for n in (1, 2)]
            views = [finished(c, i) for i in ids]
    finally:
        server.close()
    assert [v["params"]["precision"] for v in views] == ["bf16", "bf16"]
    alone, batched = (pixels(v["images"][0]) for v in views)
    assert alone == batched  # image 0 of seed 5 is the same alone or beside another
    ldm = LatentDiffusion.load(tiny_ldm)
    req = SampleRequest(n=1, labels=[0], steps=2, seed=5, cfg=5.0, precision="bf16")
    library = [to_pil(generate_together(ldm, [r])[0][0]).tobytes() for r in (req, replace(req, precision="fp32"))]
    assert library[0] == alone and library[1] != alone  # the library's bf16 image; autocast acts


def test_a_server_without_models_serves_the_shipped_models_but_not_the_upscaler_or_the_style_loras(
    tmp_path, monkeypatch
):
    from ldmkit.serve.models import default_models
    from ldmkit.shipped import SHIPPED, STYLE_LORAS

    for name in SHIPPED:
        (tmp_path / f"{name}.safetensors").write_bytes(b"")
    monkeypatch.setenv("LDMKIT_WEIGHTS", str(tmp_path))
    served = default_models()
    assert "emoji" in served and "fashion-mnist-lcm" in served  # an LCM-LoRA is a model of its own
    assert "emoji-upscale" not in served and not set(STYLE_LORAS) & set(served)
    assert set(served) | set(STYLE_LORAS) | {"emoji-upscale"} == set(SHIPPED)
