"""MQTT's byte stream, over a socket or over a WebSocket's binary messages.

MQTT over WebSocket (MQTT 3.1.1 section 6) carries the same byte stream as TCP
in binary messages: a packet may span messages, a message may hold several. So
the MQTT transport (mqtt.py) reads and writes bytes through either of these two
and does not care which carries them.
"""

from __future__ import annotations

from gevent import socket
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from app.protocol import ProtocolError
from app.transports.sender import Sender
from app.transports.sockets import read
from app.transports.websocket import MAY_SEND_CLOSE, Handshake, close_politely, upgrade

ENDED = (ConnectionState.CLOSED, ConnectionState.LOCAL_CLOSING)


class MqttSocketStream:
    """MQTT bytes straight over a connected socket, plain (`mqtt`) or TLS (`mqtts`)."""

    __slots__ = ("_sender", "_sock")

    def __init__(self, sock: socket.socket, send_limit: int, direct_writes: bool = True) -> None:
        self._sock = sock
        self._sender = Sender(sock, send_limit, direct=direct_writes)

    def recv(self) -> bytes | None:
        """Whatever bytes arrived next; None once the peer is gone (or another greenlet cut us)."""
        return read(self._sock) or None

    def send(self, data: bytes) -> None:
        self._sender.send(data)

    def finish(self) -> None:
        self._sender.finish()

    def close(self) -> None:
        self._sender.close()
        self._sock.close()


class MqttWebSocketStream:
    """MQTT bytes as the binary messages of an upgraded WebSocket (`mqtt-ws`, `mqtt-wss`); wsproto does the framing."""

    __slots__ = ("_failure", "_sender", "_sock", "_ws")

    def __init__(self, sock: socket.socket, accepted: Handshake, send_limit: int,
                 direct_writes: bool = True) -> None:
        self._sock = sock
        self._sender = Sender(sock, send_limit, direct=direct_writes)
        # wsproto hands over each frame's data as it arrives (never a whole message buffered), and
        # the MQTT decoder bounds packets: a huge message costs no more than its packets may.
        self._ws = upgrade(accepted, self._sender)
        self._failure: ProtocolError | None = None  # frames wsproto could not parse, raised once what came before is read

    def recv(self) -> bytes | None:
        """The bytes of the next binary message part(s); None once closed."""
        while True:
            data = b"".join(self._drain_events())
            if data:
                return data
            if self._failure is not None:
                raise self._failure
            if self._ws.state in ENDED:
                return None
            self._ws.receive_data(read(self._sock) or None)

    def _drain_events(self) -> list[bytes]:
        parts: list[bytes] = []
        for event in self._ws.events():
            if isinstance(event, CloseConnection):
                if self._ws.state is ConnectionState.OPEN:  # not the peer's close: wsproto failed to parse its frames
                    self._failure = ProtocolError("bad_frame", f"WebSocket: {event.reason}", close=True)
                if self._ws.state in MAY_SEND_CLOSE:
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
        if self._ws.state is ConnectionState.OPEN:
            self._sender.send(self._ws.send(BytesMessage(data=data)))

    def finish(self) -> None:
        close_politely(self._ws, self._sender)
        self._sender.finish()

    def close(self) -> None:
        close_politely(self._ws, self._sender)
        self._sender.close()  # the socket itself belongs to the HTTP server, which closes it
