"""Bounded load against `ldmkit serve` over loopback: batching on against one request at a time.

    .venv/bin/python benchmarks/serve_load.py                     # emoji, 1 / 4 / 16 clients, 4 requests each
    .venv/bin/python benchmarks/serve_load.py --clients 1,4 --requests 2 --steps 4   # a quick run
    .venv/bin/python benchmarks/serve_load.py --backend openvino  # both servers with serve.backend = openvino
    .venv/bin/python benchmarks/serve_load.py --clients 1 --lora-clients 4 --requests 1 --steps 2 --kill-seconds 0
    .venv/bin/python benchmarks/serve_load.py --clients "" --lora-clients 0 --control-clients 3 --requests 1 \
        --steps 2 --kill-seconds 0                                # the ControlNet row alone, tiny

Each configuration starts its own `ldmkit serve` process with the shipped emoji model and a fresh database and
key. "batched" is the default server (max_batch 16, max_wait_ms 25); "one at a time" is the same server with
max_batch 1, so requests run one after another as in the popular UIs. Every client sends its requests one after
the other (n=1 image each, its own prompt and seed); the table reports images/s, p50 / p99 latency and errors
(anything but a 200 or an intended 429). Both modes must give every request the same image: its decoded pixels
are compared, not the PNG files, which embed each request's id and time and so always differ. Only
requests both servers answered are compared: under load each refuses some with a 429, not always the same ones.
The LoRA row: `--lora-clients` clients (16 by default) each apply one of 4 LoRAs (rank 4 on the attention layers,
random factors, written to a temporary serve.loras folder) at scale 0.8; batched, requests with different LoRAs
share forward passes, each LoRA applied per image, and every image must still equal the one-at-a-time server's.
The ControlNet row: `--control-clients` clients (16 by default) send A1111 txt2img requests; of every three, one
sends no unit and the others one unit each of 2 ControlNets (random weights, a written serve.controlnets folder)
at weight 0.8, the second acting on the first half of the steps only; batched, controlled and plain requests share
forward passes, and every image must still equal the one-at-a-time server's.
Last, the kill test (--kill-seconds 0 skips it): clients keep sending while the server is killed with SIGKILL;
every request that was answered must have its audit row (found by the X-Request-Id header), and `audit verify`
must pass.
Writes benchmarks/out/serve_load.json.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from common import default_out, write_json  # noqa: E402
from serve_helpers import free_port, kill_under_load, start_process  # noqa: E402

from ldmkit.serve.audit import Audit  # noqa: E402
from ldmkit.serve.auth import Keys  # noqa: E402
from ldmkit.serve.store import open_store  # noqa: E402

PROMPTS = ["red apple", "grinning face", "blue heart", "cat face", "sun", "thumbs up", "rocket", "pizza"]


def compare(batched: dict, alone: dict) -> tuple[int, list]:
    """(how many requests both servers answered, those of them whose decoded pixels differ). A request one server
    refused with a 429 is not compared: under load the two servers refuse different ones."""
    both = sorted(set(batched) & set(alone))
    return len(both), [k for k in both if not np.array_equal(batched[k], alone[k])]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))] if xs else float("nan")


def start(folder: Path, *settings: str) -> tuple[subprocess.Popen, str, str, Path]:
    db = folder / f"db-{len(list(folder.iterdir()))}.sqlite"
    secret, _ = Keys(open_store(str(db))).create("bench", "user")
    port = free_port()
    # watermarks differ per request, and the run compares the PNGs of both servers: both leave it off
    settings = ("serve.watermark=false", *settings)
    proc = start_process(
        db, port, "--model", "emoji", *(x for s in settings for x in ("--set", s)), threads=None, ready_s=600
    )
    return proc, f"http://127.0.0.1:{port}", secret, db


def decoded(png: bytes) -> np.ndarray:
    """A PNG's pixels (H, W[, C]) as int16, so that two can be subtracted: equal for the same image whatever its
    metadata."""
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im, dtype=np.int16)


def make_loras(folder: Path, count: int = 4) -> list[str]:
    """`count` LoRAs for the emoji model (rank 4, attention layers, random factors) in `folder`; their names."""
    import torch

    from ldmkit.adapters import save_lora, target_paths
    from ldmkit.ldm import LatentDiffusion
    from ldmkit.nn.lora import LoRASet
    from ldmkit.shipped import resolve_model

    unet = LatentDiffusion.load(resolve_model("emoji")).unet
    names = []
    for k in range(count):
        lora = LoRASet.for_modules(unet, target_paths(unet, "attn"), 4)
        g = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for _, m in lora.items():
                m.up.copy_(0.05 * torch.randn(m.up.shape, generator=g))
        save_lora(folder / f"style{k}.safetensors", lora, unet)
        names.append(f"style{k}")
    return names


def make_controlnets(folder: Path, count: int = 2) -> tuple[list[str], str]:
    """`count` ControlNets for the emoji model (random weights, raw conditions) in `folder`: (their names, a
    base64 PNG condition image at the model's size)."""
    import numpy as np
    import torch

    from ldmkit.denoisers.controlnet import ControlNet, save_controlnet
    from ldmkit.ldm import LatentDiffusion
    from ldmkit.pipelines.plan import resolution
    from ldmkit.pipelines.request import SampleRequest
    from ldmkit.shipped import resolve_model

    ldm = LatentDiffusion.load(resolve_model("emoji"))
    names = []
    for k in range(count):
        net = ControlNet.from_unet(ldm.unet, ldm.factor)
        g = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        save_controlnet(folder / f"control{k}.safetensors", net, condition="raw")
        names.append(f"control{k}")
    h, w = resolution(ldm, SampleRequest())
    image = np.zeros((h, w, 3), np.uint8)
    image[h // 4 : 3 * h // 4, w // 2 - 1 : w // 2 + 1] = 255  # a bar
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return names, base64.b64encode(buf.getvalue()).decode()


def ask(c: int, i: int, steps: int, loras: list[str] | None, controls: tuple[list[str], str] | None):
    """(route, body, the base64 image of its answer) of client c's request i: OpenAI's images route (with loras,
    client c applies loras[c % len(loras)] at scale 0.8), or with controls (names, condition image) A1111's
    txt2img, where client c sends no unit when c % 3 == 0 and else one of ControlNet (c % 3 - 1) at weight 0.8."""
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "steps": steps, "seed": 1000 + i, "model": "emoji"}
    if controls is None:
        if loras:
            body["loras"] = [{"name": loras[c % len(loras)], "scale": 0.8}]
        return "/v1/images/generations", body | {"n": 1}, lambda a: a["data"][0]["b64_json"]
    (names, image), which = controls, c % 3 - 1
    if which >= 0:
        unit = {"image": image, "module": "none", "model": names[which], "weight": 0.8}
        unit |= {"guidance_end": 0.5} if which else {}
        body["alwayson_scripts"] = {"controlnet": {"args": [unit]}}
    return "/sdapi/v1/txt2img", body | {"batch_size": 1}, lambda a: a["images"][0]


def warm(url: str, key: str, steps: int, loras: list[str]) -> None:
    """One untimed request with each LoRA: on an OpenVINO server each LoRA is an export made at its first request
    (seconds), which the timed load would otherwise pay in whichever mode runs first."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as http:
        for c in range(len(loras)):
            route, body, _ = ask(c, 10_000 + c, steps, loras, None)
            http.post(route, json=body).raise_for_status()


def load(
    url: str, key: str, clients: int, requests: int, steps: int, loras: list[str] | None = None, controls=None
) -> dict:
    """`clients` threads each sending `requests` requests in turn; latencies, errors and the images' pixels.
    loras, controls: as `ask` takes them."""
    latencies, errors, pixels, lock = [], [], {}, threading.Lock()

    def client(c: int):
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as http:
            for r in range(requests):
                i = c * requests + r
                route, body, image = ask(c, i, steps, loras, controls)
                t = time.perf_counter()
                resp = http.post(route, json=body)
                dt = time.perf_counter() - t
                with lock:
                    if resp.status_code == 200:
                        latencies.append(dt)
                        pixels[i] = decoded(base64.b64decode(image(resp.json())))
                    elif resp.status_code != 429:
                        errors.append(f"{resp.status_code}: {resp.text[:200]}")

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "images": len(latencies),
        "seconds": round(wall, 2),
        "images_per_s": round(len(latencies) / wall, 3),
        "p50_s": round(percentile(latencies, 0.5), 3),
        "p99_s": round(percentile(latencies, 0.99), 3),
        "errors": errors,
        "pixels": pixels,
    }


def kill_test(folder: Path, clients: int, steps: int, seconds: float) -> dict:
    """Clients send until the server is killed with SIGKILL; every answered request must have its audit row."""
    proc, url, key, db = start(folder)

    def body(c: int, i: int) -> dict:
        return {"prompt": PROMPTS[(c + i) % len(PROMPTS)], "steps": steps, "seed": i, "model": "emoji"}

    answered = kill_under_load(proc, url, key, clients, body, ready=lambda _: False, deadline_s=seconds)
    audit = Audit(open_store(str(db)))
    rows = {r["request_id"] for r in audit.tail(100_000)}
    missing = [r for r in answered if r not in rows]
    verdict = audit.verify()
    return {
        "answered": len(answered),
        "missing_audit_rows": len(missing),
        "audit_rows": len(rows),
        "verify_ok": verdict.ok,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lora-clients", type=int, default=16, help="clients of the LoRA row (4 LoRAs); 0 skips it")
    ap.add_argument(
        "--control-clients", type=int, default=16, help="clients of the ControlNet row (2 ControlNets); 0 skips it"
    )
    ap.add_argument("--kill-seconds", type=float, default=6.0, help="length of the kill test; 0 skips it")
    ap.add_argument(
        "--backend", default="torch", choices=("torch", "openvino"), help="both servers' serve.backend (default torch)"
    )
    ap.add_argument("--out", default=default_out("serve_load"))
    args = ap.parse_args()
    on = f"serve.backend={args.backend}"
    modes = {"batched": (on,), "one at a time": (on, "serve.max_batch=1", "serve.max_wait_ms=0")}
    rows, mismatched = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runs = [(int(c), None, None) for c in args.clients.split(",") if c]
        if args.lora_clients:
            (folder / "loras").mkdir()
            runs.append((args.lora_clients, make_loras(folder / "loras"), None))
        if args.control_clients:
            (folder / "controlnets").mkdir()
            runs.append((args.control_clients, None, make_controlnets(folder / "controlnets")))
        for clients, loras, controls in runs:
            got = {}
            for mode, settings in modes.items():
                extra = (f"serve.loras={folder / 'loras'}",) if loras else ()
                extra += (f"serve.controlnets={folder / 'controlnets'}",) if controls else ()
                proc, url, key, _ = start(folder, *settings, *extra)
                try:
                    if loras and args.backend == "openvino":
                        warm(url, key, args.steps, loras)
                    got[mode] = load(url, key, clients, args.requests, args.steps, loras, controls)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(60)
                label = f"{mode}, 4 LoRAs" if loras else f"{mode}, 2 ControlNets" if controls else mode
                rows.append({"mode": label, **{k: v for k, v in got[mode].items() if k != "pixels"}})
                print(f"{label:>28} {clients:>3} clients: {rows[-1]['images_per_s']:.2f} images/s", flush=True)
            b, o = got["batched"]["pixels"], got["one at a time"]["pixels"]
            both, differ = compare(b, o)
            kind = "4 LoRAs" if loras else "2 ControlNets" if controls else "plain"
            gaps = {k: int(np.abs(b[k] - o[k]).max()) for k in differ}  # the largest pixel difference of each
            mismatched[f"{clients}, {kind}"] = gaps
            print(f"  {both} requests answered by both servers, other pixels batched: {gaps or 'none'}", flush=True)
        kill = kill_test(folder, clients=8, steps=args.steps, seconds=args.kill_seconds) if args.kill_seconds else None
    print(f"\n{'mode':>28} {'clients':>7} {'images/s':>9} {'p50 s':>7} {'p99 s':>7} {'errors':>6}")
    for r in rows:
        cells = f"{r['images_per_s']:>9.2f} {r['p50_s']:>7.2f} {r['p99_s']:>7.2f} {len(r['errors']):>6}"
        print(f"{r['mode']:>28} {r['clients']:>7} {cells}")
    by = {(r["mode"], r["clients"]): r for r in rows}
    ratios = {  # "16": plain requests at 16 clients; "16, 4 LoRAs": the LoRA row; "16, 2 ControlNets"
        f"{c}{m.removeprefix('batched')}": round(
            by[(m, c)]["images_per_s"] / by[(m.replace("batched", "one at a time"), c)]["images_per_s"], 2
        )
        for (m, c) in by
        if m.startswith("batched")
    }
    print(f"\nbatched / one at a time, images/s: {ratios}")
    same = not any(mismatched.values())
    print(f"same pixels for every request in both modes: {same}")
    print(f"kill -9 under load: {kill}")
    result = {
        "machine": f"{os.cpu_count()} CPUs",
        "steps": args.steps,
        "backend": args.backend,
        "requests_per_client": args.requests,
        "rows": rows,
        "speedup": ratios,
        "same_images_both_modes": same,
        "requests_with_other_pixels": mismatched,
        "kill": kill,
        "targets": {
            "speedup_at_16": 2.0,
            "speedup_at_16_with_4_loras": 1.8,
            "p99_no_worse": True,
            "errors": 0,
            "missing_audit_rows": 0,
        },
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
