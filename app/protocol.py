"""The device wire format of PROTOCOL.md: frame validation and the frames the server sends.

Pure functions over bytes and dicts, so they can be fuzzed without a socket.
`decode` turns a payload into a frame, `validate_hello` and `validate` check
one; each either returns or raises `ProtocolError` carrying the error code
the device will see.

Two extensions beyond PROTOCOL.md (README, "Protocol extensions"), which MQTT
needs and JSON devices may use too: a hello may carry a `will`
(`{"name": <event name>, "data": ...}`, published as that event when the
session ends without a goodbye), and `{"type": "bye"}` ends a session cleanly
(presence reason `closed`, no will), as MQTT's DISCONNECT does.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

PROTOCOL_VERSION = 1

DEVICE_ID = re.compile(r"[A-Za-z0-9_:\-]{1,128}")
EVENT_NAME = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")
MAX_EVENT_ID = 64
MAX_EVENT_NAME = 120
# orjson reads JSON nested 1024 deep but writes at most 254 levels; `data` is written
# inside an envelope, so deeper data could be read but not published (a crash, not an answer).
MAX_DATA_DEPTH = 200

# Error codes of PROTOCOL.md section 4, and whether each one ends the session.
CLOSING_ERRORS = frozenset({
    "frame_too_large", "unauthorized", "unsupported_version", "hello_timeout",
    "idle_timeout", "replaced", "overloaded", "shutting_down", "kicked", "banned",
})
ERROR_CODES = CLOSING_ERRORS | {"bad_frame", "unknown_command", "rate_limited"}


class ProtocolError(Exception):
    """Something a device sent that breaks the contract; `code` is what it is told."""

    def __init__(self, code: str, message: str, frame_id: Any = None, close: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.frame_id = frame_id
        self._close = close

    @property
    def closes(self) -> bool:
        """Whether the session ends: always for the closing codes, and when the transport says so
        (an MQTT connection has no way to say `bad_frame` and carry on)."""
        return self._close or self.code in CLOSING_ERRORS


def decode(payload: bytes | str) -> dict[str, Any]:
    """Turn one frame's payload into a JSON object, or raise `bad_frame`."""
    try:
        frame = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("bad_frame", f"not JSON: {exc}") from None
    if not isinstance(frame, dict):
        raise ProtocolError("bad_frame", "a frame must be a JSON object")
    return frame


def _string(frame: dict[str, Any], field: str, max_len: int, required: bool = True) -> str | None:
    value = frame.get(field)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= max_len:
        raise ProtocolError(
            "bad_frame", f"'{field}' must be a string of 1-{max_len} characters",
            _frame_id(frame))
    return value


def _frame_id(frame: dict[str, Any]) -> Any:
    value = frame.get("id")
    return value if isinstance(value, str) else None


def validate_hello(frame: dict[str, Any]) -> tuple[str, str | None]:
    """Return (device, token) of a valid hello; the caller answers `unauthorized` otherwise.

    The token is checked for shape only, and may be absent (None): a device named by a verified
    TLS client certificate needs none (the session decides). A hello with a `will` must also pass
    `validate_will`.
    """
    if frame.get("type") != "hello":
        raise ProtocolError("unauthorized", "the first frame must be a hello")
    version = frame.get("v", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ProtocolError("unsupported_version", f"protocol version {version!r} is not supported")
    device, token = frame.get("device"), frame.get("token")
    if not isinstance(device, str) or not DEVICE_ID.fullmatch(device):
        raise ProtocolError("unauthorized", "'device' must be 1-128 characters of A-Z a-z 0-9 _ : -")
    if token is not None and (not isinstance(token, str) or not token):
        raise ProtocolError("unauthorized", "'token' must be a non-empty string")
    return device, token


def validate_will(frame: dict[str, Any]) -> tuple[str, Any] | None:
    """(event name, data) of a hello's `will`, None without one; `unauthorized` when it is not valid."""
    will = frame.get("will")
    if will is None:
        return None
    if not isinstance(will, dict):
        raise ProtocolError("unauthorized", "'will' must be an object {name, data}")
    try:
        _event_name(will, None)
        _check_depth(will, "data")
    except ProtocolError as exc:
        raise ProtocolError("unauthorized", f"will: {exc.message}") from None
    return will["name"], will.get("data")


def _event_name(frame: dict[str, Any], frame_id: Any) -> str:
    name = _string(frame, "name", MAX_EVENT_NAME)
    if not EVENT_NAME.fullmatch(name):
        raise ProtocolError("bad_frame", "'name' must be dot-separated words of A-Z a-z 0-9 _ -", frame_id)
    if name == "session" or name.startswith("session."):
        raise ProtocolError("bad_frame", "event names starting with 'session.' are reserved", frame_id)
    return name


def validate(frame: dict[str, Any]) -> dict[str, Any]:
    """Check a post-welcome frame's fields by type; raise `bad_frame` naming the problem."""
    kind = frame.get("type")
    if kind == "ping" or kind == "bye":
        return frame
    if kind == "event":
        _string(frame, "id", MAX_EVENT_ID)
        _event_name(frame, frame["id"])
        _check_depth(frame, "data")
        return frame
    if kind == "reply":
        _string(frame, "id", 256)
        if not isinstance(frame.get("ok"), bool):
            raise ProtocolError("bad_frame", "'ok' must be true or false", frame["id"])
        if frame.get("error") is not None and not isinstance(frame["error"], str):
            raise ProtocolError("bad_frame", "'error' must be a string", frame["id"])
        _check_depth(frame, "data")
        return frame
    if kind == "hello":
        raise ProtocolError("bad_frame", "this session has already said hello")
    if not isinstance(kind, str):
        raise ProtocolError("bad_frame", "'type' must be a string", _frame_id(frame))
    raise ProtocolError("bad_frame", f"unknown frame type {kind[:64]!r}", _frame_id(frame))


def _check_depth(frame: dict[str, Any], field: str) -> None:
    """`bad_frame` when frame[field] nests lists/objects deeper than MAX_DATA_DEPTH."""
    level: list[Any] = [frame.get(field)]
    for _depth in range(MAX_DATA_DEPTH):
        level = [child for value in level if isinstance(value, (dict, list))
                 for child in (value.values() if isinstance(value, dict) else value)]
        if not level:
            return
    if any(isinstance(value, (dict, list)) for value in level):
        raise ProtocolError("bad_frame", f"'{field}' is nested more than {MAX_DATA_DEPTH} levels deep",
                            _frame_id(frame))


def error(code: str, message: str | None = None, frame_id: Any = None,
          retry_after: float | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "code": code}
    if message:
        frame["message"] = message
    frame["id"] = frame_id
    if retry_after is not None:
        frame["retry_after"] = round(retry_after, 1)
    return frame
