"""WebSocket on `GET /ws`: one JSON object per text message (PROTOCOL.md section 1).

Framing comes from wsproto, a sans-I/O library: it never touches the socket, so
the connection's own greenlet drives it and nothing else is needed for gevent.
The upgrade handshake is answered here (RFC 6455 section 4.2.2) because the HTTP
request was already parsed by gunicorn's server; wsproto then handles frames,
masking, fragmentation, ping/pong and the close handshake.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import orjson
from gevent import socket
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage
from wsproto.utilities import generate_accept_token

from app.protocol import ProtocolError, decode
from app.transports import Sender

RECV_BYTES = 16384


class HandshakeError(ValueError):
    """The request is not a WebSocket upgrade we can accept; answer it with HTTP 400."""


def accept_token(environ: Mapping[str, str]) -> bytes:
    """Check the upgrade request's headers and return its Sec-WebSocket-Accept value."""
    if environ.get("REQUEST_METHOD") != "GET":
        raise HandshakeError("a WebSocket upgrade must be a GET")
    if "websocket" not in environ.get("HTTP_UPGRADE", "").lower():
        raise HandshakeError("missing 'Upgrade: websocket'")
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION") != "13":
        raise HandshakeError("only WebSocket version 13 is supported")
    key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
    if not key:
        raise HandshakeError("missing Sec-WebSocket-Key")
    return generate_accept_token(key.encode("ascii", "replace"))


class WsConnection:
    """Text messages over an upgraded socket, as frames."""

    __slots__ = ("_max_frame", "_partial", "_partial_binary", "_sender", "_sock", "_ws", "certificate_names", "peer",
                 "transport")
    idle_limit = None  # 2 x heartbeat, the session's default
    backpressure = False  # over the rate limit, frames are refused with `rate_limited`

    def __init__(self, sock: socket.socket, peer: str, environ: Mapping[str, str],
                 max_frame_bytes: int, send_limit: int, already_read: bytes = b"",
                 transport: str = "ws", direct_writes: bool = True,
                 certificate_names: tuple[str, ...] = ()) -> None:
        self._sock = sock
        self.transport = transport
        self._sender = Sender(sock, send_limit, direct=direct_writes)
        self._max_frame = max_frame_bytes
        self._partial: list[str] = []
        self._partial_binary = False
        self.peer = peer
        self.certificate_names = certificate_names  # a verified TLS client certificate's device names
        token = accept_token(environ)
        self._sender.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + token + b"\r\n\r\n")
        self._ws = Connection(ConnectionType.SERVER, trailing_data=already_read)

    def receive(self) -> dict[str, Any] | None:
        """The next complete text message, decoded; None once closed."""
        payload = self.receive_payload()
        return None if payload is None else decode(payload)

    def receive_payload(self) -> bytes | None:
        """The next complete text message as UTF-8 bytes (the framing beneath `receive`); None once closed."""
        while True:
            for event in self._ws.events():
                if isinstance(event, CloseConnection):
                    if self._ws.state.name == "REMOTE_CLOSING":
                        self._sender.send(self._ws.send(event.response()))
                    return None
                if isinstance(event, Ping):
                    self._sender.send(self._ws.send(event.response()))
                elif isinstance(event, Message):
                    frame = self._on_message(event)
                    if frame is not None:
                        return frame
            if self._ws.state.name == "CLOSED":
                return None
            try:
                chunk = self._sock.recv(RECV_BYTES)
            except (ConnectionError, socket.cancel_wait_ex):
                chunk = b""  # cancel_wait_ex: cut by `abort` from another greenlet (see tcp.py)
            self._ws.receive_data(chunk or None)

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
        if self._ws.state.name == "OPEN":
            self._sender.send(text_frame(orjson.dumps(frame)))

    def accepts_command(self, name: str) -> bool:
        return True

    def send_command(self, frame: dict[str, Any], deadline: float) -> None:
        self.send(frame)

    def finish(self) -> None:
        if self._ws.state.name in {"OPEN", "REMOTE_CLOSING"}:
            self._sender.send(self._ws.send(CloseConnection(code=1000)))
        self._sender.finish()

    def close(self) -> None:
        if self._ws.state.name in {"OPEN", "REMOTE_CLOSING"}:
            self._sender.send(self._ws.send(CloseConnection(code=1000)))
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
