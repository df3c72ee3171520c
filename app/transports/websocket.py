"""The WebSocket upgrade and the polite close, for both WebSocket transports (JSON and MQTT).

The upgrade handshake is answered here (RFC 6455 section 4.2.2) because the HTTP
request was already parsed by gunicorn's server; wsproto, a sans-I/O library,
then handles frames, masking, fragmentation, ping/pong and the close handshake.
It never touches the socket, so the connection's own greenlet drives it and
nothing else is needed for gevent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection
from wsproto.utilities import generate_accept_token

from app.transports.sender import Sender

# The states in which our close frame may still be sent (wsproto refuses it in the others).
MAY_SEND_CLOSE = (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING)


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
    return Handshake(generate_accept_token(key.encode("ascii", "replace")), subprotocol)


def switching_protocols(accepted: Handshake) -> bytes:
    """The 101 reply that completes the upgrade."""
    named = b"" if accepted.subprotocol is None else \
        b"Sec-WebSocket-Protocol: " + accepted.subprotocol.encode("ascii") + b"\r\n"
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + named + b"Sec-WebSocket-Accept: " + accepted.accept + b"\r\n\r\n")


def upgrade(accepted: Handshake, sender: Sender) -> Connection:
    """Complete the upgrade: write the 101 reply through `sender`, return wsproto's side of the connection."""
    sender.send(switching_protocols(accepted))
    return Connection(ConnectionType.SERVER)


def close_politely(ws: Connection, sender: Sender) -> None:
    """Queue our close frame (1000, normal closure) unless one was sent already or the connection is gone."""
    if ws.state in MAY_SEND_CLOSE:
        sender.send(ws.send(CloseConnection(code=1000)))
