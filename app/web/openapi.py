"""The HTTP API (PROTOCOL.md section 6) described as OpenAPI 3.1, served at `GET /openapi.json`.

Data, not prose: `spec()` builds the document `app.web` serves, and the tests
hold both sides to it (tests/unit/test_openapi.py: every route of `app.web.api.ROUTES`
is here and nothing else, every answer of the app fits; tests/test_operators.py:
schemathesis against a live gateway). The security of the ops endpoints follows
the deployment: open when OPS_TOKENS is unset, so that the document stays true.
"""

from __future__ import annotations

from typing import Any

DEVICE_INFO_FIELDS = ("device", "online", "session", "transport", "connected_at", "worker", "host")
TRANSPORTS = ("tcp", "tls", "ws", "wss", "mqtt", "mqtts", "mqtt-ws", "mqtt-wss")
DEVICE_PATTERN = "^[A-Za-z0-9_:-]{1,128}$"

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema, description: str, headers: Schema | None = None) -> Schema:
    response: Schema = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _error(description: str, *codes: str, challenge: bool = False) -> Schema:
    """An error answer `{"error": <one of codes>, "message"?}`; a 401 says how to authenticate."""
    schema = {"allOf": [_ref("Error"), {"properties": {"error": {"enum": list(codes)}}}]}
    headers = {"WWW-Authenticate": {"description": "the authentication schemes this endpoint takes",
                                    "required": True, "schema": {"type": "string"}}} if challenge else None
    return _json(schema, description, headers)


def _counts(description: str) -> Schema:
    return {"type": "object", "description": description, "additionalProperties": {"type": "integer", "minimum": 0}}


def _counter(minimum: int = 0) -> Schema:
    return {"type": "integer", "minimum": minimum}


_PERCENTILES: Schema = {
    "type": "object", "required": ["count", "p50", "p90", "p99"], "additionalProperties": False,
    "description": "a round-trip histogram since start: its count and quantiles in seconds (null while empty)",
    "properties": {"count": _counter(), **{q: {"type": ["number", "null"], "minimum": 0} for q in ("p50", "p90", "p99")}},
}

_STATUS: Schema = {
    "type": "object", "additionalProperties": False,
    "description": "The status page's figures for the whole instance (every worker), whichever worker answers.",
    "required": ["time", "workers", "sessions", "sessions_by_transport", "sessions_by_worker", "connections",
                 "accepted", "closed", "hello_failures", "errors", "events", "commands", "round_trips", "broker",
                 "accept_paused", "supervisor"],
    "properties": {
        "time": {"type": "number", "description": "the answering worker's clock, seconds since the epoch"},
        "workers": _counter(),
        "sessions": _counter(),
        "sessions_by_transport": _counts("sessions now, by transport"),
        "sessions_by_worker": {"type": "array", "items": {
            "type": "object", "required": ["pid", "sessions"], "additionalProperties": False,
            "properties": {"pid": _counter(1), "sessions": _counter()}}},
        "connections": _counter(),
        "accepted": _counter(),
        "closed": _counts("sessions closed since start, by reason"),
        "hello_failures": _counts("hellos refused since start, by error code"),
        "errors": _counts("error frames sent to devices since start, by code"),
        "events": _counts("events since start: acked, or nacked by reason"),
        "commands": _counts("commands since start, by outcome"),
        "round_trips": {"type": "object", "additionalProperties": False,
                        "required": ["event_confirm", "command_device", "command_api"],
                        "properties": {key: _PERCENTILES for key in ("event_confirm", "command_device", "command_api")}},
        "broker": {"type": "object", "required": ["publisher", "consumer", "blocked"], "additionalProperties": False,
                   "description": "workers whose RabbitMQ links are up, and those RabbitMQ blocks",
                   "properties": {"publisher": _counter(), "consumer": _counter(), "blocked": _counter()}},
        "accept_paused": _counter(),
        "supervisor": {"type": "object", "required": ["restarts", "crashes", "gave_up"], "additionalProperties": False,
                       "properties": {"restarts": _counts("children restarted, by supervisor"),
                                      "crashes": _counts("children crashed, by supervisor"),
                                      "gave_up": _counts("supervisors that exhausted their budget")}},
    },
}

