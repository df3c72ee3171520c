"""What runs in a device connection's greenlet: the TLS handshake if any, the transport, one `Session`.

One method per kind of listener (app/listeners.py decides which socket gets
which). Each builds the transport for its port and runs a session over it until
the connection ends. On a TLS port the handshake comes first, under the same
HELLO_TIMEOUT as the hello (PROTOCOL.md section 1: it covers both, from the
accept), paced by the worker's `HandshakeGate` so that a stampede of handshakes
cannot stall the hub; nothing a client sent before its handshake completed can
reach a session.

With TLS_CRL_FILE, a connection whose client certificate the CRL in force lists never reaches a
session either (PROTOCOL.md section 6, "Revoked certificates"): the check runs after every handshake,
resumed ones included (a resumption verifies no certificate, but the ticket's session carries the one
first presented). A device port reads the hello (CONNECT) and answers `banned` (CONNACK 0x05) before
it closes; HTTPS_PORT closes at once. Every session that presented a certificate is handed to the
worker's `CrlWatcher`, which ends it with `banned` if a reload revokes it.

    transport   port                        presence name
    JSON lines  DEVICE_PORT / DEVICE_TLS_PORT   tcp / tls
    JSON WS     PORT /ws / HTTPS_PORT /ws       ws / wss
    MQTT        MQTT_PORT / MQTT_TLS_PORT       mqtt / mqtts
    MQTT WS     PORT /mqtt / HTTPS_PORT /mqtt   mqtt-ws / mqtt-wss
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gevent

from app import metrics, protocol
from app.protocol import ProtocolError
from app.sessions.session import Session
from app.tls.contexts import certificate_names
from app.tls.crl import REVOKED_MESSAGE, CertificateId, CrlWatcher, certificate_id
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

log = logging.getLogger("warren.handlers")


@dataclass(frozen=True)
class Accepted:
    """A connection after its handshake (if any): the socket to use and what the handshake proved."""

    sock: Any
    peer: str
    deadline: float  # the end of HELLO_TIMEOUT, counted from the accept
    tls: bool
    names: tuple[str, ...]  # device names of a verified client certificate
    certificate: CertificateId | None = None  # the client certificate, by issuer and serial (with TLS_CRL_FILE)
    revoked: bool = False  # the CRL in force lists that certificate


class DeviceHandlers:
    """The connection handlers of one worker."""

    def __init__(self, config: Config, host: Host, backend: Backend, tls: TlsContexts | None = None,
                 gate: HandshakeGate | None = None, crl: CrlWatcher | None = None) -> None:
        self.config, self.host, self.backend = config, host, backend
        self.tls, self.gate, self.crl = tls, gate, crl

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
        self._run(connection, accepted)

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
        """HTTPS_PORT: a client certificate is asked for, never required; a revoked one closes the connection."""
        accepted = self._handshake(sock, address, self.tls.https)
        if accepted is not None and accepted.revoked:
            accepted.sock.close()
            return None
        return accepted

    def _handshake(self, sock: Any, address: Any, context: Any) -> Accepted | None:
        deadline = time.monotonic() + self.config.hello_timeout
        try:
            tls = handshake(sock, context, self.config.hello_timeout, self.gate)
        except TlsHandshakeError as exc:  # `handshake` closed the connection; the client's fault
            metrics.TLS_HANDSHAKES.labels(outcome=exc.reason).inc()
            return None
        metrics.TLS_HANDSHAKES.labels(outcome="resumed" if tls.session_reused else "full").inc()
        return self._checked(Accepted(tls, peer_name(address), deadline, True, certificate_names(tls.getpeercert())))

    def _checked(self, accepted: Accepted) -> Accepted:
        """With TLS_CRL_FILE: which certificate the connection presented, and whether the CRL in force lists it."""
        if self.crl is None:
            return accepted
        certificate = certificate_id(accepted.sock.getpeercert(binary_form=True))
        revoked = self.crl.revoked(certificate)
        if revoked:
            metrics.CRL_REFUSALS.labels(at="handshake").inc()
            log.info("connection refused: its client certificate is revoked (TLS_CRL_FILE)",
                     extra={"peer": accepted.peer, "serial": f"{certificate[1]:x}" if certificate else None,
                            "resumed": bool(getattr(accepted.sock, "session_reused", False))})
        return Accepted(accepted.sock, accepted.peer, accepted.deadline, accepted.tls, accepted.names,
                        certificate, revoked)

    def _plain(self, sock: Any, address: Any) -> Accepted:
        return Accepted(sock, peer_name(address), time.monotonic() + self.config.hello_timeout, False, ())

    def _upgraded(self, sock: Any, address: Any, tls: bool) -> Accepted:
        """An upgraded HTTP connection; HELLO_TIMEOUT counts from the upgrade (PROTOCOL.md section 2)."""
        names = certificate_names(sock.getpeercert()) if tls else ()
        accepted = Accepted(sock, peer_name(address), time.monotonic() + self.config.hello_timeout, tls, names)
        return self._checked(accepted) if tls else accepted

    # -- sessions ------------------------------------------------------------------------------
    def _json_lines(self, accepted: Accepted) -> None:
        config = self.config
        connection = JsonLinesConnection(accepted.sock, accepted.peer, config.max_frame_bytes,
                                         config.send_buffer_bytes, transport="tls" if accepted.tls else "tcp",
                                         direct_writes=not accepted.tls, certificate_names=accepted.names)
        self._run(connection, accepted)

    def _mqtt_stream(self, accepted: Accepted) -> None:
        stream = MqttSocketStream(accepted.sock, self.config.send_buffer_bytes, direct_writes=not accepted.tls)
        self._mqtt(stream, accepted, "mqtts" if accepted.tls else "mqtt")

    def _mqtt(self, stream: Any, accepted: Accepted, transport: str) -> None:
        config = self.config
        connection = MqttConnection(stream, accepted.peer, config.max_frame_bytes, config.mqtt_max_keepalive,
                                    transport=transport, certificate_names=accepted.names)
        self._run(connection, accepted)

    def _run(self, connection: Any, accepted: Accepted) -> None:
        if accepted.revoked:
            refuse_revoked(connection, accepted.deadline)
            return
        session = Session(connection, self.host, self.backend, accepted.deadline)
        if self.crl is not None and accepted.certificate is not None:
            self.crl.track(session, accepted.certificate)  # before the session runs: no reload can slip between
        session.run()


def refuse_revoked(connection: Any, deadline: float) -> None:
    """Read the hello (CONNECT) until `deadline`, answer `banned` (MQTT: CONNACK 0x05), close.

    The hello is read first so that the answer comes where a device expects its welcome (an MQTT
    client reads a CONNACK only after its CONNECT), and so that closing does not reset a connection
    with the hello unread in it, which could lose the answer."""
    try:
        with gevent.Timeout(max(0.0, deadline - time.monotonic()), False):
            connection.receive()
    except (ProtocolError, OSError):
        pass
    metrics.HELLO_FAILURES.labels(code="banned").inc()
    metrics.ERRORS_SENT.labels(code="banned").inc()
    try:
        connection.send(protocol.error("banned", REVOKED_MESSAGE))
    finally:
        connection.close()


def peer_name(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
