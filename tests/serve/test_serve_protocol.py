"""`ldmkit serve` below the API: a header-read timeout for slow clients, and malformed HTTP counted in /metrics."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from ldmkit.config import ServeConfig, ServeLimits, ServeRun
from tests.serve_helpers import free_port


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    from ldmkit.serve.server import build, uvicorn_config

    port = free_port()
    db = tmp_path_factory.mktemp("protocol") / "ldmkit.db"
    run = ServeRun(
        serve=ServeConfig(models=("emoji",), database=str(db), port=port, monitor_window=0), limits=ServeLimits()
    )
    app, svc = build(run, no_auth=True)
    config = uvicorn_config(app, svc, ServeRun(serve=ServeConfig(host="127.0.0.1", port=port)), "warning", 0.5)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", port, svc
    srv.should_exit = True
    thread.join(30)
    svc.close(timeout=30)


def read_all(sock: socket.socket, limit_s: float) -> bytes:
    sock.settimeout(limit_s)
    out = b""
    try:
        while chunk := sock.recv(4096):
            out += chunk
    except socket.timeout:
        pass
    return out


def test_a_client_too_slow_with_its_headers_gets_408_and_is_closed(server):
    url, port, svc = server
    before = svc.metrics.protocol_errors.labels("408")._value.get()
    with socket.create_connection(("127.0.0.1", port)) as slow, socket.create_connection(("127.0.0.1", port)) as idle:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # the blank line never comes
        started = time.monotonic()
        assert httpx.get(url + "/healthz").status_code == 200  # others are served meanwhile
        answer = read_all(slow, 5)
        assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 4
        assert read_all(idle, 5).startswith(b"HTTP/1.1 408")  # connected and never sent a byte
    assert svc.metrics.protocol_errors.labels("408")._value.get() == before + 2


def test_a_kept_alive_connection_may_idle_between_requests(server):
    url, _, _ = server
    with httpx.Client(base_url=url) as c:
        assert c.get("/healthz").status_code == 200
        time.sleep(1.0)  # longer than the header timeout, shorter than uvicorn's keep-alive
        assert c.get("/healthz").status_code == 200


def test_malformed_http_is_refused_and_counted(server):
    url, port, svc = server
    before = svc.metrics.protocol_errors.labels("400")._value.get()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert read_all(s, 5).startswith(b"HTTP/1.1 400")
    assert svc.metrics.protocol_errors.labels("400")._value.get() == before + 1
    text = httpx.get(url + "/metrics").text
    assert 'ldmkit_protocol_errors_total{status="400"}' in text
