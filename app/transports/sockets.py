"""The two socket calls every transport shares: `read` the next bytes, `abort` a connection from any greenlet."""

from __future__ import annotations

from gevent import socket

RECV_BYTES = 16384


def read(sock: socket.socket, size: int = RECV_BYTES) -> bytes:
    """Up to `size` bytes as they arrive; b"" once the peer is gone, however it went."""
    try:
        return sock.recv(size)
    except (ConnectionError, socket.cancel_wait_ex):
        # cancel_wait_ex: another greenlet cut this connection (`abort`, e.g. replaced or
        # shutting_down) while we were blocked reading: the end of the stream, not a crash.
        return b""


def abort(sock: socket.socket) -> None:
    """Cut a connection so that a greenlet blocked reading it wakes up at once."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