SCHEMAS: dict[str, Schema] = {
    "Error": {"type": "object", "required": ["error"], "properties": {
        "error": {"type": "string", "description": "a code: bad_request, unauthorized, offline, timeout, too_large, "
                                                   "broker_unavailable, not_banned, not_found, method_not_allowed"},
        "message": {"type": "string", "description": "human text"}}},
    "Health": {"type": "object", "required": ["status"], "additionalProperties": False,
               "properties": {"status": {"const": "ok"}}},
    "Ready": {"type": "object", "required": ["status"], "additionalProperties": False,
              "properties": {"status": {"enum": ["ready", "broker_unavailable"]}}},
    "CommandRequest": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 120, "description": "the command's name"},
        "data": {"description": "any JSON value, handed to the device as is"},
        "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 30, "default": 5,
                    "description": "seconds to wait for the device's reply, also the command's expiration; "
                                   "a value under 1 counts as 1"}}},
    "CommandReply": {"type": "object", "required": ["ok", "data", "error"], "additionalProperties": False,
                     "description": "the device's reply", "properties": {
                         "ok": {"type": "boolean"}, "data": {"description": "any JSON value the device sent"},
                         "error": {"type": ["string", "null"], "description": "the device's error text"}}},
    "DeviceInfo": {"type": "object", "required": list(DEVICE_INFO_FIELDS), "additionalProperties": False,
                   "properties": {
                       "device": {"type": "string", "pattern": DEVICE_PATTERN},
                       "online": {"const": True},
                       "session": {"type": "string", "minLength": 1, "description": "the session id of its welcome"},
                       "transport": {"enum": list(TRANSPORTS)},
                       "connected_at": {"type": "integer", "description": "the session's hello, ms since the epoch"},
                       "worker": {"type": "integer", "minimum": 1, "description": "pid of the worker holding it"},
                       "host": {"type": "string", "description": "host name of that worker's machine"}}},
    "BanRequest": {"type": "object", "properties": {
        "for": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 315360000,
                "description": "seconds the ban lasts; omitted or null: until lifted"},
        "reason": {"type": "string", "maxLength": 500, "description": "why, for the operators who read GET /bans"}}},
    "Ban": {"type": "object", "required": ["device", "until", "reason", "by"], "additionalProperties": False,
            "properties": {
                "device": {"type": "string", "pattern": DEVICE_PATTERN},
                "until": {"type": ["integer", "null"], "description": "when it ends, ms since the epoch; null: never"},
                "reason": {"type": "string"},
                "by": {"enum": ["operator", "flapping"], "description": "an operator, or flapping detection"}}},
    "Bans": {"type": "object", "required": ["bans"], "additionalProperties": False,
             "properties": {"bans": {"type": "array", "items": _ref("Ban")}}},
    "Lifted": {"type": "object", "required": ["device", "lifted"], "additionalProperties": False,
               "properties": {"device": {"type": "string", "pattern": DEVICE_PATTERN}, "lifted": {"const": True}}},
    "Ended": {"type": "object", "required": ["ended"], "additionalProperties": False,
              "properties": {"ended": {"type": "string", "minLength": 1, "description": "the session id ended"}}},
    "Status": _STATUS,
}

SECURITY_SCHEMES: dict[str, Schema] = {
    "apiToken": {"type": "http", "scheme": "bearer", "description": "one of API_TOKENS"},
    "opsBearer": {"type": "http", "scheme": "bearer", "description": "one of OPS_TOKENS"},
    "opsBasic": {"type": "http", "scheme": "basic",
                 "description": "any user name, one of OPS_TOKENS as the password (browsers, Prometheus' basic_auth)"},
}

_DEVICE = {"name": "device", "in": "path", "required": True, "description": "the device id of its hello",
           "schema": {"type": "string", "pattern": DEVICE_PATTERN}}
