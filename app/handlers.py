"""What runs in a device connection's greenlet: the TLS handshake if any, the transport, one `Session`.

One method per kind of listener (app/listeners.py decides which socket gets
which). Each builds the transport for its port and runs a session over it until
the connection ends. On a TLS port the handshake comes first, under the same
HELLO_TIMEOUT as the hello (PROTOCOL.md section 1: it covers both, from the
accept), paced by the worker's `HandshakeGate` so that a stampede of handshakes
cannot stall the hub; nothing a client sent before its handshake completed can
reach a session.

    transport   port                        presence name
    JSON lines  DEVICE_PORT / DEVICE_TLS_PORT   tcp / tls
    JSON WS     PORT /ws / HTTPS_PORT /ws       ws / wss
    MQTT        MQTT_PORT / MQTT_TLS_PORT       mqtt / mqtts
    MQTT WS     PORT /mqtt / HTTPS_PORT /mqtt   mqtt-ws / mqtt-wss
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app import metrics
from app.sessions.session import Session
from app.tls.contexts import certificate_names
from app.tls.handshake import HandshakeGate, TlsHandshakeError, handshake
from app.transports.json_lines import JsonLinesConnection
from app.transports.json_websocket import JsonWebSocketConnection
from app.transports.mqtt import MqttConnection
from app.transports.mqtt_streams import MqttSocketStream, MqttWebSocketStream

if TYPE_CHECKING:
    from app.config import Config
    from app.sessions.ports import Backend, Host
    from app.tls.contexts import TlsContexts
    from app.transports.websocket import Handshake


@dataclass(frozen=True)
class Accepted:
    """A connection after its handshake (if any): the socket to use and what the handshake proved."""

    sock: Any
    peer: str
    deadline: float  # the end of HELLO_TIMEOUT, counted from the accept
    tls: bool
    names: tuple[str, ...]  # device names of a verified client certificate


class DeviceHandlers:
    """The connection handlers of one worker."""

    def __init__(self, config: Config, host: Host, backend: Backend, tls: TlsContexts | None = None,
                 gate: HandshakeGate | None = None) -> None:
        self.config, self.host, self.backend = config, host, backend
        self.tls, self.gate = tls, gate

    # -- plain and TLS stream ports ----------------------------------------------------------
    def tcp(self, sock: Any, address: Any) -> None:
        self._json_lines(self._plain(sock, address))

    def tls_tcp(self, sock: Any, address: Any) -> None:
        accepted = self.device_handshake(sock, address)
        if accepted is not None:
            self._json_lines(accepted)

    def mqtt(self, sock: Any, address: Any) -> None:
        self._mqtt_stream(self._plain(sock, address))

    def tls_mqtt(self, sock: Any, address: Any) -> None:
        accepted = self.device_handshake(sock, address)
        if accepted is not None:
            self._mqtt_stream(accepted)

    # -- WebSocket upgrades on PORT and HTTPS_PORT (the socket is already a TLS one on HTTPS) ----
    def websocket(self, sock: Any, address: Any, handshake: Handshake, tls: bool) -> None:
        accepted = self._upgraded(sock, address, tls)
        config = self.config
        connection = JsonWebSocketConnection(accepted.sock, accepted.peer, handshake, config.max_frame_bytes,
                                              config.send_buffer_bytes, transport="wss" if accepted.tls else "ws",
                                              direct_writes=not accepted.tls, certificate_names=accepted.names)
        Session(connection, self.host, self.backend, accepted.deadline).run()

    def mqtt_websocket(self, sock: Any, address: Any, handshake: Handshake, tls: bool) -> None:
        accepted = self._upgraded(sock, address, tls)
        stream = MqttWebSocketStream(accepted.sock, handshake, self.config.send_buffer_bytes,
                                     direct_writes=not accepted.tls)
        self._mqtt(stream, accepted, "mqtt-wss" if accepted.tls else "mqtt-ws")

    # -- handshakes ---------------------------------------------------------------------------
    def device_handshake(self, sock: Any, address: Any) -> Accepted | None:
        """DEVICE_TLS_PORT and MQTT_TLS_PORT: mutual TLS when TLS_CLIENT_CA_FILE is set."""
        return self._handshake(sock, address, self.tls.device)

    def https_handshake(self, sock: Any, address: Any) -> Accepted | None:
        """HTTPS_PORT: a client certificate is asked for, never required."""
        return self._handshake(sock, address, self.tls.https)

    def _handshake(self, sock: Any, address: Any, context: Any) -> Accepted | None:
        deadline = time.monotonic() + self.config.hello_timeout
        try:
            tls = handshake(sock, context, self.config.hello_timeout, self.gate)
        except TlsHandshakeError as exc:  # `handshake` closed the connection; the client's fault
            metrics.TLS_HANDSHAKES.labels(outcome=exc.reason).inc()
            return None
        metrics.TLS_HANDSHAKES.labels(outcome="resumed" if tls.session_reused else "full").inc()
        return Accepted(tls, peer_name(address), deadline, True, certificate_names(tls.getpeercert()))

    def _plain(self, sock: Any, address: Any) -> Accepted:
        return Accepted(sock, peer_name(address), time.monotonic() + self.config.hello_timeout, False, ())

    def _upgraded(self, sock: Any, address: Any, tls: bool) -> Accepted:
        """An upgraded HTTP connection; HELLO_TIMEOUT counts from the upgrade (PROTOCOL.md section 2)."""
        names = certificate_names(sock.getpeercert()) if tls else ()
        return Accepted(sock, peer_name(address), time.monotonic() + self.config.hello_timeout, tls, names)

    # -- sessions ------------------------------------------------------------------------------
    def _json_lines(self, accepted: Accepted) -> None:
        config = self.config
        connection = JsonLinesConnection(accepted.sock, accepted.peer, config.max_frame_bytes,
                                         config.send_buffer_bytes, transport="tls" if accepted.tls else "tcp",
                                         direct_writes=not accepted.tls, certificate_names=accepted.names)
        Session(connection, self.host, self.backend, accepted.deadline).run()

    def _mqtt_stream(self, accepted: Accepted) -> None:
        stream = MqttSocketStream(accepted.sock, self.config.send_buffer_bytes, direct_writes=not accepted.tls)
        self._mqtt(stream, accepted, "mqtts" if accepted.tls else "mqtt")

    def _mqtt(self, stream: Any, accepted: Accepted, transport: str) -> None:
        config = self.config
        connection = MqttConnection(stream, accepted.peer, config.max_frame_bytes, config.mqtt_max_keepalive,
                                    transport=transport, certificate_names=accepted.names)
        Session(connection, self.host, self.backend, accepted.deadline).run()


def peer_name(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
