"""WebSocket for both WebSocket transports (JSON on /ws, MQTT on /mqtt): the handshake, then the frames.

An upgrade request that opens its connection is read here (`upgrade_request`, from a
peek at the socket); any other is parsed by gunicorn's pywsgi server. Either way an
accepted upgrade is a `Handshake` and the connection leaves the HTTP server
(app/listeners.py); from then on a `WebSocket` owns the bare socket: it writes the 101 reply, reads
frames through ws_frames.py (sans-I/O, strict, fuzzed against wsproto), answers
pings and the close handshake itself, and hands only data messages up. Nothing of
the HTTP request lives on, and the session is not woken for a control frame.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from gevent import socket

from app.transports import ws_frames
from app.transports.sender import Sender
from app.transports.sockets import read

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3

Message = ws_frames.Text | ws_frames.Binary


class HandshakeError(ValueError):
    """The request is not a WebSocket upgrade we can accept; answer it with HTTP 400."""


@dataclass(frozen=True, slots=True)
class Handshake:
    """What survives an accepted upgrade request: its Sec-WebSocket-Accept value and the subprotocol
    chosen, a few dozen bytes instead of the WSGI environ, the request's handler and their buffers."""

    accept: bytes
    subprotocol: str | None = None


def handshake(environ: Mapping[str, str], subprotocol: str | None = None) -> Handshake:
    """Check an upgrade request's headers (RFC 6455 section 4.2.1); raise HandshakeError saying what is wrong.

    With `subprotocol`, the request must offer it (MQTT 3.1.1 section 6 asks for `mqtt`)."""
    if environ.get("REQUEST_METHOD") != "GET":
        raise HandshakeError("a WebSocket upgrade must be a GET")
    if "websocket" not in environ.get("HTTP_UPGRADE", "").lower():
        raise HandshakeError("missing 'Upgrade: websocket'")
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION") != "13":
        raise HandshakeError("only WebSocket version 13 is supported")
    key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
    if not key:
        raise HandshakeError("missing Sec-WebSocket-Key")
    if subprotocol is not None:
        offered = [item.strip() for item in environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "").split(",")]
        if subprotocol not in offered:
            raise HandshakeError(f"this WebSocket upgrade must offer the subprotocol {subprotocol!r}")
    accept = base64.b64encode(hashlib.sha1(key.encode("ascii", "replace") + GUID).digest())
    return Handshake(accept, subprotocol)


def upgrade_request(head: bytes) -> tuple[str, dict[str, str]] | None:
    """(path, environ-style headers) of a request head (the bytes before its blank line) that asks
    for a WebSocket upgrade and is plain enough to read here; None for anything else.

    Why not pywsgi for these: its request parsing (the email package's header parser, the
    environ, the handler) cost a WebSocket session about twice a TCP session's set-up. A
    request this does not recognise (another method or path, no Upgrade header, obsolete
    header folding) goes to pywsgi unchanged, which also answers the bad ones with a 400."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or not parts[2].startswith(b"HTTP/1."):
        return None
    headers = {"REQUEST_METHOD": "GET"}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name[-1:].isspace() or line[:1] in (b" ", b"\t"):
            return None
        key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
        text = value.strip().decode("latin-1")
        headers[key] = f"{headers[key]},{text}" if key in headers else text
    if "HTTP_UPGRADE" not in headers:
        return None
    return parts[1].split(b"?", 1)[0].decode("latin-1"), headers


def switching_protocols(accepted: Handshake) -> bytes:
    """The 101 reply that completes the upgrade."""
    named = b"" if accepted.subprotocol is None else \
        b"Sec-WebSocket-Protocol: " + accepted.subprotocol.encode("ascii") + b"\r\n"
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + named + b"Sec-WebSocket-Accept: " + accepted.accept + b"\r\n\r\n")


class WebSocket:
    """One upgraded connection: data messages up, control frames answered here, one close frame at most.

    `stream_binary`: hand binary messages up piece by piece as they arrive (MQTT's byte stream)."""

    __slots__ = ("_failure", "_raised", "_reader", "_said_goodbye", "_sock", "sender")

    def __init__(self, sock: socket.socket, sender: Sender, accepted: Handshake, max_message_bytes: int,
                 stream_binary: bool = False) -> None:
        self._sock = sock
        self.sender = sender
        self._reader = ws_frames.Reader(max_message_bytes, stream_binary)
        self._failure: ws_frames.ProtocolError | None = None  # raised once the messages before it are read
        self._raised = False
        self._said_goodbye = False  # our close frame is out: nothing more may be sent
        sender.send(switching_protocols(accepted))

    def receive(self) -> list[Message] | None:
        """The next data messages, reading as needed; None once the connection is closed.

        A frame that breaks RFC 6455 (or the size limit) raises ws_frames.ProtocolError, once the
        messages that came before it have been returned; its close code goes out with our close
        frame when the connection ends, after whatever the session still says (its error frame)."""
        while True:
            if self._failure is not None and not self._raised:
                self._raised = True
                raise self._failure
            if self._reader.state == ws_frames.CLOSED:
                return None
            data = read(self._sock)
            if not data:
                return None
            try:
                events = self._reader.feed(data)
            except ws_frames.ProtocolError as exc:
                events, self._failure = exc.events, exc
            messages = self._messages(events)
            if messages:
                return messages

    def _messages(self, events: list[ws_frames.Event]) -> list[Message]:
        messages: list[Message] = []
        for event in events:
            kind = type(event)
            if kind is ws_frames.Text or kind is ws_frames.Binary:
                messages.append(event)
            elif kind is ws_frames.Ping:
                if not self._said_goodbye:
                    self.sender.send(ws_frames.pong(event.payload))
            elif kind is ws_frames.Close:
                self._goodbye(event.reply())
        return messages

    def send(self, frame: bytes) -> None:
        """One frame built by ws_frames (text, binary); dropped once our close frame went out."""
        if not self._said_goodbye:
            self.sender.send(frame)

    def _goodbye(self, close_frame: bytes) -> None:
        if not self._said_goodbye:
            self._said_goodbye = True
            self.sender.send(close_frame)

    def finish(self) -> None:
        """Send our close frame and cut the connection once that is written; never blocks."""
        self._goodbye(self._close_frame())
        self.sender.finish()

    def close(self) -> None:
        """Send our close frame, flush briefly, cut; the socket itself belongs to the HTTP server, which closes it."""
        self._goodbye(self._close_frame())
        self.sender.close()

    def _close_frame(self) -> bytes:
        """1000, normal closure, unless the client broke the protocol: then the code that says how."""
        return self._failure.close_frame() if self._failure is not None else ws_frames.close(1000)