_BAD_DEVICE = _error("the device id is not 1-128 characters of A-Z a-z 0-9 _ : -", "bad_request")
_API_401 = _error("no Authorization: Bearer <one of API_TOKENS>", "unauthorized", challenge=True)
_OFFLINE = _error("no session of this device anywhere", "offline")
_UNAVAILABLE = _error("this worker cannot reach RabbitMQ now", "broker_unavailable")
_ASK_TIMEOUT = _error("a worker holds the device but did not answer in time", "timeout")


def _ops_get(summary: str, description: str, content: Schema, protected: bool) -> Schema:
    """An ops endpoint: behind OPS_TOKENS when the deployment sets them, else open (and said so at start)."""
    operation: Schema = {"summary": summary, "description": description, "tags": ["operators"],
                         "responses": {"200": {"description": summary, "content": content}}}
    if protected:
        operation["security"] = [{"opsBearer": []}, {"opsBasic": []}]
        operation["responses"]["401"] = _error("no valid ops token", "unauthorized", challenge=True)
    else:
        operation["security"] = []
    return {"get": operation}


def _header(name: str, schema: Schema) -> Schema:
    return {"name": name, "in": "header", "required": True, "schema": schema}


def _websocket(path: str, what: str, subprotocol: str | None) -> Schema:
    """A device's WebSocket upgrade (RFC 6455); tagged `websocket`, which HTTP fuzzers cannot speak."""
    headers = [_header("Upgrade", {"const": "websocket"}), _header("Connection", {"const": "Upgrade"}),
               _header("Sec-WebSocket-Version", {"const": "13"}),
               _header("Sec-WebSocket-Key", {"type": "string", "pattern": "^[A-Za-z0-9+/]{22}==$"})]
    if subprotocol:
        headers.append(_header("Sec-WebSocket-Protocol", {"const": subprotocol}))
    return {"get": {
        "summary": f"WebSocket upgrade for a device ({what})", "tags": ["devices", "websocket"], "security": [],
        "description": f"`GET {path}` upgraded to a WebSocket becomes a device session: PROTOCOL.md sections 1 "
                       "and 8. Anything else is refused.",
        "parameters": headers,
        "responses": {"101": {"description": "switching protocols: the device session runs on this connection"},
                      "400": _error("not a WebSocket upgrade", "bad_request")}}}


