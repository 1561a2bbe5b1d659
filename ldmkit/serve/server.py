"""`ldmkit serve`: load the models once, open the key and audit store, and run the app on uvicorn with a graceful
shutdown (SIGTERM or Ctrl-C: the listening socket closes, so new connections are refused, not answered 503, and
idle connections are closed; a request that arrived just before gets 503; accepted work finishes, then the process
exits).

Connections are read by h11 with a header-read timeout: a client must finish sending a request's line and headers
within HEADER_TIMEOUT_S of its first byte (or of connecting) or the connection is answered 408 and closed. Requests
refused at this level (malformed HTTP: 400; too slow: 408) never reach the app, so they have no audit row; they are
counted in /metrics as ldmkit_protocol_errors_total by status."""

from __future__ import annotations

import ipaddress
import socket

from ..config import ServeRun
from ..errors import InputError
from ..pipelines.openvino import load_openvino
from ..runtime import resolve_device, sampling_dtype
from .app import create_app
from .models import load_models
from .store import open_store

HEADER_TIMEOUT_S = 10.0  # seconds a client has to send a request's line and headers


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) only ever means this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def check_auth_setting(host: str, no_auth: bool) -> None:
    if no_auth and not is_loopback(host):
        raise InputError(
            f"--no-auth serves without keys, which is allowed on a loopback address only, not --host {host}; "
            f"create a key with `ldmkit keys create --name NAME --role admin` and drop --no-auth"
        )


def build(run: ServeRun, no_auth: bool = False):
    """(ASGI app, Service) for `run`: models loaded, store opened. Settings the machine cannot honour (bf16 sampling
    without native bf16, OpenVINO on a GPU or without its package) are refused first."""
    check_auth_setting(run.serve.host, no_auth)
    device = resolve_device(run.serve.device, "--device")
    sampling_dtype(run.serve.precision, device, "--precision")
    if run.serve.backend == "openvino":
        if device.type != "cpu":
            raise InputError(f"--backend openvino runs on the CPU, not {device}; use --device cpu or --backend torch")
        load_openvino()  # the package, or the extra to install
    store = open_store(run.serve.database or None)
    models = load_models(run.serve.models, run.serve.device)
    return create_app(run, models, store, no_auth=no_auth)


def serve(run: ServeRun, no_auth: bool = False, log_level: str = "info") -> None:
    """Serve until SIGTERM / Ctrl-C."""
    import uvicorn

    app, svc = build(run, no_auth)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            svc.scheduler.drain()  # new work: 503 at once; queued and running work finishes
            super().handle_exit(sig, frame)

    server = Server(uvicorn_config(app, svc, run, log_level))
    where = f"http://{run.serve.host}:{run.serve.port}/"
    print(f"serving {', '.join(svc.models)} at {where}" + (" without keys (--no-auth)" if no_auth else ""), flush=True)
    inv = svc.invariance
    print(
        "batch invariance: holds (the same request gives the same image alone or batched)"
        if inv["holds"]
        else f"batch invariance: does not hold: {inv['reason']}",
        flush=True,
    )
    try:
        server.run()
    finally:
        svc.close(timeout=run.serve.timeout_s)


def uvicorn_config(app, svc, run: ServeRun, log_level: str = "info", header_timeout_s: float = HEADER_TIMEOUT_S):
    """uvicorn's settings for `app`: h11 with the header-read timeout and protocol errors counted in svc's metrics."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=run.serve.host,
        port=run.serve.port,
        log_level=log_level,
        timeout_graceful_shutdown=run.serve.timeout_s,
        http=counted_protocol(svc.metrics, header_timeout_s),
    )


def counted_protocol(metrics, header_timeout_s: float):
    """uvicorn's h11 protocol with a header-read timeout (408, then close) and its 400s for malformed HTTP counted
    in `metrics` (they never reach the app, so they have no audit row)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class CountedH11(H11Protocol):
        header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._await_headers()

        def data_received(self, data: bytes) -> None:
            if self.header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._await_headers()  # the first byte of the next request on a kept-alive connection
            before = self.cycle
            super().data_received(data)
            if self.cycle is not before:  # a request's headers arrived
                self._stop_waiting()

        def connection_lost(self, exc):
            self._stop_waiting()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            metrics.protocol_errors.labels("400").inc()
            self._stop_waiting()
            super().send_400_response(msg)

        def _await_headers(self) -> None:
            self._stop_waiting()
            self.header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _stop_waiting(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _headers_too_slow(self) -> None:
            self.header_timer = None
            if self.transport.is_closing() or not (self.cycle is None or self.cycle.response_complete):
                return
            metrics.protocol_errors.labels("408").inc()
            body = b"the request's headers did not arrive in time"
            head = f"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: {len(body)}\r\n"
            self.transport.write(head.encode() + b"connection: close\r\n\r\n" + body)
            self.transport.close()

    return CountedH11
