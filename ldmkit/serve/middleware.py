"""The outermost layer of the server (plain ASGI): a request id, the body-size limit, Prometheus metrics, and the
audit row of every API request, written durably before the response's first byte leaves."""

from __future__ import annotations

import json
import time
import uuid

UNAUDITED = ("/healthz", "/readyz", "/", "/favicon.ico")  # no data behind them: probes and the page's HTML
STATUS_DECISION = {401: "refused-auth", 403: "refused-auth", 429: "refused-quota", 499: "cancelled"}


class BodyTooLarge(Exception):
    pass


def decision_for(status: int) -> str:
    if status in STATUS_DECISION:
        return STATUS_DECISION[status]
    if status >= 500:
        return "failed"
    return "refused-validation" if status >= 400 else "served"


class ServeMiddleware:
    """Wraps the FastAPI app. Routes put what the audit row should hold in scope["state"]["audit"] (key, model,
    parameters, outputs, decision); this layer adds time, client, route and status and writes the row."""

    def __init__(self, app, audit, metrics, max_body: int):
        self.app, self.audit, self.metrics, self.max_body = app, audit, metrics, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["audit"] = request_id, {}
        started, held, status = time.perf_counter(), [], [500]
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await self._too_large(scope, send, request_id, started)
        seen = [0]

        async def limited_receive():
            msg = await receive()
            if msg["type"] == "http.request":
                seen[0] += len(msg.get("body", b""))
                if seen[0] > self.max_body:
                    raise BodyTooLarge
            return msg

        async def holding_send(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
                msg = {**msg, "headers": [*msg.get("headers", []), (b"x-request-id", request_id.encode())]}
                held.append(msg)
                return
            if msg["type"] == "http.response.body" and msg.get("more_body"):
                held.append(msg)
                return
            await self._finish(scope, status[0], started)
            for m in held:
                await send(m)
            held.clear()
            await send(msg)

        try:
            await self.app(scope, limited_receive, holding_send)
        except BodyTooLarge:
            if not held:
                return await self._too_large(scope, send, request_id, started)
            raise

    async def _too_large(self, scope, send, request_id: str, started: float):
        body = json.dumps(
            {
                "error": {
                    "message": f"the request body is larger than the {self.max_body} bytes this server accepts",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "body_too_large",
                }
            }
        ).encode()
        scope["state"]["audit"]["reason"] = "body too large"
        await self._finish(scope, 413, started)
        headers = [(b"content-type", b"application/json"), (b"x-request-id", request_id.encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _finish(self, scope, status: int, started: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        seconds = time.perf_counter() - started
        self.metrics.request(template, scope["method"], status, seconds)
        if scope["path"] in UNAUDITED or scope["path"].startswith("/static/"):
            return
        a = scope["state"]["audit"]
        client = scope.get("client")
        row = dict(
            request_id=scope["state"]["request_id"],
            key_id=a.get("key_id"),
            key_name=a.get("key_name"),
            client=f"{client[0]}:{client[1]}" if client else None,
            route=f"{scope['method']} {template if route else scope['path'][:200]}",
            model=a.get("model"),
            weights_sha256=a.get("weights_sha256"),
            params=a.get("params"),
            outputs=a.get("outputs"),
            decision=a.get("decision") or decision_for(status),
            reason=a.get("reason"),
            status=status,
            queue_ms=a.get("queue_ms"),
            run_ms=a.get("run_ms"),
        )
        import anyio

        await anyio.to_thread.run_sync(lambda: self.audit.record(**row))
