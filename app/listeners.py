"""The worker's listeners: which of gunicorn's shared sockets is which port, and what serves each.

gunicorn binds every address gunicorn.conf.py lists and hands the same listen
sockets to every worker: they are the acceptor pool (as in Ranch). Here each
socket becomes a gevent server whose accepted connections are started by the
worker's connection supervisor (it sets each server's `spawn`), which counts
them and pauses accepting when the worker is full. The connection handlers
(app/handlers.py) run in the connections' own greenlets.

    DEVICE_PORT      newline-delimited JSON            DEVICE_TLS_PORT  the same over TLS
    MQTT_PORT        MQTT 3.1.1                         MQTT_TLS_PORT    the same over TLS
    PORT             the HTTP API (app/web/api.py), with `GET /ws` (JSON) and `GET /mqtt` (MQTT) upgraded
                     to device sessions                 HTTPS_PORT       the same over TLS
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
from gevent import socket
from gevent.server import StreamServer
from gunicorn.workers.ggevent import PyWSGIHandler, PyWSGIServer

from app.handlers import DeviceHandlers
from app.transports.websocket import Handshake, HandshakeError, handshake, upgrade_request

if TYPE_CHECKING:
    from gevent.baseserver import BaseServer

    from app.config import Config
    from app.tls.contexts import TlsSettings

MAX_UPGRADE_HEAD = 8192  # a bigger upgrade request head goes through pywsgi
Upgraded = tuple[Callable[..., None], Handshake]  # an accepted upgrade: the session to run, its handshake
SILENT: Any = object()  # a connection that sent nothing within HELLO_TIMEOUT, or was reset first

# The WebSocket paths of the HTTP ports: the session each upgrade runs, and the subprotocol it needs.
UPGRADES = {"/ws": (DeviceHandlers.websocket, None), "/mqtt": (DeviceHandlers.mqtt_websocket, "mqtt")}


class WebSocketHandler(PyWSGIHandler):
    """gunicorn's pywsgi handler, except that `GET /ws` and `GET /mqtt` upgrades are detached from it.

    An accepted upgrade leaves the request loop with its socket and a small `Handshake`:
    the session then runs after this handler is gone (`HttpServer.handle`), so nothing of
    the WSGI request (this handler, its environ, its buffered reader) lives as long as the
    device. Held for a session's life, they made a WebSocket session cost twice a TCP one.
    """

    upgraded: Upgraded | None = None  # set when the request was an accepted upgrade
    first_deadline: float | None = None  # the connection's first request head is due by then (from the accept)

    # A request's head (request line and headers) must arrive within HELLO_TIMEOUT, as a
    # device's hello must: otherwise a slow-loris on the HTTP port holds a connection (and a
    # place under the accept cap) forever. pywsgi closes on the request line's timeout and
    # answers 400 on the headers'. An idle keep-alive connection is closed after it too.
    def read_requestline(self) -> Any:
        now = time.monotonic()
        self._head_deadline = self.first_deadline or now + self.server.warren_devices.config.hello_timeout
        self.first_deadline = None  # a keep-alive connection's next request gets a whole HELLO_TIMEOUT
        with gevent.Timeout(max(0.001, self._head_deadline - now), TimeoutError("no request line in time")):
            return super().read_requestline()

    def read_request(self, requestline: Any) -> Any:
        remaining = max(0.001, getattr(self, "_head_deadline", 0) - time.monotonic())
        with gevent.Timeout(remaining, TimeoutError("no request head in time")):
            return super().read_request(requestline)

    def run_application(self) -> None:
        upgrade = UPGRADES.get(self.environ.get("PATH_INFO", ""))
        if upgrade is None or "HTTP_UPGRADE" not in self.environ:
            super().run_application()
            return
        session, subprotocol = upgrade
        try:
            accepted = handshake(self.environ, subprotocol)
        except HandshakeError as exc:
            self.start_response("400 Bad Request", [("Content-Type", "text/plain")])
            self.write(f"{exc}\n".encode())
            self.close_connection = True
            return
        self.status = "101 Switching Protocols"  # for the access log; the session writes the reply
        self.close_connection = True
        self.upgraded = (session, accepted)
        self.socket = None  # pywsgi's request loop ends without closing it: the session takes it


class HttpServer(PyWSGIServer):
    """PORT: pywsgi for the HTTP API; a WebSocket upgrade runs its session on the bare socket.

    An upgrade that opens its connection is read here, from a peek at the socket, without pywsgi
    at all; one that follows API requests on a keep-alive connection (or arrives in pieces, or is
    refused) goes through pywsgi and `WebSocketHandler`, which detaches it. Either way the
    session runs on the bare socket with nothing of the HTTP request left."""

    def handle(self, sock: Any, address: Any) -> None:
        deadline = time.monotonic() + self.warren_devices.config.hello_timeout
        upgraded = self._upgrade_at_once(sock, deadline)
        if upgraded is SILENT:
            return  # nothing within HELLO_TIMEOUT: the slow-loris guard, as pywsgi's would be
        if upgraded is None:
            handler = self.handler_class(sock, address, self)
            handler.first_deadline = deadline  # the peek took part of it: the head is due from the accept
            handler.handle()
            upgraded = handler.upgraded
            del handler  # before the session, which may last for days
        if upgraded is not None:
            session, accepted = upgraded
            session(self.warren_devices, sock, address, accepted, self.environ.get("wsgi.url_scheme") == "https")

    def _upgrade_at_once(self, sock: Any, deadline: float) -> Upgraded | None:
        """The connection's first request, if it is a whole, acceptable WebSocket upgrade: read and taken
        off the socket; else None, with the socket untouched for pywsgi."""
        head = None
        try:
            with gevent.Timeout(deadline - time.monotonic(), False):
                head = sock.recv(MAX_UPGRADE_HEAD, socket.MSG_PEEK)
        except OSError:  # reset before a byte came: nothing to serve, nothing to report
            return SILENT
        if head is None:
            return SILENT
        end = head.find(b"\r\n\r\n")
        request = upgrade_request(head[:end]) if end > 0 else None
        upgrade = UPGRADES.get(request[0]) if request is not None else None
        if upgrade is None:
            return None
        session, subprotocol = upgrade
        try:
            accepted = handshake(request[1], subprotocol)
        except HandshakeError:
            return None  # pywsgi reads it again and answers 400 with the reason
        sock.recv(end + 4)  # the head, which the peek left in the kernel's buffer
        return session, accepted


class HttpsServer(HttpServer):
    """HTTPS_PORT: the TLS handshake (under HELLO_TIMEOUT, through the worker's gate), then as PORT,
    with every upgrade through pywsgi (a TLS socket cannot be peeked at).

    Not gevent's `ssl_args`: that handshake has no deadline, so a client that connects and
    sends nothing would hold its connection forever."""

    def handle(self, sock: Any, address: Any) -> None:
        accepted = self.warren_devices.https_handshake(sock, address)
        if accepted is not None:
            super().handle(accepted.sock, address)

    def _upgrade_at_once(self, sock: Any, deadline: float) -> Upgraded | None:
        return None


def build_servers(sockets: list[Any], config: Config, tls: TlsSettings | None, devices: DeviceHandlers, wsgi: Any,
                  gunicorn_log: Any) -> tuple[list[BaseServer], list[BaseServer]]:
    """(every server, the TLS ones among them): one gevent server per gunicorn listen socket, by the
    port it is bound to; not started and with no `spawn` yet: the connection supervisor that adopts
    them sets it."""
    streams = {config.device_port: devices.tcp, config.mqtt_port: devices.mqtt}
    if tls is not None:
        streams.update({tls.device_tls_port: devices.tls_tcp, tls.mqtt_tls_port: devices.tls_mqtt})
    https_port = tls.https_port if tls is not None else None
    servers: list[BaseServer] = []
    secure: list[BaseServer] = []
    for sock in sockets:
        sock.setblocking(1)
        port = sock.getsockname()[1]
        handle = streams.get(port)
        if handle is not None:
            server: BaseServer = StreamServer(sock, handle=handle)
        else:
            server_class = HttpsServer if port == https_port else HttpServer
            scheme = "https" if port == https_port else "http"
            server = server_class(sock, application=wsgi, log=gunicorn_log, handler_class=WebSocketHandler,
                                  environ={"SERVER_SOFTWARE": "warren", "wsgi.url_scheme": scheme})
            server.warren_devices = devices
        server.max_accept = 64
        servers.append(server)
        if tls is not None and port in (tls.device_tls_port, tls.mqtt_tls_port, https_port):
            secure.append(server)
    return servers, secure
