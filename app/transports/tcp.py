"""Raw TCP: one UTF-8 JSON object per line (PROTOCOL.md section 1)."""

from __future__ import annotations

from gevent import socket

from app.protocol import ProtocolError
from app.transports import Sender

RECV_BYTES = 16384


class TcpConnection:
    """Newline-delimited frames over a TCP socket; `\\r\\n` accepted."""

    transport = "tcp"
    __slots__ = ("_buffer", "_max_frame", "_sender", "_sock", "peer")

    def __init__(self, sock: socket.socket, peer: str, max_frame_bytes: int, send_limit: int) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._max_frame = max_frame_bytes
        self._sender = Sender(sock, send_limit)
        self.peer = peer

    def receive(self) -> bytes | None:
        """The next line without its line end; None when the peer closed."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                if line.endswith(b"\r"):
                    line = line[:-1]
                if len(line) > self._max_frame:
                    raise ProtocolError("frame_too_large", f"frames are limited to {self._max_frame} bytes")
                return line
            if len(self._buffer) > self._max_frame + 1:
                raise ProtocolError("frame_too_large", f"frames are limited to {self._max_frame} bytes")
            try:
                chunk = self._sock.recv(RECV_BYTES)
            except (ConnectionError, socket.cancel_wait_ex):
                # cancel_wait_ex: another greenlet cut this connection (`abort`, e.g. replaced or
                # shutting_down) while we were blocked reading: the end of the stream, not a crash.
                return None
            if not chunk:
                return None
            self._buffer += chunk

    def set_timeout(self, seconds: float | None) -> None:
        self._sock.settimeout(seconds)

    def send(self, frame: bytes) -> None:
        self._sender.send(frame + b"\n")

    def finish(self) -> None:
        self._sender.finish()

    def close(self) -> None:
        self._sender.flush(timeout=1.0)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
