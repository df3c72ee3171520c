"""The HTTP API of PROTOCOL.md section 6, as a plain WSGI application.

`/ws` never reaches this app as an upgrade: the worker's HTTP handler takes
upgraded connections first (see `app.listeners`). Any worker answers any request;
commands travel through RabbitMQ to whichever worker holds the device.
"""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import gevent
import orjson

from app import metrics, protocol, status

if TYPE_CHECKING:
    from app.broker import Broker
    from app.config import Config

COMMAND_PATH = re.compile(r"/devices/([^/]+)/commands")
MAX_BODY = 65536
MAX_TIMEOUT = 30.0

StartResponse = Callable[..., Any]


class HttpError(Exception):
    def __init__(self, status: int, error: str, message: str | None = None) -> None:
        super().__init__(message or error)
        self.status, self.error, self.message = status, error, message


class WarrenApp:
    """The WSGI callable. Each worker attaches its broker once it has one (after the fork)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.broker: Broker | None = None

    def attach(self, broker: Broker) -> None:
        self.broker = broker

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        try:
            status, body, content_type = self.route(environ)
        except HttpError as exc:
            payload: dict[str, Any] = {"error": exc.error}
            if exc.message:
                payload["message"] = exc.message
            status, body, content_type = exc.status, orjson.dumps(payload), "application/json"
        start_response(f"{status} {_REASONS.get(status, 'Unknown')}",
                       [("Content-Type", content_type), ("Content-Length", str(len(body))),
                        ("Cache-Control", "no-store")])
        return [body]

    def route(self, environ: dict[str, Any]) -> tuple[int, bytes, str]:
        path, method = environ.get("PATH_INFO", "/"), environ.get("REQUEST_METHOD", "GET")
        if path == "/healthz":
            return 200, b'{"status":"ok"}', "application/json"
        if path == "/readyz":
            ready = self.broker is not None and self.broker.ready
            return (200, b'{"status":"ready"}', "application/json") if ready else \
                (503, b'{"status":"broker_unavailable"}', "application/json")
        if path == "/metrics":
            body, content_type = metrics.render()
            return 200, body, content_type
        if path == "/":
            return 200, status.PAGE.encode(), "text/html; charset=utf-8"
        if path == "/status.json":
            return 200, orjson.dumps(status.snapshot()), "application/json"
        if path in ("/ws", "/mqtt"):
            raise HttpError(400, "bad_request", f"GET {path} must be a WebSocket upgrade (version 13)")
        match = COMMAND_PATH.fullmatch(path)
        if match:
            if method != "POST":
                raise HttpError(405, "method_not_allowed", "use POST")
            return self.command(match.group(1), environ)
        raise HttpError(404, "not_found", f"no route for {path}")

    # -- POST /devices/<device>/commands -------------------------------------------
    def command(self, device: str, environ: dict[str, Any]) -> tuple[int, bytes, str]:
        self._authorize(environ)
        if not protocol.DEVICE_ID.fullmatch(device):
            raise HttpError(400, "bad_request", "the device id must be 1-128 characters of A-Z a-z 0-9 _ : -")
        name, data, timeout = _command_body(environ)
        broker = self.broker
        if broker is None or not broker.ready:
            raise HttpError(503, "broker_unavailable", "RabbitMQ is not reachable from this worker")
        started = time.monotonic()
        result = broker.send_command(device, name, data, timeout)
        try:
            reply = result.get(timeout=timeout)
        except gevent.Timeout:
            metrics.COMMANDS.labels(outcome="api_timeout").inc()
            raise HttpError(504, "timeout", f"no reply from {device} within {timeout:g}s") from None
        metrics.COMMAND_API_RTT.observe(time.monotonic() - started)
        error = reply.get("error")
        if not reply.get("ok") and error == "offline":
            raise HttpError(404, "offline", f"{device} has no live session")
        if not reply.get("ok") and error == "expired":
            raise HttpError(504, "timeout", f"the command expired before it reached {device}")
        if not reply.get("ok") and error == "broker_unavailable":
            raise HttpError(503, "broker_unavailable", "RabbitMQ did not take the command")
        body = {"ok": bool(reply.get("ok")), "data": reply.get("data"), "error": error}
        return 200, orjson.dumps(body), "application/json"

    def _authorize(self, environ: dict[str, Any]) -> None:
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, token = header.partition(" ")
        presented = token.strip().encode()
        matched = False
        for allowed in self.config.api_tokens:
            matched |= hmac.compare_digest(allowed.encode(), presented)
        if scheme.lower() != "bearer" or not matched:
            raise HttpError(401, "unauthorized", "send Authorization: Bearer <one of API_TOKENS>")


def _command_body(environ: dict[str, Any]) -> tuple[str, Any, float]:
    """Parse and check `{"name", "data", "timeout"}`; HTTP 400 naming the problem."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise HttpError(400, "bad_request", "Content-Length is not a number") from None
    if length > MAX_BODY:
        raise HttpError(413, "too_large", f"the body is limited to {MAX_BODY} bytes")
    raw = environ["wsgi.input"].read(length) if length else b""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise HttpError(400, "bad_request", "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise HttpError(400, "bad_request", "the body must be a JSON object")
    name = body.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 120:
        raise HttpError(400, "bad_request", "'name' must be a string of 1-120 characters")
    timeout = body.get("timeout", 5)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT:
        raise HttpError(400, "bad_request", f"'timeout' must be a number of seconds in (0, {MAX_TIMEOUT:g}]")
    return name, body.get("data"), float(timeout)


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 413: "Payload Too Large", 503: "Service Unavailable",
            504: "Gateway Timeout"}
