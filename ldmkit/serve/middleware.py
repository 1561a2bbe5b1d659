"""The outermost layer of the server (plain ASGI): a request id, the body-size limit, one Authorization header,
security headers, Prometheus metrics, and the audit row of every API request, written durably before the
response's first byte leaves. A response whose audit row cannot be written is withheld (fail closed): the client
gets a 500 in the API's error shape instead, and the server log says why."""

from __future__ import annotations

import json
import logging
import time
import uuid

import anyio

UNAUDITED = ("/healthz", "/readyz", "/", "/favicon.ico")  # no data behind them: probes and the page's HTML
STATUS_DECISION = {401: "refused-auth", 403: "refused-auth", 429: "refused-quota", 499: "cancelled"}
# The page loads its script and style from /static/ only, shows images from data: URLs and talks to this origin.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
log = logging.getLogger("ldmkit.serve")


class BodyTooLarge(Exception):
    pass


def error_body(message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"):
    """OpenAI's error shape (its client raises the matching exception), with `detail` for A1111-style clients."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}, "detail": message}


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
        started, held, status, done = time.perf_counter(), [], [500], [False]

        async def answer(status: int, message: str, code: str, reason: str, param: str | None = None):
            """An error answered here, before or instead of the app's response: audited like any other."""
            scope["state"]["audit"].setdefault("reason", reason)
            kind = "invalid_request_error" if status < 500 else "server_error"
            body = json.dumps(error_body(message, param, code, kind)).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await holding_send({"type": "http.response.start", "status": status, "headers": headers})
            await holding_send({"type": "http.response.body", "body": body})

        async def holding_send(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
                extra = [(b"x-request-id", request_id.encode()), *SECURITY_HEADERS]
                held.append({**msg, "headers": [*msg.get("headers", []), *extra]})
                return
            if msg["type"] == "http.response.body" and msg.get("more_body"):
                held.append(msg)
                return
            if not await self._finish(scope, status[0], started):
                held.clear()
                done[0] = True  # whatever the app sends after this is dropped
                return await self._audit_failed(send, request_id)
            if done[0]:
                return
            done[0] = True
            for m in held:
                await send(m)
            held.clear()
            await send(msg)

        headers = scope.get("headers") or []
        length = dict(headers).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await answer(413, self._too_large_message(), "body_too_large", "body too large")
        if sum(1 for k, _ in headers if k == b"authorization") > 1:
            message = "the request has more than one Authorization header; send exactly one"
            return await answer(400, message, "duplicate_header", "duplicate Authorization header", "authorization")
        seen = [0]

        async def limited_receive():
            msg = await receive()
            if msg["type"] == "http.request":
                seen[0] += len(msg.get("body", b""))
                if seen[0] > self.max_body:
                    raise BodyTooLarge
            return msg

        try:
            await self.app(scope, limited_receive, holding_send)
        except BodyTooLarge:
            if done[0] or held:
                raise
            await answer(413, self._too_large_message(), "body_too_large", "body too large")
        except Exception:
            if done[0]:  # answered already (Starlette re-raises after its error handler answered)
                return
            log.exception("request %s failed before it was answered", request_id)
            held.clear()
            message = f"internal error; request id {request_id}"
            await answer(500, message, "internal_error", "an unhandled error before the answer")

    def _too_large_message(self) -> str:
        return f"the request body is larger than the {self.max_body} bytes this server accepts"

    async def _audit_failed(self, send, request_id: str) -> None:
        """The answer when the audit row could not be written: the response is withheld (fail closed)."""
        message = (
            f"the audit trail cannot be written, so this server withholds its answer (fail closed); "
            f"request id {request_id}; the server log says why"
        )
        body = json.dumps(error_body(message, None, "audit_unavailable", "server_error")).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode()),
            *SECURITY_HEADERS,
        ]
        await send({"type": "http.response.start", "status": 500, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _finish(self, scope, status: int, started: float) -> bool:
        """Count the request and write its audit row; False (logged) when the row could not be written."""
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        seconds = time.perf_counter() - started
        if scope["path"] in UNAUDITED or scope["path"].startswith("/static/"):
            self.metrics.request(template, scope["method"], status, seconds)
            return True
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
        try:
            await anyio.to_thread.run_sync(lambda: self.audit.record(**row))
        except Exception:
            log.exception(
                "request %s (%s, status %s): its audit row could not be written; answering 500 instead",
                row["request_id"],
                row["route"],
                status,
            )
            self.metrics.audit_failures.inc()
            self.metrics.request(template, scope["method"], 500, seconds)
            return False
        self.metrics.request(template, scope["method"], status, seconds)
        return True
