"""The OpenAPI document (app/web/openapi.py) stays true to the WSGI app (app/web/api.py), in process.

Three ways it could drift, three tests: the document stops being OpenAPI 3.1; a
route is added or dropped on one side only; an answer stops fitting its schema
(schemathesis drives every operation of the app with generated requests and
checks each answer against the document). The live gateway gets the same run in
tests/test_operators.py.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import jsonschema_rs
import orjson
import pytest
import schemathesis
from gevent.event import AsyncResult
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.definitions import OPENAPI_31

from app.broker.bans import ban_now, lift_now
from app.config import Config
from app.sessions.bans import Ban, BanList
from app.web import api as web
from app.web import openapi, status

API, OPS = "unit-api-token", "unit-ops-token"
ONLINE = "lock-online"
INFO = {"device": ONLINE, "online": True, "session": "0123456789abcdef", "transport": "ws",
        "connected_at": 1767225600000, "worker": 4242, "host": "gw-1"}


class HttpSideBroker:
    """What the HTTP API asks of the broker: `ONLINE` is held somewhere, every other device is offline."""

    def __init__(self) -> None:
        self.ready = True
        self.silent = False  # a holder that never answers
        self.asked: list[tuple[str, str]] = []
        self.store_fails = False  # RabbitMQ does not confirm a ban (a stream without its majority)
        self.stored = BanList()

    def ban(self, device: str, seconds: float | None, reason: str) -> AsyncResult:
        record = ban_now(device, seconds, reason, "operator", after=self.stored.latest(device))
        return self._store(record)

    def lift(self, device: str) -> AsyncResult | None:
        current = self.stored.banned(device)
        return None if current is None else self._store(lift_now(device, current))

    def bans(self) -> list[Ban]:
        return self.stored.in_force()

    def _store(self, record: Ban) -> AsyncResult:
        if self.store_fails:
            return _resolved("broker_unavailable")
        self.stored.apply(record)
        return _resolved(record)

    def send_command(self, device: str, name: str, data: Any, timeout: float) -> AsyncResult:
        reply = {"ok": True, "data": {"echo": data}, "error": None} if device == ONLINE else \
            {"ok": False, "data": None, "error": "offline"}
        return _resolved(reply)

    def ask(self, device: str, kind: str, timeout: float) -> AsyncResult:
        self.asked.append((device, kind))
        if self.silent:
            return _resolved({"error": "timeout"})
        if device != ONLINE:
            return _resolved({"device": device, "online": False})
        return _resolved(INFO if kind == "info" else {"device": device, "online": True, "ended": INFO["session"]})


def _resolved(value: Any) -> AsyncResult:
    result = AsyncResult()
    result.set(value)
    return result


def make_app(ops_tokens: tuple[str, ...] = (OPS,)) -> tuple[web.WarrenApp, HttpSideBroker]:
    app = web.WarrenApp(Config(api_tokens=(API,), ops_tokens=ops_tokens))
    broker = HttpSideBroker()
    app.attach(broker)  # type: ignore[arg-type]
    return app, broker


def call(app: web.WarrenApp, method: str, path: str, body: bytes = b"",
         authorization: str | None = None) -> tuple[int, dict[str, str], bytes]:
    seen: dict[str, Any] = {}

    def start_response(status_line: str, headers: list[tuple[str, str]]) -> None:
        seen["status"], seen["headers"] = int(status_line.split()[0]), dict(headers)

    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "CONTENT_LENGTH": str(len(body)),
               "wsgi.input": io.BytesIO(body), "REMOTE_ADDR": "127.0.0.1"}
    if authorization:
        environ["HTTP_AUTHORIZATION"] = authorization
    answer = b"".join(app(environ, start_response))
    return seen["status"], seen["headers"], answer


def basic(password: str, user: str = "prometheus") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def response_schema(document: dict[str, Any], path: str, method: str, status_code: int) -> jsonschema_rs.Validator:
    """A validator for one documented JSON answer, its `$ref`s resolved inside the document."""
    response = document["paths"][path][method]["responses"][str(status_code)]
    schema = {**response["content"]["application/json"]["schema"], "components": document["components"]}
    return jsonschema_rs.validator_for(schema)


# -- the document itself ----------------------------------------------------------------------
@pytest.mark.parametrize("ops_protected", [True, False])
def test_the_document_is_openapi_3_1(ops_protected):
    document = openapi.spec(ops_protected)
    jsonschema_rs.Draft202012Validator(OPENAPI_31).validate(document)
    for name, schema in document["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name


def test_every_route_is_documented_and_nothing_else():
    served = {(route.path, method.lower()) for route in web.ROUTES for method in route.methods}
    documented = {(path, method) for path, item in openapi.spec(True)["paths"].items() for method in item}
    assert served == documented


def test_the_app_serves_the_document_of_its_deployment():
    for ops_tokens, security in (((OPS,), [{"opsBearer": []}, {"opsBasic": []}]), ((), [])):
        app, _ = make_app(ops_tokens)
        code, headers, body = call(app, "GET", "/openapi.json")
        served = orjson.loads(body)
        assert code == 200 and headers["Content-Type"] == "application/json"
        assert served == openapi.spec(bool(ops_tokens))
        assert served["paths"]["/metrics"]["get"]["security"] == security


# -- answers fit the document -----------------------------------------------------------------
def test_status_json_fits_its_schema():
    app, _ = make_app()
    code, _, body = call(app, "GET", "/status.json", authorization=f"Bearer {OPS}")
    assert code == 200
    response_schema(openapi.spec(True), "/status.json", "get", 200).validate(orjson.loads(body))
    assert set(status.snapshot()) == set(openapi.SCHEMAS["Status"]["required"])


def test_lookup_and_kick_answers_fit_and_say_what_the_holder_said():
    app, broker = make_app()
    document = openapi.spec(True)
    code, _, body = call(app, "GET", f"/devices/{ONLINE}", authorization=f"Bearer {API}")
    assert code == 200 and orjson.loads(body) == INFO
    response_schema(document, "/devices/{device}", "get", 200).validate(orjson.loads(body))
    code, _, body = call(app, "DELETE", f"/devices/{ONLINE}/session", authorization=f"Bearer {API}")
    assert code == 200 and orjson.loads(body) == {"ended": INFO["session"]}
    assert broker.asked == [(ONLINE, "info"), (ONLINE, "kick")]
    code, _, body = call(app, "DELETE", "/devices/lock-gone/session", authorization=f"Bearer {API}")
    assert code == 404 and orjson.loads(body)["error"] == "offline"
    response_schema(document, "/devices/{device}/session", "delete", 404).validate(orjson.loads(body))


def test_a_ban_is_answered_once_stored_listed_and_lifted_as_documented():
    app, broker = make_app()
    document, auth = openapi.spec(True), f"Bearer {API}"
    code, _, body = call(app, "PUT", "/devices/lock-7/ban", b'{"for": 60, "reason": "stolen"}', authorization=auth)
    ban = orjson.loads(body)
    assert code == 200 and ban["device"] == "lock-7" and ban["reason"] == "stolen" and ban["by"] == "operator"
    assert broker.stored.banned("lock-7").until == ban["until"]  # stored before the 200
    response_schema(document, "/devices/{device}/ban", "put", 200).validate(ban)
    code, _, body = call(app, "PUT", "/devices/lock-8/ban", authorization=auth)  # no body: a ban without end
    assert code == 200 and orjson.loads(body)["until"] is None
    code, _, body = call(app, "GET", "/bans", authorization=auth)
    assert code == 200 and [b["device"] for b in orjson.loads(body)["bans"]] == ["lock-7", "lock-8"]
    response_schema(document, "/bans", "get", 200).validate(orjson.loads(body))
    code, _, body = call(app, "DELETE", "/devices/lock-7/ban", authorization=auth)
    assert code == 200 and orjson.loads(body) == {"device": "lock-7", "lifted": True}
    code, _, body = call(app, "DELETE", "/devices/lock-7/ban", authorization=auth)
    assert code == 404 and orjson.loads(body)["error"] == "not_banned"
    response_schema(document, "/devices/{device}/ban", "delete", 404).validate(orjson.loads(body))


@pytest.mark.parametrize("body", [b'{"for": 0}', b'{"for": -5}', b'{"for": 315360001}', b'{"for": "60"}',
                                  b'{"for": true}', b'{"reason": 7}', b"[1]", b"not json"])
def test_a_ban_with_a_bad_body_is_400_and_stores_nothing(body):
    app, broker = make_app()
    code, _, answer = call(app, "PUT", "/devices/lock-7/ban", body, authorization=f"Bearer {API}")
    assert code == 400 and orjson.loads(answer)["error"] == "bad_request"
    assert broker.stored.in_force() == []


def test_a_ban_rabbitmq_did_not_store_is_503_and_bans_need_the_api_token():
    app, broker = make_app()
    broker.store_fails = True
    code, _, body = call(app, "PUT", "/devices/lock-7/ban", authorization=f"Bearer {API}")
    assert code == 503 and orjson.loads(body)["error"] == "broker_unavailable"
    for method, path in (("PUT", "/devices/lock-7/ban"), ("DELETE", "/devices/lock-7/ban"), ("GET", "/bans")):
        assert call(app, method, path, authorization=f"Bearer {OPS}")[0] == 401


def test_a_holder_that_does_not_answer_is_504_and_a_broker_that_is_down_503():
    app, broker = make_app()
    broker.silent = True
    code, _, body = call(app, "GET", f"/devices/{ONLINE}", authorization=f"Bearer {API}")
    assert code == 504 and orjson.loads(body)["error"] == "timeout"
    broker.ready = False
    code, _, body = call(app, "DELETE", f"/devices/{ONLINE}/session", authorization=f"Bearer {API}")
    assert code == 503 and orjson.loads(body)["error"] == "broker_unavailable"


# -- who may --------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/metrics", "/", "/status.json"])
def test_ops_endpoints_take_an_ops_token_as_bearer_or_basic_password(path):
    app, _ = make_app()
    for authorization in (None, f"Bearer {API}", f"Bearer {OPS}x", basic(API), "Basic !!!", f"Basic {OPS}",
                          basic("", user=OPS), f"Token {OPS}"):
        code, headers, body = call(app, "GET", path, authorization=authorization)
        assert code == 401, authorization
        assert headers["WWW-Authenticate"].startswith("Basic ") and orjson.loads(body)["error"] == "unauthorized"
    for authorization in (f"Bearer {OPS}", f"bearer {OPS}", basic(OPS), basic(OPS, user="")):
        assert call(app, "GET", path, authorization=authorization)[0] == 200, authorization


def test_ops_endpoints_are_open_without_ops_tokens_but_health_always_is():
    open_app, _ = make_app(ops_tokens=())
    for path in ("/metrics", "/", "/status.json", "/healthz", "/readyz"):
        assert call(open_app, "GET", path)[0] == 200, path
    protected, _ = make_app()
    assert call(protected, "GET", "/healthz")[0] == 200 and call(protected, "GET", "/readyz")[0] == 200


def test_a_lookup_takes_an_api_or_ops_token_and_a_kick_only_an_api_token():
    app, _ = make_app()
    for authorization in (f"Bearer {API}", f"Bearer {OPS}", basic(OPS)):
        assert call(app, "GET", f"/devices/{ONLINE}", authorization=authorization)[0] == 200, authorization
    for authorization in (None, f"Bearer {OPS}", basic(OPS), basic(API)):
        code, headers, _ = call(app, "DELETE", f"/devices/{ONLINE}/session", authorization=authorization)
        assert code == 401 and headers["WWW-Authenticate"].startswith("Bearer"), authorization
    open_app, _ = make_app(ops_tokens=())  # no ops tokens: a lookup needs the API token
    assert call(open_app, "GET", f"/devices/{ONLINE}")[0] == 401


def test_unlisted_methods_get_405_with_allow_and_head_is_get_without_a_body():
    app, _ = make_app()
    code, headers, body = call(app, "POST", "/healthz")
    assert code == 405 and headers["Allow"] == "GET, HEAD, OPTIONS" and orjson.loads(body)["error"]
    code, headers, _ = call(app, "GET", f"/devices/{ONLINE}/session", authorization=f"Bearer {API}")
    assert code == 405 and headers["Allow"] == "DELETE, OPTIONS"
    code, headers, body = call(app, "HEAD", "/healthz")
    assert code == 200 and body == b"" and headers["Content-Length"] == str(len(b'{"status":"ok"}'))
    code, headers, _ = call(app, "OPTIONS", "/devices/x/commands")
    assert code == 204 and headers["Allow"] == "POST, OPTIONS"


def test_a_websocket_path_without_the_upgrade_is_refused_as_documented():
    app, _ = make_app()
    for path in ("/ws", "/mqtt"):
        code, _, body = call(app, "GET", path)
        assert code == 400
        response_schema(openapi.spec(True), path, "get", 400).validate(orjson.loads(body))


# -- schemathesis through the WSGI app -----------------------------------------------------
_APP, _ = make_app()
_TOKEN_APP = web.WarrenApp(Config(api_tokens=(API,), ops_tokens=(API,)))  # one token opens every door
_TOKEN_APP.attach(HttpSideBroker())  # type: ignore[arg-type]
# The WebSocket upgrades are device sessions, tested as such (and below, refused without the upgrade).
schema = schemathesis.openapi.from_wsgi("/openapi.json", _TOKEN_APP).exclude(tag="websocket")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_answer_fits_the_document(case):
    case.call_and_validate(headers={"Authorization": f"Bearer {API}"})
