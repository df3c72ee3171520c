"""JSON over WebSocket on `GET /ws`: one JSON object per text message (PROTOCOL.md section 1).

The upgrade and the close handshake are websocket.py's; wsproto does the framing.
"""

from __future__ import annotations

import struct
from typing import Any

import orjson
from gevent import socket
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage

from app.protocol import ProtocolError, decode
from app.transports.sender import Sender
from app.transports.sockets import read
from app.transports.websocket import Handshake, close_politely, upgrade

OPEN, REMOTE_CLOSING, CLOSED = ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING, ConnectionState.CLOSED


class JsonWebSocketConnection:
    """JSON frames as the text messages of an upgraded socket, plain (presence `ws`) or TLS (`wss`)."""

    __slots__ = ("_max_frame", "_partial", "_partial_binary", "_sender", "_sock", "_ws", "certificate_names", "peer",
                 "transport")
    idle_limit = None  # 2 x heartbeat, the session's default
    backpressure = False  # over the rate limit, frames are refused with `rate_limited`
    commands_flow = True  # from the welcome on (the session holds commands until then)

    def __init__(self, sock: socket.socket, peer: str, accepted: Handshake,
                 max_frame_bytes: int, send_limit: int, transport: str = "ws", direct_writes: bool = True,
                 certificate_names: tuple[str, ...] = ()) -> None:
        self._sock = sock
        self.transport = transport
        self._sender = Sender(sock, send_limit, direct=direct_writes)
        self._max_frame = max_frame_bytes
        self._partial: list[str] = []
        self._partial_binary = False
        self.peer = peer
        self.certificate_names = certificate_names  # a verified TLS client certificate's device names
        self._ws = upgrade(accepted, self._sender)

    def receive(self) -> dict[str, Any] | None:
        """The next complete text message, decoded; None once closed."""
        payload = self.receive_payload()
        return None if payload is None else decode(payload)

    def receive_payload(self) -> bytes | None:
        """The next complete text message as UTF-8 bytes (the framing beneath `receive`); None once closed."""
        while True:
            for event in self._ws.events():
                if isinstance(event, CloseConnection):
                    if self._ws.state is REMOTE_CLOSING:
                        self._sender.send(self._ws.send(event.response()))
                    return None
                if isinstance(event, Ping):
                    self._sender.send(self._ws.send(event.response()))
                elif isinstance(event, Message):
                    frame = self._on_message(event)
                    if frame is not None:
                        return frame
            if self._ws.state is CLOSED:
                return None
            self._ws.receive_data(read(self._sock) or None)

    def _on_message(self, event: Message) -> bytes | None:
        self._partial_binary |= isinstance(event, BytesMessage)
        if isinstance(event, TextMessage):
            self._partial.append(event.data)
        if sum(len(part) for part in self._partial) > self._max_frame:
            raise ProtocolError("frame_too_large", f"frames are limited to {self._max_frame} bytes")
        if not event.message_finished:
            return None
        text, binary = "".join(self._partial), self._partial_binary
        self._partial, self._partial_binary = [], False
        if binary:
            raise ProtocolError("bad_frame", "binary messages are not accepted; send text")
        payload = text.encode()
        if len(payload) > self._max_frame:
            raise ProtocolError("frame_too_large", f"frames are limited to {self._max_frame} bytes")
        return payload

    def send(self, frame: dict[str, Any]) -> None:
        if self._ws.state is OPEN:
            self._sender.send(text_frame(orjson.dumps(frame)))

    def accepts_command(self, name: str) -> bool:
        return True

    def finish(self) -> None:
        close_politely(self._ws, self._sender)
        self._sender.finish()

    def close(self) -> None:
        close_politely(self._ws, self._sender)
        self._sender.close()  # the socket itself belongs to the HTTP server, which closes it


def text_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked text message from the server (RFC 6455 section 5.2).

    Built here rather than through wsproto's `send(TextMessage)`, which wants a str and
    re-encodes it: a frame the hot path writes thousands of times a second.
    """
    length = len(payload)
    if length < 126:
        return bytes((0x81, length)) + payload
    if length < 65536:
        return struct.pack("!BBH", 0x81, 126, length) + payload
    return struct.pack("!BBQ", 0x81, 127, length) + payload
