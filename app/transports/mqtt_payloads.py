"""MQTT payloads as session data, and the byte stream MQTT travels on (PROTOCOL.md sections 8 and 9).

Pure helpers of mqtt.py, the same for both protocol versions: what a PUBLISH's
bytes mean as an event's data or a command's reply.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson

from app.protocol import ProtocolError


class ByteStream(Protocol):
    """What MQTT is carried over: mqtt_streams.py's socket or WebSocket stream."""

    def recv(self) -> bytes | None: ...

    def send(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...


def payload_data(payload: bytes) -> Any:
    """An MQTT payload as event data: JSON if it is JSON, else its UTF-8 text, null when empty."""
    if not payload:
        return None
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        pass
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("bad_frame", "an event payload must be UTF-8 text or JSON", close=True) from None




def reply_frame(command_id: str, payload: bytes) -> dict[str, Any]:
    """A reply PUBLISH as the session's `reply` frame; `bad_frame` (closing) for a payload that is not one."""
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("ok"), bool):
        raise ProtocolError("bad_frame", 'a reply payload must be {"ok": true|false, ...}', close=True)
    error = body.get("error")
    if error is not None and not isinstance(error, str):
        raise ProtocolError("bad_frame", "a reply's error must be a string", close=True)
    return {"type": "reply", "id": command_id, "ok": body["ok"], "data": body.get("data"), "error": error}
