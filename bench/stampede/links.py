"""Framing for the two device transports of PROTOCOL.md section 1.

A link owns a connected socket and turns it into whole frames (JSON payloads as
bytes) in both directions, so `device.py` never sees the transport.
"""

from __future__ import annotations

import socket
from typing import Protocol
from urllib.parse import urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

RECV_BYTES = 65536
# Linux socket option: pick the source port at connect(), not bind(), so one
# source address can reuse a port towards different destinations.
IP_BIND_ADDRESS_NO_PORT = 24


class LinkClosed(Exception):
    """The peer closed the connection (or refused the WebSocket upgrade)."""


class Link(Protocol):
    sock: socket.socket

    def handshake(self) -> None: ...
    def send(self, payload: bytes) -> None: ...
    def receive(self) -> list[bytes]: ...


class Target:
    """Where devices connect: `tcp://host:port` or `ws://host:port/path`."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("tcp", "ws") or not parts.hostname or not parts.port:
            raise ValueError(f"target {url!r} must look like tcp://host:7878 or ws://host:8000/ws")
        self.url = url
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port
        self.path = parts.path or "/ws"

    def open(self, source: str, timeout: float) -> Link:
        """Connect from `source` (an address of this host) and return the matching link."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
            sock.settimeout(timeout)
            sock.connect((self.host, self.port))
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        if self.scheme == "tcp":
            return TcpLink(sock)
        return WsLink(sock, f"{self.host}:{self.port}", self.path)


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
        """Send the upgrade request and wait for the server to accept it."""
        self.sock.sendall(self.ws.send(Request(host=self.host, target=self.path)))
        while True:
            data = self.sock.recv(RECV_BYTES)
            if not data:
                raise LinkClosed("eof during upgrade")
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, AcceptConnection):
                    return
                if isinstance(event, RejectConnection):
                    raise LinkClosed(f"upgrade refused ({event.status_code})")

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
