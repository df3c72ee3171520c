"""Device transports: they turn a socket into frames and know nothing of sessions or RabbitMQ.

A transport offers a `FrameConnection`: `receive()` returns one frame's payload
(or None once the peer is gone), `send()` queues one frame without blocking, and
`finish()` cuts the connection once what is queued is written (without
blocking its caller), and `close()` flushes briefly and closes. Both transports share `Sender`, the bounded
outgoing buffer.
"""

from __future__ import annotations

from typing import Protocol

import gevent
from gevent import socket


class FrameConnection(Protocol):
    transport: str
    peer: str

    def receive(self) -> bytes | None: ...

    def set_timeout(self, seconds: float | None) -> None: ...

    def send(self, frame: bytes) -> None: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...


class Sender:
    """A bounded, non-blocking outgoing buffer with a writer greenlet that exists only while busy.

    Why: acks and commands are written from the broker's greenlets, which must
    never wait on one slow device. A device that stops reading fills its buffer;
    past `limit` bytes the connection is cut, so one device cannot grow the worker.
    """

    __slots__ = ("_finishing", "_limit", "_queue", "_queued", "_sock", "_writer", "overflowed")

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self._sock = sock
        self._queue: list[bytes] = []  # a deque would cost 760 bytes per idle connection
        self._queued = 0
        self._limit = limit
        self._writer: gevent.Greenlet | None = None
        self.overflowed = False
        self._finishing = False

    def send(self, data: bytes) -> None:
        if self.overflowed:
            return
        self._queue.append(data)
        self._queued += len(data)
        if self._queued > self._limit:
            self.overflowed = True
            self._queue.clear()
            abort(self._sock)
            return
        if self._writer is None:
            self._writer = gevent.spawn(self._flush)

    def _flush(self) -> None:
        try:
            while self._queue:
                data = b"".join(self._queue)
                self._queue.clear()
                self._sock.sendall(data)
                self._queued -= len(data)
        except OSError:
            self.overflowed = True
            abort(self._sock)
        finally:
            self._writer = None
            if self._finishing:
                abort(self._sock)

    def finish(self) -> None:
        """Cut the connection after the queued bytes are written; never blocks."""
        self._finishing = True
        if self._writer is None:
            abort(self._sock)

    def flush(self, timeout: float) -> None:
        """Wait up to `timeout` for what is queued to reach the kernel (before a close)."""
        writer = self._writer
        if writer is not None:
            writer.join(timeout)


def abort(sock: socket.socket) -> None:
    """Cut a connection so that a greenlet blocked reading it wakes up at once."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
