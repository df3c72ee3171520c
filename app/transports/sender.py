"""The bounded, non-blocking outgoing buffer every transport writes through."""

from __future__ import annotations

import ssl

import gevent
from gevent import socket

from app.transports.sockets import abort

WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError)


class Sender:
    """A bounded, non-blocking outgoing buffer that writes straight to the socket when it can.

    Why: acks and commands are written from the broker's greenlets, which must
    never wait on one slow device. Most frames fit the kernel's send buffer, so
    they go out at once in the caller, with no greenlet; only when the kernel
    takes part of a frame (a slow reader, a burst) does a writer greenlet carry
    the rest, and frames queue behind it in order. A device that stops reading
    fills its buffer; past `limit` bytes the connection is cut, so one device
    cannot grow the worker.

    `direct=False` always uses the writer greenlet: gevent's TLS sockets wait for
    room instead of answering "would block", so they cannot be tried in the caller.
    """

    __slots__ = ("_direct", "_finishing", "_limit", "_queue", "_queued", "_sock", "_writer", "overflowed")

    def __init__(self, sock: socket.socket, limit: int, direct: bool = True) -> None:
        self._sock = sock
        self._queue: list[bytes] = []  # a deque would cost 760 bytes per idle connection
        self._queued = 0
        self._limit = limit
        self._direct = direct
        self._writer: gevent.Greenlet | None = None
        self.overflowed = False
        self._finishing = False

    def send(self, data: bytes) -> None:
        if self.overflowed:
            return
        if self._writer is None and self._direct:
            data = self._try_now(data)
            if not data:
                return
        self._queue.append(data)
        self._queued += len(data)
        if self._queued > self._limit:
            self._fail()
            return
        if self._writer is None:
            self._writer = gevent.spawn(self._flush)

    def _try_now(self, data: bytes) -> bytes:
        """Write what the kernel takes without waiting; return the rest (b"" when all went)."""
        try:
            sent = self._sock.send(data, 0, 0.0)  # gevent: timeout 0.0 raises instead of waiting
        except WOULD_BLOCK:
            return data
        except OSError:
            self._fail()
            return b""
        return data[sent:] if sent < len(data) else b""

    def _fail(self) -> None:
        self.overflowed = True
        self._queue.clear()
        abort(self._sock)

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

    def close(self, timeout: float = 1.0) -> None:
        """Flush for up to `timeout`, then cut the connection; closing the socket is its owner's business."""
        self.flush(timeout)
        abort(self._sock)
