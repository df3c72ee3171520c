"""JSON over WebSocket on `GET /ws`: one JSON object per text message (PROTOCOL.md section 1).

websocket.py does the upgrade, the frames and the control frames; this module only
turns text messages into frames and frames into text messages, as json_lines.py does
with lines.
"""

from __future__ import annotations

from typing import Any

import orjson
from gevent import socket

from app.protocol import ProtocolError, decode
from app.sessions.ports import NO_PRESENCE
from app.transports import ws_frames
from app.transports.sender import Sender
from app.transports.websocket import Handshake, Message, WebSocket

TOO_BIG = 1009  # RFC 6455's "message too big": our `frame_too_large`


class JsonWebSocketConnection:
    """JSON frames as the text messages of an upgraded socket, plain (presence `ws`) or TLS (`wss`)."""

    __slots__ = ("_max_frame", "_queued", "_ws", "certificate_names", "peer", "transport")
    idle_limit = None  # 2 x heartbeat, the session's default
    backpressure = False  # over the rate limit, frames are refused with `rate_limited`
    will_delay = 0.0  # a will goes out as the session ends
    timed_commands = False  # a command frame is as PROTOCOL.md section 4 writes it
    presence = NO_PRESENCE
    commands_flow = True  # from the welcome on (the session holds commands until then)

    def __init__(self, sock: socket.socket, peer: str, accepted: Handshake,
                 max_frame_bytes: int, send_limit: int, transport: str = "ws", direct_writes: bool = True,
                 certificate_names: tuple[str, ...] = ()) -> None:
        self.transport = transport
        self._max_frame = max_frame_bytes
        self._queued: list[Message] | None = None  # messages read together with the one handed up
        self.peer = peer
        self.certificate_names = certificate_names  # a verified TLS client certificate's device names
        self._ws = WebSocket(sock, Sender(sock, send_limit, direct=direct_writes), accepted, max_frame_bytes)

    def receive(self) -> dict[str, Any] | None:
        """The next complete text message, decoded; None once closed."""
        payload = self.receive_payload()
        return None if payload is None else decode(payload)

    def receive_payload(self) -> bytes | None:
        """The next complete text message as UTF-8 bytes (the framing beneath `receive`); None once closed."""
        queued = self._queued
        if not queued:
            try:
                queued = self._ws.receive()
            except ws_frames.ProtocolError as exc:
                if exc.code == TOO_BIG:
                    raise ProtocolError("frame_too_large", f"frames are limited to {self._max_frame} bytes") from None
                return None  # bytes that are no WebSocket: the close frame says why (1002, 1007), the session ends
            if queued is None:
                return None
        message = queued.pop(0)
        self._queued = queued or None
        if type(message) is ws_frames.Binary:
            raise ProtocolError("bad_frame", "binary messages are not accepted; send text")
        return message.payload

    def send(self, frame: dict[str, Any]) -> None:
        self._ws.send(ws_frames.text(orjson.dumps(frame)))

    def command_refusal(self, command_id: str, name: str, data: Any) -> str | None:
        return None  # any command a backend may send fits a JSON frame

    def finish(self) -> None:
        self._ws.finish()

    def close(self) -> None:
        self._ws.close()
