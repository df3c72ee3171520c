"""MQTT 5 devices on a bare socket (plain, TLS or `/mqtt` WebSocket) for tests/test_mqtt5.py.

The packets are built with app.mqtt.properties' encoder (the standard's layout, written
out here for a client) and the gateway's are read back with its decoder, so that a test
asserts reason codes and properties exactly as they went over the wire.
"""

from __future__ import annotations

import socket
import ssl
import struct
from typing import Any, Self

from app.mqtt import properties as props5
from app.mqtt.packets import Properties
from bench.stampede import mqtt_codec as build
from support.gateways import Gateway
from support.mqtt_devices import RawMqtt, RawMqttWs, token
from support.tls_devices import SERVER_NAME, Pki
from support.waiting import WAIT

CONNACK, PUBLISH, PUBACK, SUBACK, DISCONNECT = 0x20, 0x30, 0x40, 0x90, 0xE0
_U16 = struct.Struct("!H")


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return _U16.pack(len(raw)) + raw


def connect5(client_id: str, password: str | None = "own", keep_alive: int = 60, props: Properties | None = None,
             will: tuple[str, bytes] | None = None, will_props: Properties | None = None) -> bytes:
    """A level 5 CONNECT; password "own" is the device's own token."""
    flags, payload = 0x02, [props5.encode(props, props5.CONNECT), s(client_id)]
    if will is not None:
        flags |= 0x04
        payload += [props5.encode(will_props, props5.WILL), s(will[0]), s(will[1])]
    if password is not None:
        flags |= 0x40
        payload.append(s(token(client_id) if password == "own" else password))
    return build.packet(0x10, b"".join((s("MQTT"), bytes((5, flags)), _U16.pack(keep_alive), *payload)))


def publish5(topic: str, payload: bytes, packet_id: int | None = None, props: Properties | None = None) -> bytes:
    qos = 0 if packet_id is None else 1
    head = s(topic) + (_U16.pack(packet_id) if qos else b"")
    return build.packet(0x30 | qos << 1, head + props5.encode(props, props5.PUBLISH) + payload)


def subscribe5(packet_id: int, *filters: tuple[str, int]) -> bytes:
    body = b"".join(s(topic) + bytes((qos,)) for topic, qos in filters)
    return build.packet(0x82, _U16.pack(packet_id) + b"\x00" + body)


def reason_and_properties(first: int, body: bytes) -> tuple[int, Properties | None]:
    """(reason code, properties) of a CONNACK, PUBACK or DISCONNECT the gateway sent."""
    kind = first >> 4
    start = {2: 1, 4: 2, 14: 0}[kind]
    if len(body) <= start:
        return 0, None
    if len(body) == start + 1:
        return body[start], None
    return body[start], props5.decode(body, start + 1, len(body), kind)[0]


def command_publish(body: bytes, qos: int) -> tuple[str, int | None, Properties, bytes]:
    """(topic, packet id, properties, payload) of a PUBLISH the gateway sent."""
    end = 2 + _U16.unpack(body[:2])[0]
    packet_id = _U16.unpack(body[end:end + 2])[0] if qos else None
    props, pos = props5.decode(body, end + 2 if qos else end, len(body), props5.PUBLISH)
    return body[2:end].decode(), packet_id, props, body[pos:]


class Raw5:
    """A bare MQTT 5 device: sends what it is given, reads the gateway's packets one by one (RawMqtt's reader)."""

    def __init__(self, gateway: Gateway, transport: str = "tcp", pki: Pki | None = None) -> None:
        if transport == "ws":
            self.raw: RawMqtt = RawMqttWs(gateway)
        elif transport == "tls":
            assert pki is not None
            context = ssl.create_default_context(cafile=pki.path("server-ca.pem"))
            sock = socket.create_connection(("127.0.0.1", int(gateway.env["MQTT_TLS_PORT"])), timeout=WAIT)
            self.raw = RawMqtt.__new__(RawMqtt)
            self.raw.sock, self.raw._buffer = context.wrap_socket(sock, server_hostname=SERVER_NAME), b""
        else:
            self.raw = RawMqtt(gateway)

    def send(self, data: bytes) -> None:
        self.raw.send(data)

    def read(self) -> tuple[int, bytes]:
        return self.raw.read()

    def connect(self, device: str, **options: Any) -> tuple[int, Properties | None]:
        self.send(connect5(device, **options))
        first, body = self.read()
        assert first == CONNACK and body[0] == 0, (first, body)
        return reason_and_properties(first, body)

    def expect(self, first: int) -> tuple[int, Properties | None]:
        got, body = self.read()
        assert got == first, (hex(got), body)
        return reason_and_properties(got, body)

    def expect_closed(self) -> None:
        self.raw.expect_closed()

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
