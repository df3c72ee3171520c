"""Byte streams for transports whose framing is their own (MQTT): a socket, or a WebSocket's binary messages.

MQTT over WebSocket (MQTT 3.1.1 section 6) carries the same byte stream as TCP
in binary messages: a packet may span messages, a message may hold several. So
the MQTT transport reads and writes bytes and does not care which of these two
carries them.
"""

from __future__ import annotations

from collections.abc import Mapping

from gevent import socket
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from app.protocol import ProtocolError
from app.transports import Sender
from app.transports.ws import HandshakeError, accept_token

RECV_BYTES = 16384


class SocketStream:
    """A connected socket's bytes, with the shared bounded `Sender` for writes."""

    __slots__ = ("_sender", "_sock")

    def __init__(self, sock: socket.socket, send_limit: int, direct_writes: bool = True) -> None:
        self._sock = sock
        self._sender = Sender(sock, send_limit, direct=direct_writes)

    def recv(self) -> bytes | None:
        """Whatever bytes arrived next; None once the peer is gone (or another greenlet cut us)."""
        try:
            return self._sock.recv(RECV_BYTES) or None
        except (ConnectionError, socket.cancel_wait_ex):
            return None

    def send(self, data: bytes) -> None:
        self._sender.send(data)

    def finish(self) -> None:
        self._sender.finish()

    def close(self) -> None:
        self._sender.close()
        self._sock.close()


def mqtt_subprotocol(environ: Mapping[str, str]) -> None:
    """A WebSocket upgrade for MQTT must offer the `mqtt` subprotocol (MQTT 3.1.1 section 6)."""
    offered = [item.strip() for item in environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "").split(",")]
    if "mqtt" not in offered:
        raise HandshakeError("an MQTT WebSocket upgrade must offer the subprotocol 'mqtt'")


class WebSocketStream:
    """The binary messages of an upgraded WebSocket, as one byte stream (wsproto does the framing)."""

    __slots__ = ("_failure", "_sender", "_sock", "_ws")

    def __init__(self, sock: socket.socket, environ: Mapping[str, str], send_limit: int,
                 direct_writes: bool = True) -> None:
        mqtt_subprotocol(environ)
        token = accept_token(environ)
        self._sock = sock
        self._sender = Sender(sock, send_limit, direct=direct_writes)
        self._sender.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Protocol: mqtt\r\nSec-WebSocket-Accept: " + token + b"\r\n\r\n")
        # wsproto hands over each frame's data as it arrives (never a whole message buffered), and
        # the MQTT decoder bounds packets: a huge message costs no more than its packets may.
        self._ws = Connection(ConnectionType.SERVER)
        self._failure: ProtocolError | None = None  # frames wsproto could not parse, raised once what came before is read

    def recv(self) -> bytes | None:
        """The bytes of the next binary message part(s); None once closed."""
        while True:
            data = b"".join(self._drain_events())
            if data:
                return data
            if self._failure is not None:
                raise self._failure
            if self._ws.state.name in {"CLOSED", "LOCAL_CLOSING"}:
                return None
            try:
                chunk = self._sock.recv(RECV_BYTES)
            except (ConnectionError, socket.cancel_wait_ex):
                chunk = b""
            self._ws.receive_data(chunk or None)

    def _drain_events(self) -> list[bytes]:
        parts: list[bytes] = []
        for event in self._ws.events():
            if isinstance(event, CloseConnection):
                if self._ws.state.name == "OPEN":  # not the peer's close: wsproto failed to parse its frames
                    self._failure = ProtocolError("bad_frame", f"WebSocket: {event.reason}", close=True)
                if self._ws.state.name in {"OPEN", "REMOTE_CLOSING"}:
                    self._sender.send(self._ws.send(event.response()))
                break
            if isinstance(event, Ping):
                self._sender.send(self._ws.send(event.response()))
            elif isinstance(event, TextMessage):
                raise ProtocolError("bad_frame", "MQTT over WebSocket travels in binary messages", close=True)
            elif isinstance(event, BytesMessage):
                parts.append(bytes(event.data))
        return parts

    def send(self, data: bytes) -> None:
        if self._ws.state.name == "OPEN":
            self._sender.send(self._ws.send(BytesMessage(data=data)))

    def finish(self) -> None:
        self._close_politely()
        self._sender.finish()

    def close(self) -> None:
        self._close_politely()
        self._sender.close()  # the socket itself belongs to the HTTP server, which closes it

    def _close_politely(self) -> None:
        if self._ws.state.name in {"OPEN", "REMOTE_CLOSING"}:
            self._sender.send(self._ws.send(CloseConnection(code=1000)))
