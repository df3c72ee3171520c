"""The WebSocket upgrade and the polite close, for both WebSocket transports (JSON and MQTT).

The upgrade handshake is answered here (RFC 6455 section 4.2.2) because the HTTP
request was already parsed by gunicorn's server; wsproto, a sans-I/O library,
then handles frames, masking, fragmentation, ping/pong and the close handshake.
It never touches the socket, so the connection's own greenlet drives it and
nothing else is needed for gevent.
"""

from __future__ import annotations

from collections.abc import Mapping

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection
from wsproto.utilities import generate_accept_token

from app.transports.sender import Sender

# The states in which our close frame may still be sent (wsproto refuses it in the others).
MAY_SEND_CLOSE = (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING)


class HandshakeError(ValueError):
    """The request is not a WebSocket upgrade we can accept; answer it with HTTP 400."""


def accept_token(environ: Mapping[str, str]) -> bytes:
    """Check the upgrade request's headers and return its Sec-WebSocket-Accept value."""
    if environ.get("REQUEST_METHOD") != "GET":
        raise HandshakeError("a WebSocket upgrade must be a GET")
    if "websocket" not in environ.get("HTTP_UPGRADE", "").lower():
        raise HandshakeError("missing 'Upgrade: websocket'")
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION") != "13":
        raise HandshakeError("only WebSocket version 13 is supported")
    key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
    if not key:
        raise HandshakeError("missing Sec-WebSocket-Key")
    return generate_accept_token(key.encode("ascii", "replace"))


def upgrade(environ: Mapping[str, str], sender: Sender, subprotocol: str | None = None) -> Connection:
    """Accept the upgrade request: write the 101 reply through `sender`, return wsproto's side of the connection.

    With `subprotocol`, the request must offer it (MQTT 3.1.1 section 6 asks for `mqtt`) and the
    reply names it. Raises HandshakeError, having written nothing, for a request we cannot accept."""
    named = b""
    if subprotocol is not None:
        offered = [item.strip() for item in environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "").split(",")]
        if subprotocol not in offered:
            raise HandshakeError(f"this WebSocket upgrade must offer the subprotocol {subprotocol!r}")
        named = b"Sec-WebSocket-Protocol: " + subprotocol.encode("ascii") + b"\r\n"
    token = accept_token(environ)
    sender.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                + named + b"Sec-WebSocket-Accept: " + token + b"\r\n\r\n")
    return Connection(ConnectionType.SERVER)


def close_politely(ws: Connection, sender: Sender) -> None:
    """Queue our close frame (1000, normal closure) unless one was sent already or the connection is gone."""
    if ws.state in MAY_SEND_CLOSE:
        sender.send(ws.send(CloseConnection(code=1000)))
