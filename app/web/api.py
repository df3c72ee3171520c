"""The HTTP API of PROTOCOL.md section 6, as a plain WSGI application.

`/ws` and `/mqtt` never reach this app as upgrades: the worker's HTTP handler
takes upgraded connections first (see `app.listeners`). Any worker answers any
request; commands, lookups and kicks travel through RabbitMQ to whichever
worker, on whichever host, holds the device. `ROUTES` is the whole surface, and
`app.web.openapi` describes it (a unit test keeps the two equal).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gevent
import orjson

from app import metrics, protocol
from app.web import openapi, status

if TYPE_CHECKING:
    from app.broker import Broker
    from app.config import Config

log = logging.getLogger("warren.web")

MAX_BODY = 65536
MAX_TIMEOUT = 30.0
# How long a lookup or a kick waits for the worker holding the device. The holder answers from
# memory, so a healthy one takes milliseconds: this only bounds a worker that is stuck.
ASK_TIMEOUT = 5.0
# A command's `timeout` (its wait and its expiration) is at least this: long enough for RabbitMQ to
# return a command nobody holds and for a device to answer, so that a shorter one cannot turn an
# offline device into a 504, or a command that would have been answered into an expired one.
MIN_COMMAND_TIMEOUT = 1.0
MAX_BAN_SECONDS = 315360000  # ten years: `for` beyond it is surely a mistake (omit it for a ban without end)
MAX_BAN_REASON = 500
# A ban's 200 waits for RabbitMQ's confirm that the stream stored it; the publisher gives up on a
# confirm after CONFIRM_TIMEOUT (10 s by default): this only bounds a publisher that is stuck.
BAN_TIMEOUT = 15.0
JSON = "application/json"
API_CHALLENGE = 'Bearer realm="warren"'
# Basic first: a browser asks for it (the status page), Prometheus sends either.
OPS_CHALLENGE = 'Basic realm="warren-ops", charset="UTF-8", Bearer realm="warren-ops"'

StartResponse = Callable[..., Any]
Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str = JSON
    headers: Headers = ()


class HttpError(Exception):
    def __init__(self, status: int, error: str, message: str | None = None, headers: Headers = ()) -> None:
        super().__init__(message or error)
        self.status, self.error, self.message, self.headers = status, error, message, headers

    def answer(self) -> Answer:
        payload: dict[str, Any] = {"error": self.error}
        if self.message:
            payload["message"] = self.message
        return Answer(self.status, orjson.dumps(payload), JSON, self.headers)


@dataclass(frozen=True)
class Route:
    """One path of the API: the methods it answers, each the name of a `WarrenApp` handler."""

    path: str  # as OpenAPI writes it: `{device}` is a path parameter
    methods: dict[str, str]

    @property
    def pattern(self) -> re.Pattern[str]:
        """The path as a regex: each `{parameter}` is one non-empty segment."""
        parts = re.split(r"(\{[a-z]+\})", self.path)
        return re.compile("".join("([^/]+)" if part.startswith("{") else re.escape(part) for part in parts))


ROUTES = (
    Route("/healthz", {"GET": "healthz"}),
    Route("/readyz", {"GET": "readyz"}),
    Route("/metrics", {"GET": "prometheus"}),
    Route("/", {"GET": "status_page"}),
    Route("/status.json", {"GET": "status_json"}),
    Route("/openapi.json", {"GET": "openapi_json"}),
    Route("/ws", {"GET": "not_upgraded"}),
    Route("/mqtt", {"GET": "not_upgraded"}),
    Route("/devices/{device}", {"GET": "device_info"}),
    Route("/devices/{device}/commands", {"POST": "command"}),
    Route("/devices/{device}/session", {"DELETE": "kick"}),
    Route("/devices/{device}/ban", {"PUT": "ban", "DELETE": "lift"}),
    Route("/bans", {"GET": "bans"}),
)
_COMPILED = tuple((route.pattern, route) for route in ROUTES)


class WarrenApp:
    """The WSGI callable. Each worker attaches its broker once it has one (after the fork)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.broker: Broker | None = None
        self._spec = orjson.dumps(openapi.spec(ops_protected=bool(config.ops_tokens)))

    def attach(self, broker: Broker) -> None:
        self.broker = broker

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        try:
            answer = self.route(environ.get("PATH_INFO", "/"), method, environ)
        except HttpError as exc:
            answer = exc.answer()
        headers = [("Content-Type", answer.content_type), ("Content-Length", str(len(answer.body))),
                   ("Cache-Control", "no-store"), *answer.headers]
        start_response(f"{answer.status} {_REASONS.get(answer.status, 'Unknown')}", headers)
        return [b""] if method == "HEAD" else [answer.body]

    def route(self, path: str, method: str, environ: dict[str, Any]) -> Answer:
        for pattern, route in _COMPILED:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            allowed = _allowed(route)
            handler = route.methods.get("GET" if method == "HEAD" else method)
            if method == "OPTIONS":
                return Answer(204, b"", JSON, (("Allow", allowed),))
            if handler is None:
                raise HttpError(405, "method_not_allowed", f"{path} answers {allowed}", (("Allow", allowed),))
            return getattr(self, handler)(environ, *match.groups())
        raise HttpError(404, "not_found", f"no route for {path}")

    # -- open to all: the platform's health checks, the API's description --------------
    def healthz(self, environ: dict[str, Any]) -> Answer:
        return Answer(200, b'{"status":"ok"}')

    def readyz(self, environ: dict[str, Any]) -> Answer:
        if self.broker is not None and self.broker.ready:
            return Answer(200, b'{"status":"ready"}')
        return Answer(503, b'{"status":"broker_unavailable"}')

    def openapi_json(self, environ: dict[str, Any]) -> Answer:
        return Answer(200, self._spec)

    def not_upgraded(self, environ: dict[str, Any]) -> Answer:
        raise HttpError(400, "bad_request", f"GET {environ.get('PATH_INFO')} must be a WebSocket upgrade "
                                            "(version 13)")

    # -- behind OPS_TOKENS: what tells anyone how many devices there are, and where -----
    def prometheus(self, environ: dict[str, Any]) -> Answer:
        self._authorize_ops(environ)
        body, content_type = metrics.render()
        return Answer(200, body, content_type)

    def status_page(self, environ: dict[str, Any]) -> Answer:
        self._authorize_ops(environ)
        return Answer(200, status.PAGE.encode(), "text/html; charset=utf-8")

    def status_json(self, environ: dict[str, Any]) -> Answer:
        self._authorize_ops(environ)
        return Answer(200, orjson.dumps(status.snapshot()))

    # -- devices: the API tokens (a lookup also takes an ops token, for the status page) ----
    def device_info(self, environ: dict[str, Any], device: str) -> Answer:
        if not self._ops_presented(environ):
            self._authorize_api(environ)
        answer = self._ask(device, "info")
        return Answer(200, orjson.dumps({key: answer.get(key) for key in openapi.DEVICE_INFO_FIELDS}))

    def kick(self, environ: dict[str, Any], device: str) -> Answer:
        self._authorize_api(environ)
        answer = self._ask(device, "kick")
        log.warning("operator kicked %s (session %s) from %s", device, answer.get("ended"),
                    environ.get("REMOTE_ADDR"))
        return Answer(200, orjson.dumps({"ended": answer.get("ended")}))

    def ban(self, environ: dict[str, Any], device: str) -> Answer:
        """Ban a device everywhere (PROTOCOL.md section 6); 200 once the ban stream stored it."""
        self._authorize_api(environ)
        _check_device(device)
        seconds, reason = _ban_body(environ)
        stored = self._stored(self._ready_broker().ban(device, seconds, reason))
        metrics.BANS_ISSUED.labels(by="operator").inc()
        log.warning("operator banned %s %s from %s", device, f"for {seconds:g}s" if seconds else "without end",
                    environ.get("REMOTE_ADDR"))
        return Answer(200, orjson.dumps(stored.public()))

    def lift(self, environ: dict[str, Any], device: str) -> Answer:
        self._authorize_api(environ)
        _check_device(device)
        result = self._ready_broker().lift(device)
        if result is None:
            raise HttpError(404, "not_banned", f"{device} is not banned")
        self._stored(result)
        log.warning("operator lifted the ban of %s from %s", device, environ.get("REMOTE_ADDR"))
        return Answer(200, orjson.dumps({"device": device, "lifted": True}))

    def bans(self, environ: dict[str, Any]) -> Answer:
        """Every ban in force, as this worker read them (the same on every worker within a second)."""
        self._authorize_api(environ)
        if self.broker is None:
            raise HttpError(503, "broker_unavailable", "this worker has no broker yet")
        return Answer(200, orjson.dumps({"bans": [ban.public() for ban in self.broker.bans()]}))

    @staticmethod
    def _stored(result: Any) -> Any:
        """The ban or lift once RabbitMQ confirmed it stored; 503 if it did not."""
        try:
            stored = result.get(timeout=BAN_TIMEOUT)
        except gevent.Timeout:
            stored = "timeout"
        if isinstance(stored, str):
            raise HttpError(503, "broker_unavailable", f"RabbitMQ did not store it ({stored})")
        return stored

    def command(self, environ: dict[str, Any], device: str) -> Answer:
        self._authorize_api(environ)
        _check_device(device)
        name, data, asked = _command_body(environ)
        timeout = max(asked, MIN_COMMAND_TIMEOUT)
        broker = self._ready_broker()
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
        return Answer(200, orjson.dumps({"ok": bool(reply.get("ok")), "data": reply.get("data"), "error": error}))

    def _ask(self, device: str, kind: str) -> dict[str, Any]:
        """Ask whichever worker holds `device` (a lookup or a kick); HTTP errors for every other outcome."""
        _check_device(device)
        answer = self._ready_broker().ask(device, kind, ASK_TIMEOUT).get()
        error = answer.get("error")
        if error == "timeout":
            raise HttpError(504, "timeout", f"no worker holding {device} answered within {ASK_TIMEOUT:g}s")
        if error is not None:
            raise HttpError(503, "broker_unavailable", "RabbitMQ did not take the request")
        if not answer.get("online"):
            raise HttpError(404, "offline", f"{device} has no live session")
        return answer

    def _ready_broker(self) -> Broker:
        broker = self.broker
        if broker is None or not broker.ready:
            raise HttpError(503, "broker_unavailable", "RabbitMQ is not reachable from this worker")
        return broker

    # -- who may ---------------------------------------------------------------------
    def _authorize_api(self, environ: dict[str, Any]) -> None:
        scheme, secret = _credentials(environ)
        if scheme != "bearer" or not _matches(secret, self.config.api_tokens):
            raise HttpError(401, "unauthorized", "send Authorization: Bearer <one of API_TOKENS>",
                            (("WWW-Authenticate", API_CHALLENGE),))

    def _authorize_ops(self, environ: dict[str, Any]) -> None:
        if self.config.ops_tokens and not self._ops_presented(environ):
            raise HttpError(401, "unauthorized", "send Authorization: Bearer <one of OPS_TOKENS>, or basic auth "
                                                 "with one of them as the password", (("WWW-Authenticate", OPS_CHALLENGE),))

    def _ops_presented(self, environ: dict[str, Any]) -> bool:
        """One of OPS_TOKENS, as a bearer token or as a basic-auth password (any user name)."""
        _, secret = _credentials(environ)
        return bool(self.config.ops_tokens) and _matches(secret, self.config.ops_tokens)


