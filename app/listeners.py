"""The worker's listeners: which of gunicorn's shared sockets is which port, and what serves each.

gunicorn binds every address gunicorn.conf.py lists and hands the same listen
sockets to every worker: they are the acceptor pool (as in Ranch). Here each
socket becomes a gevent server whose accepted connections are started by the
worker's connection supervisor (its `spawn`), which counts them and pauses
accepting when the worker is full. A connection handler builds the transport
for its port and runs one `Session` over it, in the connection's own greenlet.

    DEVICE_PORT  newline-delimited JSON (app/transports/tcp.py)
    MQTT_PORT    MQTT 3.1.1 (app/transports/mqtt.py)
    PORT         the HTTP API (app/web.py), with `GET /ws` (JSON) and `GET /mqtt` (MQTT) upgraded
                 to device sessions
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import gevent
from gevent.server import StreamServer
from gunicorn.workers.ggevent import PyWSGIHandler, PyWSGIServer

from app.sessions.session import Session
from app.transports.mqtt import MqttConnection
from app.transports.streams import SocketStream, WebSocketStream
from app.transports.tcp import TcpConnection
from app.transports.ws import HandshakeError, WsConnection

if TYPE_CHECKING:
    from gevent.baseserver import BaseServer

    from app.config import Config
    from app.sessions.ports import Backend, Host

log = logging.getLogger("warren.listeners")


class DeviceHandlers:
    """What runs in a device connection's greenlet, per transport: build the transport, run a session."""

    def __init__(self, config: Config, host: Host, backend: Backend) -> None:
        self.config, self.host, self.backend = config, host, backend

    def tcp(self, sock: Any, address: Any) -> None:
        config = self.config
        connection = TcpConnection(sock, peer_name(address), config.max_frame_bytes, config.send_buffer_bytes)
        Session(connection, self.host, self.backend).run()

    def websocket(self, sock: Any, address: Any, environ: dict[str, Any]) -> None:
        config = self.config
        connection = WsConnection(sock, peer_name(address), environ, config.max_frame_bytes,
                                  config.send_buffer_bytes)
        Session(connection, self.host, self.backend).run()

    def mqtt(self, sock: Any, address: Any) -> None:
        config = self.config
        stream = SocketStream(sock, config.send_buffer_bytes)
        self._run_mqtt(stream, address, "mqtt")

    def mqtt_websocket(self, sock: Any, address: Any, environ: dict[str, Any]) -> None:
        stream = WebSocketStream(sock, environ, self.config.send_buffer_bytes)
        self._run_mqtt(stream, address, "mqtt-ws")

    def _run_mqtt(self, stream: Any, address: Any, transport: str) -> None:
        config = self.config
        connection = MqttConnection(stream, peer_name(address), config.max_frame_bytes, config.mqtt_max_keepalive,
                                    transport=transport)
        Session(connection, self.host, self.backend).run()


# The WebSocket paths of the HTTP port, and the handler of each.
UPGRADES = {"/ws": DeviceHandlers.websocket, "/mqtt": DeviceHandlers.mqtt_websocket}


class WebSocketHandler(PyWSGIHandler):
    """gunicorn's pywsgi handler, except that `GET /ws` and `GET /mqtt` upgrades become device sessions."""

    # A request's head (request line and headers) must arrive within HELLO_TIMEOUT, as a
    # device's hello must: otherwise a slow-loris on the HTTP port holds a connection (and a
    # place under the accept cap) forever. pywsgi closes on the request line's timeout and
    # answers 400 on the headers'. An idle keep-alive connection is closed after it too.
    def read_requestline(self) -> Any:
        limit = self.server.warren_devices.config.hello_timeout
        self._head_deadline = time.monotonic() + limit
        with gevent.Timeout(limit, TimeoutError("no request line in time")):
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
        self.close_connection = True
        self.status = "101 Switching Protocols"
        try:
            upgrade(self.server.warren_devices, self.socket, self.client_address, self.environ)
        except HandshakeError as exc:
            self.start_response("400 Bad Request", [("Content-Type", "text/plain")])
            self.write(f"{exc}\n".encode())


def build_servers(sockets: list[Any], config: Config, devices: DeviceHandlers, wsgi: Any,
                  gunicorn_log: Any) -> list[BaseServer]:
    """One gevent server per gunicorn listen socket, by the port it is bound to; not started, and with no
    `spawn` yet: the connection supervisor that adopts them sets it."""
    servers: list[BaseServer] = []
    for sock in sockets:
        sock.setblocking(1)
        port = sock.getsockname()[1]
        if port == config.device_port:
            server: BaseServer = StreamServer(sock, handle=devices.tcp)
        elif port == config.mqtt_port:
            server = StreamServer(sock, handle=devices.mqtt)
        else:
            server = PyWSGIServer(sock, application=wsgi, log=gunicorn_log,
                                  handler_class=WebSocketHandler, environ={"SERVER_SOFTWARE": "warren"})
            server.warren_devices = devices
        server.max_accept = 64
        servers.append(server)
    return servers


def peer_name(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
