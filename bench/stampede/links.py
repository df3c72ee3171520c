"""Framing for the device transports of PROTOCOL.md section 1: JSON lines, JSON over WebSocket, MQTT, MQTT over WebSocket.

A link owns a connected socket and turns it into whole messages in both
directions, so a device never sees the transport: JSON payloads as bytes for the
JSON links, packets (bench.stampede.mqtt_codec's tuples) in and packet bytes out
for the MQTT links. `tls://` and `wss://` targets wrap the socket in gevent's TLS
before the link sees it, offering the device's previous session (its ticket) so
that a reconnect can resume instead of paying a full handshake.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Protocol
from urllib.parse import urlsplit

from gevent import ssl
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

from bench.stampede import mqtt5_codec, mqtt_codec

RECV_BYTES = 65536
DEFAULT_PATHS = {"ws": "/ws", "wss": "/ws", "mqtt+ws": "/mqtt", "mqtt5+ws": "/mqtt"}
SCHEMES = ("tcp", "tls", "ws", "wss", "mqtt", "mqtt+ws", "mqtt5", "mqtt5+ws")
TLS_SCHEMES = ("tls", "wss")
# Linux socket option: pick the source port at connect(), not bind(), so one
# source address can reuse a port towards different destinations.
IP_BIND_ADDRESS_NO_PORT = 24


Parser = Callable[[bytes], tuple[list[mqtt_codec.Packet], bytes]]


class LinkClosed(Exception):
    """The peer closed the connection (or refused the WebSocket upgrade)."""


class HandshakeFailed(Exception):
    """The TCP connection was made but the TLS handshake failed; `reason` is what gets counted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def client_context(cafile: str | None, verify: bool = True) -> ssl.SSLContext:
    """The devices' TLS context: trusting `cafile` (or the system's CAs), or verifying nothing when not `verify`."""
    context = ssl.create_default_context(cafile=cafile)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Link(Protocol):
    sock: socket.socket

    def handshake(self) -> None: ...
    def send(self, payload: bytes) -> None: ...
    def receive(self) -> list: ...