def _credentials(environ: dict[str, Any]) -> tuple[str, str | None]:
    """(scheme in lower case, the secret: a bearer token or a basic-auth password) of the request."""
    scheme, _, value = environ.get("HTTP_AUTHORIZATION", "").strip().partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme == "bearer":
        return scheme, value or None
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return scheme, None
        _user, colon, password = decoded.partition(":")
        return scheme, password if colon else None
    return scheme, None


def _matches(secret: str | None, allowed: tuple[str, ...]) -> bool:
    """Constant-time: every token is compared, and digests hide the lengths of both sides."""
    if secret is None:
        return False
    presented = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()
    matched = False
    for token in allowed:
        matched |= hmac.compare_digest(hashlib.sha256(token.encode()).digest(), presented)
    return matched


def _allowed(route: Route) -> str:
    methods = list(route.methods)
    if "GET" in methods:
        methods.append("HEAD")
    return ", ".join([*methods, "OPTIONS"])


def _check_device(device: str) -> None:
    if not protocol.DEVICE_ID.fullmatch(device):
        raise HttpError(400, "bad_request", "the device id must be 1-128 characters of A-Z a-z 0-9 _ : -")


def _command_body(environ: dict[str, Any]) -> tuple[str, Any, float]:
    """Parse and check `{"name", "data", "timeout"}`; HTTP 400 naming the problem."""
    body = _json_body(environ, required=True)
    name = body.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 120:
        raise HttpError(400, "bad_request", "'name' must be a string of 1-120 characters")
    timeout = body.get("timeout", 5)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT:
        raise HttpError(400, "bad_request", f"'timeout' must be a number of seconds in (0, {MAX_TIMEOUT:g}]")
    return name, body.get("data"), float(timeout)


