"""serve.backend = openvino: generations run on OpenVINO (exported at start), LoRAs included, each image the
library's OpenVINO image alone or batched; a request of another size runs in torch; a server that cannot run
OpenVINO is refused at start in one line."""

import importlib.util
import io
import sys
from dataclasses import replace

import pytest

from ldmkit.config import ServeConfig, ServeRun
from ldmkit.data.images import to_pil
from ldmkit.errors import InputError
from ldmkit.ldm import LatentDiffusion
from ldmkit.pipelines.batching import generate_together
from ldmkit.pipelines.lora import LoRAFolder, LoRASpec
from ldmkit.pipelines.request import SampleRequest
from ldmkit.serve.server import build
from tests.pipelines.test_batching_loras import random_lora
from tests.serve_helpers import LiveServer, finished, pixels

if importlib.util.find_spec("openvino") is None:  # not imported here: ldmkit imports it without usage reports
    pytest.skip("the openvino extra is not installed", allow_module_level=True)


def library(ldm, req: SampleRequest) -> bytes:
    """The PNG pixels of the request alone, drawn by the library."""
    buf = io.BytesIO()
    to_pil(generate_together(ldm, [req])[0][0]).save(buf, format="PNG")
    return pixels(buf.getvalue())


def test_requests_run_on_openvino_loras_included_and_other_sizes_in_torch(tmp_path, tiny_text_ldm, monkeypatch):
    monkeypatch.setenv("LDMKIT_CACHE", str(tmp_path / "cache"))
    ldm = LatentDiffusion.load(tiny_text_ldm)
    random_lora(ldm.unet, tmp_path / "loras" / "ink.safetensors", 1)
    random_lora(ldm.unet, tmp_path / "loras" / "toy.safetensors", 2)
    server = LiveServer(
        tmp_path / "db",
        models=(str(tiny_text_ldm),),
        no_auth=True,
        watermark=False,
        backend="openvino",
        loras=str(tmp_path / "loras"),
        max_wait_ms=500,
    )
    try:
        assert list((tmp_path / "cache" / "openvino").iterdir())  # exported by the warm-up, before any request
        body = {"prompt": "a b", "steps": 2, "seed": 5, "cfg": 3.0}
        with server.client() as c:
            ids = [c.post("/v1/jobs", json=body | {"n": n}).json()["id"] for n in (1, 2)]
            ids.append(c.post("/v1/jobs", json=body | {"n": 1, "loras": [{"name": "ink", "scale": 0.8}]}).json()["id"])
            ids.append(c.post("/v1/jobs", json=body | {"n": 1, "width": 24}).json()["id"])  # another size: torch
            two = [{"name": "ink", "scale": 0.8}, {"name": "toy", "scale": 0.5}]  # a LoRA combination: torch
            ids.append(c.post("/v1/jobs", json=body | {"n": 1, "loras": two}).json()["id"])
            views = [finished(c, i) for i in ids]
    finally:
        server.close()
    assert [v["params"].get("backend") for v in views] == ["openvino"] * 3 + [None, None]  # torch records none
    assert len(list((tmp_path / "cache" / "openvino").iterdir())) == 2  # the model's own size; with ink, without
    alone, batched, lora, _, _ = (pixels(v["images"][0]) for v in views)
    assert alone == batched  # image 0 of seed 5, alone or beside another
    req = SampleRequest(n=1, prompts=["a b"], steps=2, seed=5, cfg=3.0, backend="openvino")
    assert library(ldm, req) == alone
    ink = LoRAFolder(tmp_path / "loras").resolve(ldm, [LoRASpec("", 0.8, "ink")])
    assert library(ldm, replace(req, loras=ink)) == lora and lora != alone


def test_a_server_that_cannot_run_openvino_is_refused_at_start(tmp_path, tiny_ldm, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    run = ServeRun(serve=ServeConfig(models=(str(tiny_ldm),), database=str(tmp_path / "db"), backend="openvino"))
    with pytest.raises(InputError, match=r"pip install 'ldmkit\[openvino\]'"):
        build(run, no_auth=True)
    assert not (tmp_path / "db").exists()  # before the store opens or a model loads
