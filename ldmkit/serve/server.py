"""`ldmkit serve`: load the models once, open the key and audit store, and run the app on uvicorn with a graceful
shutdown (SIGTERM or Ctrl-C: new work gets 503, accepted work finishes, then the process exits)."""

from __future__ import annotations

import ipaddress
import socket

from ..config import ServeRun
from ..errors import InputError
from .app import create_app
from .models import load_models
from .store import open_store


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
    """(ASGI app, Service) for `run`: models loaded, store opened."""
    check_auth_setting(run.serve.host, no_auth)
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

    config = uvicorn.Config(
        app,
        host=run.serve.host,
        port=run.serve.port,
        log_level=log_level,
        timeout_graceful_shutdown=run.serve.timeout_s,
    )
    server = Server(config)
    where = f"http://{run.serve.host}:{run.serve.port}/"
    print(f"serving {', '.join(svc.models)} at {where}" + (" without keys (--no-auth)" if no_auth else ""), flush=True)
    try:
        server.run()
    finally:
        svc.close(timeout=run.serve.timeout_s)