def _ban_body(environ: dict[str, Any]) -> tuple[float | None, str]:
    """Parse and check `{"for", "reason"}` (both optional, and the body too): (seconds or None, reason)."""
    body = _json_body(environ, required=False)
    seconds = body.get("for")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                or not 0 < seconds <= MAX_BAN_SECONDS):
        raise HttpError(400, "bad_request", f"'for' must be a number of seconds in (0, {MAX_BAN_SECONDS}]")
    reason = body.get("reason", "")
    if not isinstance(reason, str) or len(reason) > MAX_BAN_REASON:
        raise HttpError(400, "bad_request", f"'reason' must be a string of at most {MAX_BAN_REASON} characters")
    return (None if seconds is None else float(seconds)), reason


def _json_body(environ: dict[str, Any], *, required: bool) -> dict[str, Any]:
    """The request's JSON object (an empty body is {} unless `required`); HTTP 400/413 naming the problem."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise HttpError(400, "bad_request", "Content-Length is not a number") from None
    if length > MAX_BODY:
        raise HttpError(413, "too_large", f"the body is limited to {MAX_BODY} bytes")
    raw = environ["wsgi.input"].read(length) if length else b""
    if not raw.strip() and not required:
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise HttpError(400, "bad_request", "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise HttpError(400, "bad_request", "the body must be a JSON object")
    return body


_REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 413: "Payload Too Large", 503: "Service Unavailable",
            504: "Gateway Timeout"}
