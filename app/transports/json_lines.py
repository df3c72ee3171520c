"""JSON lines: one UTF-8 JSON object per line over a stream socket, plain TCP or TLS (PROTOCOL.md section 1)."""

from __future__ import annotations

from typing import Any

import orjson
from gevent import socket

from app.protocol import ProtocolError, decode
from app.sessions.ports import NO_PRESENCE
from app.transports.sender import Sender
from app.transports.sockets import read


class JsonLinesConnection:
    """Newline-delimited JSON frames over a socket, plain (presence `tcp`) or TLS (`tls`); `\\r\\n` accepted."""

    __slots__ = ("_buffer", "_max_frame", "_sender", "_sock", "certificate_names", "peer", "transport")
    idle_limit = None  # 2 x heartbeat, the session's default
    backpressure = False  # over the rate limit, frames are refused with `rate_limited`
    will_delay = 0.0  # a will goes out as the session ends
    timed_commands = False  # a command frame is as PROTOCOL.md section 4 writes it
    presence = NO_PRESENCE
    commands_flow = True  # from the welcome on (the session holds commands until then)

    def __init__(self, sock: socket.socket, peer: str, max_frame_bytes: int, send_limit: int,
                 transport: str = "tcp", direct_writes: bool = True,
                 certificate_names: tuple[str, ...] = ()) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._max_frame = max_frame_bytes
        self._sender = Sender(sock, send_limit, direct=direct_writes)
        self.peer = peer
        self.certificate_names = certificate_names  # a verified TLS client certificate's device names
        self.transport = transport

    def receive(self) -> dict[str, Any] | None:
        """The next frame, decoded; None when the peer closed."""
        line = self.receive_payload()
        return None if line is None else decode(line)

    def receive_payload(self) -> bytes | None:
        """The next line without its line end (the framing beneath `receive`); None when the peer closed."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return self._checked(line)
            if len(self._buffer) > self._max_frame + 1:
                raise ProtocolError("frame_too_large", f"frames are limited to {self._max_frame} bytes")
            chunk = read(self._sock)
            if not chunk:
                return None
            if not self._buffer and chunk.find(b"\n") == len(chunk) - 1:
                return self._checked(chunk[:-1])  # most reads hold exactly one whole frame: no copy
            self._buffer += chunk

    def _checked(self, line: bytes) -> bytes:
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self._max_frame:
            raise ProtocolError("frame_too_large", f"frames are limited to {self._max_frame} bytes")
        return line

    def send(self, frame: dict[str, Any]) -> None:
        self._sender.send(orjson.dumps(frame, option=orjson.OPT_APPEND_NEWLINE))

    def command_refusal(self, command_id: str, name: str, data: Any) -> str | None:
        return None  # any command a backend may send fits a JSON frame

    def finish(self) -> None:
        self._sender.finish()

    def close(self) -> None:
        self._sender.close()
        self._sock.close()