class Target:
    """Where devices connect: `tcp://host:port`, `tls://host:port`, `ws[s]://host:port/path`, `mqtt://host:port`,
    `mqtt+ws://host:port/path` (MQTT 3.1.1; `mqtt5://`, `mqtt5+ws://` for MQTT 5.0); the TLS schemes need `tls`
    (the client context)."""

    def __init__(self, url: str, tls: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES or not parts.hostname or not parts.port:
            raise ValueError(f"target {url!r} must look like tcp://host:7878, tls://host:7879, ws://host:8000/ws, "
                             "wss://host:8443/ws, mqtt[5]://host:1883 or mqtt[5]+ws://host:8000/mqtt")
        if parts.scheme in TLS_SCHEMES and tls is None:
            raise ValueError(f"target {url!r} speaks TLS: give it a client context")
        self.url = url
        self.tls = tls if parts.scheme in TLS_SCHEMES else None
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port
        self.path = parts.path or DEFAULT_PATHS.get(parts.scheme, "/")

    @property
    def mqtt(self) -> bool:
        """Whether devices speak MQTT here (PROTOCOL.md section 8) rather than JSON frames."""
        return self.scheme.startswith("mqtt")

    @property
    def mqtt_level(self) -> int:
        """The MQTT protocol level devices speak here: 5 for `mqtt5://` and `mqtt5+ws://`, else 4 (3.1.1)."""
        return 5 if self.scheme.startswith("mqtt5") else 4

    def open(self, source: str, timeout: float, session: ssl.SSLSession | None = None) -> Link:
        """Connect from `source` (an address of this host) and return the matching link; over TLS, offer
        `session` for resumption (HandshakeFailed if the handshake fails, OSError if the connect does)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
            sock.settimeout(timeout)
            sock.connect((self.host, self.port))
            if self.tls is not None:
                sock = self.secure(sock, session)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        if self.scheme in ("tcp", "tls"):
            return TcpLink(sock)
        parse = mqtt5_codec.parse if self.mqtt_level == 5 else mqtt_codec.parse
        if self.scheme in ("mqtt", "mqtt5"):
            return MqttLink(sock, parse)
        if self.scheme in ("mqtt+ws", "mqtt5+ws"):
            return MqttWsLink(sock, f"{self.host}:{self.port}", self.path, parse)
        return WsLink(sock, f"{self.host}:{self.port}", self.path)

    def secure(self, sock: socket.socket, session: ssl.SSLSession | None) -> ssl.SSLSocket:
        """The TLS handshake on a connected socket (within its timeout), offering `session` when it has one."""
        assert self.tls is not None
        try:
            return self.tls.wrap_socket(sock, server_hostname=self.host, session=session)
        except ssl.SSLError as exc:
            raise HandshakeFailed(f"tls:{(exc.reason or type(exc).__name__).lower()}") from None
        except TimeoutError:
            raise HandshakeFailed("tls:handshake_timeout") from None
        except OSError as exc:
            raise HandshakeFailed(f"tls:{type(exc).__name__.lower()}") from None


def upgrade(sock: socket.socket, ws: WSConnection, request: Request) -> None:
    """Send the WebSocket upgrade request and wait for the server to accept it."""
    sock.sendall(ws.send(request))
    while True:
        data = sock.recv(RECV_BYTES)
        if not data:
            raise LinkClosed("eof during upgrade")
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                return
            if isinstance(event, RejectConnection):
                raise LinkClosed(f"upgrade refused ({event.status_code})")


class TcpLink:
    """One JSON object per line."""

    __slots__ = ("pending", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending = b""

    def handshake(self) -> None:
        """Plain TCP has nothing to negotiate."""

    def send(self, payload: bytes) -> None:
        self.sock.sendall(payload + b"\n")

    def receive(self) -> list[bytes]:
        data = self.sock.recv(RECV_BYTES)
        if not data:
            raise LinkClosed("eof")
        *lines, self.pending = (self.pending + data).split(b"\n")
        return [line.rstrip(b"\r") for line in lines if line.strip()]


class WsLink:
    """One JSON object per WebSocket text message (wsproto does the framing)."""

    __slots__ = ("host", "partial", "path", "sock", "ws")

    def __init__(self, sock: socket.socket, host: str, path: str) -> None:
        self.sock = sock
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.host = host
        self.path = path
        self.partial = ""

    def handshake(self) -> None:
        upgrade(self.sock, self.ws, Request(host=self.host, target=self.path))

    def send(self, payload: bytes) -> None:
        self.sock.sendall(self.ws.send(TextMessage(data=payload.decode())))

    def receive(self) -> list[bytes]:
        data = self.sock.recv(RECV_BYTES)
        self.ws.receive_data(data or None)
        frames = []
        for event in self.ws.events():
            if isinstance(event, TextMessage):
                self.partial += event.data
                if event.message_finished:
                    frames.append(self.partial.encode())
                    self.partial = ""
            elif isinstance(event, Ping):
                self.sock.sendall(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                raise LinkClosed("websocket close")
        if not data:
            raise LinkClosed("eof")
        return frames


class MqttLink:
    """MQTT packets straight on the socket; `pending` is an unfinished packet's bytes (b"" almost always);
    `parse` is the packet parser of the protocol level (mqtt_codec.parse or mqtt5_codec.parse)."""

    __slots__ = ("parse", "pending", "sock")

    def __init__(self, sock: socket.socket, parse: Parser = mqtt_codec.parse) -> None:
        self.sock = sock
        self.parse = parse
        self.pending = b""

    def handshake(self) -> None:
        """CONNECT is the device's business, not the link's."""

    def send(self, packet: bytes) -> None:
        self.sock.sendall(packet)

    def receive(self) -> list[mqtt_codec.Packet]:
        data = self.sock.recv(RECV_BYTES)
        if not data:
            raise LinkClosed("eof")
        packets, self.pending = self.parse(self.pending + data if self.pending else data)
        return packets


class MqttWsLink:
    """MQTT over `GET /mqtt`: binary messages carry the packet stream (a packet may span messages)."""

    __slots__ = ("host", "parse", "path", "pending", "sock", "ws")

    def __init__(self, sock: socket.socket, host: str, path: str, parse: Parser = mqtt_codec.parse) -> None:
        self.sock = sock
        self.parse = parse
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.host = host
        self.path = path
        self.pending = b""

    def handshake(self) -> None:
        upgrade(self.sock, self.ws, Request(host=self.host, target=self.path, subprotocols=["mqtt"]))

    def send(self, packet: bytes) -> None:
        self.sock.sendall(self.ws.send(BytesMessage(data=packet)))

    def receive(self) -> list[mqtt_codec.Packet]:
        data = self.sock.recv(RECV_BYTES)
        self.ws.receive_data(data or None)
        stream = self.pending
        for event in self.ws.events():
            if isinstance(event, BytesMessage):
                stream += event.data
            elif isinstance(event, Ping):
                self.sock.sendall(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                raise LinkClosed("websocket close")
        if not data:
            raise LinkClosed("eof")
        packets, self.pending = self.parse(bytes(stream))
        return packets