def _paths(ops_protected: bool) -> Schema:
    lookup_security = [{"apiToken": []}, *([{"opsBearer": []}, {"opsBasic": []}] if ops_protected else [])]
    return {
        "/healthz": {"get": {"summary": "liveness", "tags": ["platform"], "security": [],
                             "responses": {"200": _json(_ref("Health"), "the worker runs")}}},
        "/readyz": {"get": {"summary": "readiness", "tags": ["platform"], "security": [], "responses": {
            "200": _json(_ref("Ready"), "the answering worker is connected to RabbitMQ"),
            "503": _json(_ref("Ready"), "the answering worker cannot reach RabbitMQ")}}},
        "/metrics": _ops_get("Prometheus metrics", "Prometheus text for the whole instance (every worker).",
                             {"text/plain": {"schema": {"type": "string"}}}, ops_protected),
        "/": _ops_get("the status page", "A self-contained HTML page: the instance's state, and a device lookup.",
                      {"text/html": {"schema": {"type": "string"}}}, ops_protected),
        "/status.json": _ops_get("the status page's figures", "What the status page polls.",
                                 {"application/json": {"schema": _ref("Status")}}, ops_protected),
        "/openapi.json": {"get": {"summary": "this document", "tags": ["platform"], "security": [],
                                  "responses": {"200": {"description": "OpenAPI 3.1", "content": {
                                      "application/json": {"schema": {"type": "object"}}}}}}},
        "/ws": _websocket("/ws", "JSON frames", None),
        "/mqtt": _websocket("/mqtt", "MQTT 3.1.1", "mqtt"),
        "/devices/{device}": {"get": {
            "summary": "is the device online, and where", "tags": ["operators"], "parameters": [_DEVICE],
            "security": lookup_security,
            "description": "Answered through RabbitMQ by whichever worker, on whichever host, holds the session; "
                           "at once when none does.",
            "responses": {"200": _json(_ref("DeviceInfo"), "the device's session"), "400": _BAD_DEVICE,
                          "401": _error("neither an API token nor an ops token", "unauthorized", challenge=True),
                          "404": _OFFLINE, "503": _UNAVAILABLE, "504": _ASK_TIMEOUT}}},
        "/devices/{device}/session": {"delete": {
            "summary": "end the device's session", "tags": ["operators"], "parameters": [_DEVICE],
            "security": [{"apiToken": []}],
            "description": "The session ends with error `kicked` (and its connection closes), wherever it is. "
                           "The device may connect again: to keep it out, ban it (PUT /devices/{device}/ban).",
            "responses": {"200": _json(_ref("Ended"), "the session ended"), "400": _BAD_DEVICE, "401": _API_401,
                          "404": _OFFLINE, "503": _UNAVAILABLE, "504": _ASK_TIMEOUT}}},
        "/devices/{device}/ban": {
            "put": {
                "summary": "ban the device everywhere", "tags": ["operators"], "parameters": [_DEVICE],
                "security": [{"apiToken": []}],
                "description": "Its live session, wherever it is, ends with `banned`, and its hellos are refused with "
                               "`banned` on every worker of every instance (within a second) until the ban ends "
                               "or is lifted. A second PUT replaces the ban. Answered once RabbitMQ stored it.",
                "requestBody": {"required": False, "content": {"application/json": {"schema": _ref("BanRequest")}}},
                "responses": {"200": _json(_ref("Ban"), "the ban, stored"),
                              "400": _error("the body or the device id is not as described", "bad_request"),
                              "401": _API_401, "413": _error("the body is over 65536 bytes", "too_large"),
                              "503": _error("RabbitMQ did not store the ban", "broker_unavailable")}},
            "delete": {
                "summary": "lift the device's ban", "tags": ["operators"], "parameters": [_DEVICE],
                "security": [{"apiToken": []}],
                "description": "The device may start a session anywhere within a second.",
                "responses": {"200": _json(_ref("Lifted"), "the ban is lifted"), "400": _BAD_DEVICE,
                              "401": _API_401, "404": _error("no ban of this device is in force", "not_banned"),
                              "503": _error("RabbitMQ did not store the lift", "broker_unavailable")}}},
        "/bans": {"get": {
            "summary": "every ban in force", "tags": ["operators"], "security": [{"apiToken": []}],
            "description": "Operators' bans and flapping detection's; revoked certificates are not listed.",
            "responses": {"200": _json(_ref("Bans"), "the bans in force"), "401": _API_401,
                          "503": _UNAVAILABLE}}},
        "/devices/{device}/commands": {"post": {
            "summary": "send a command and wait for the device's reply", "tags": ["devices"],
            "parameters": [_DEVICE], "security": [{"apiToken": []}],
            "description": "The command travels through RabbitMQ to whichever worker holds the device, and the "
                           "answer comes within `timeout`.",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("CommandRequest")}}},
            "responses": {
                "200": _json(_ref("CommandReply"), "the device replied"),
                "400": _error("the body or the device id is not as described", "bad_request"),
                "401": _API_401, "404": _OFFLINE,
                "413": _error("the body is over 65536 bytes", "too_large"),
                "503": _error("RabbitMQ did not take the command", "broker_unavailable"),
                "504": _error("no reply within the timeout, or the command expired on its way", "timeout")}}},
    }


def spec(ops_protected: bool) -> Schema:
    """The OpenAPI 3.1 document of this deployment's HTTP API."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "Warren", "version": "1",
                 "description": "The HTTP API of Warren, a gateway for long-lived device connections (the wire "
                                "contract's section 6). Every answer is JSON except `/metrics` and `/`; a method "
                                "a path does not list gets 405 with `Allow`."},
        "tags": [{"name": "devices"}, {"name": "operators"}, {"name": "platform"},
                 {"name": "websocket", "description": "upgrades to device sessions, not request and answer"}],
        "paths": _paths(ops_protected),
        "components": {"schemas": SCHEMAS, "securitySchemes": SECURITY_SCHEMES},
    }
