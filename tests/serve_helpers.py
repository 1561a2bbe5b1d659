"""A live ldmkit server for tests: uvicorn in a thread on a free loopback port, or `ldmkit serve` as a process."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

from ldmkit.config import ServeConfig, ServeLimits, ServeRun

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """The app built by ldmkit.serve.server.build, served by uvicorn in a background thread."""

    def __init__(self, database: Path, models=("emoji",), no_auth: bool = False, limits: dict | None = None, **serve):
        import uvicorn

        from ldmkit.serve.server import build

        self.port = free_port()
        serve.setdefault("monitor_window", 0)  # the background Inception statistic: only where a test asks for it
        cfg = ServeConfig(models=tuple(models), database=str(database), port=self.port, **serve)
        self.run = ServeRun(serve=cfg, limits=ServeLimits(**(limits or {})))
        self.app, self.service = build(self.run, no_auth=no_auth)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str | None = None, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kw)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.service.close(timeout=30)


def start_process(
    database: Path, port: int, *args: str, log: Path | None = None, threads: int | None = 1, ready_s: float = 60
) -> subprocess.Popen:
    """`ldmkit serve` as a child process (its output to `log`, torch on `threads` threads, None: torch's default);
    returns once it answers /readyz (within `ready_s` seconds)."""
    out = open(log, "wb") if log else subprocess.DEVNULL
    env = dict(os.environ) | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "ldmkit.cli", "serve", "--database", str(database), "--port", str(port), *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=env,
    )
    deadline = time.monotonic() + ready_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ldmkit serve exited with {proc.returncode}" + (f": {log.read_text()}" if log else ""))
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    raise RuntimeError(f"ldmkit serve did not become ready in {ready_s:g} s")


def kill_under_load(
    proc: subprocess.Popen, url: str, key: str, clients: int, body, ready, deadline_s: float = 60
) -> list[str]:
    """`clients` threads post body(client, i) to the OpenAI route in a loop until the server process is killed with
    SIGKILL, once ready(answered) holds (or after deadline_s). Returns the X-Request-Id of every answered request."""
    answered, stop = [], threading.Event()

    def client(c: int):
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
            i = 0
            while not stop.is_set():
                try:
                    r = http.post("/v1/images/generations", json=body(c, i))
                except httpx.TransportError:
                    return
                if r.status_code == 200:
                    answered.append(r.headers["x-request-id"])
                i += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + deadline_s
    while not ready(answered) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stop.set()
    for t in threads:
        t.join()
    return answered


def finished(client: httpx.Client, job_id: str, timeout: float = 300) -> dict:
    """The native job's view once it is no longer queued or running (polled for up to `timeout` seconds: a loaded
    machine may take a while)."""
    deadline = time.monotonic() + timeout
    while True:
        view = client.get(f"/v1/jobs/{job_id}").json()
        if view["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return view
        time.sleep(0.05)


def png_size(b64: str) -> tuple[int, int]:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        assert im.format == "PNG"
        return im.size


def b64_png(arr) -> str:
    """An image array (H, W[, C]) uint8 as the base64 PNG the APIs take for input images."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def pixels(b64_or_bytes) -> bytes:
    raw = base64.b64decode(b64_or_bytes) if isinstance(b64_or_bytes, str) else b64_or_bytes
    with Image.open(io.BytesIO(raw)) as im:
        return im.tobytes()
