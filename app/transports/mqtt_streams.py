"""MQTT's byte stream, over a socket or over a WebSocket's binary messages.

MQTT over WebSocket (MQTT 3.1.1 section 6) carries the same byte stream as TCP
in binary messages: a packet may span messages, a message may hold several. So
the MQTT transport (mqtt.py) reads and writes bytes through either of these two
and does not care which carries them.
"""

from __future__ import annotations

from gevent import socket

from app.protocol import ProtocolError
from app.transports import ws_frames
from app.transports.sender import Sender
from app.transports.sockets import read
from app.transports.websocket import Handshake, WebSocket

NO_LIMIT = 1 << 62  # binary messages are MQTT's byte stream: its decoder bounds what is kept


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
    """MQTT bytes as the binary messages of an upgraded WebSocket (`mqtt-ws`, `mqtt-wss`); websocket.py does the rest."""

    __slots__ = ("_ws",)

    def __init__(self, sock: socket.socket, accepted: Handshake, send_limit: int,
                 direct_writes: bool = True) -> None:
        # Binary messages are handed up piece by piece as they arrive (never a whole message
        # buffered), and the MQTT decoder bounds packets: a huge message costs no more than its
        # packets may, so the WebSocket layer sets no message limit of its own.
        self._ws = WebSocket(sock, Sender(sock, send_limit, direct=direct_writes), accepted, NO_LIMIT,
                             stream_binary=True)

    def recv(self) -> bytes | None:
        """The bytes of the next binary message part(s); None once closed."""
        try:
            messages = self._ws.receive()
        except ws_frames.ProtocolError as exc:
            raise ProtocolError("bad_frame", f"WebSocket: {exc.message}", close=True) from None
        if messages is None:
            return None
        for message in messages:
            if type(message) is ws_frames.Text:
                raise ProtocolError("bad_frame", "MQTT over WebSocket travels in binary messages", close=True)
        return messages[0].payload if len(messages) == 1 else b"".join([message.payload for message in messages])

    def send(self, data: bytes) -> None:
        self._ws.send(ws_frames.binary(data))

    def finish(self) -> None:
        self._ws.finish()

    def close(self) -> None:
        self._ws.close()
