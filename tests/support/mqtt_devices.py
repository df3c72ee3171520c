"""MQTT devices for the end-to-end tests (test_mqtt.py, test_mqtt_sessions.py): paho-mqtt 2.2.0 as it is, and a
bare-socket client, over TCP or `GET /mqtt`, for what a real client cannot send or a test must see byte by byte."""

from __future__ import annotations

import socket
import struct
from typing import Any, Self

import orjson
import paho.mqtt.client as paho
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    RejectConnection,
    Request,
    TextMessage,
)

from app.auth import mint
from bench.stampede import mqtt_codec as build
from clients.device import Closed
from support.devices import uid
from support.gateways import SECRET, Gateway
from support.waiting import WAIT, wait_until

CONNACK, PUBLISH, PUBACK, SUBACK, PINGRESP = 0x20, 0x30, 0x40, 0x90, 0xD0
OWN_TOKEN: Any = object()  # MqttDevice's default password: the device's own token


def token(device: str) -> str:
    return mint(SECRET.encode(), device)


class MqttDevice:
    """A device on paho-mqtt, unmodified: what its callbacks report is recorded in order; its loop runs on a thread.

    paho never reconnects here (a reconnecting client would take its own session back after a takeover).
    """

    def __init__(self, gateway: Gateway, device: str | None = None, password: Any = OWN_TOKEN, keepalive: int = 60,
                 will: tuple[str, bytes] | None = None, websocket: bool = False, clean_session: bool = True) -> None:
        self.device = device or uid("mq")
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.device, clean_session=clean_session,
                                  protocol=paho.MQTTv311, transport="websockets" if websocket else "tcp",
                                  reconnect_on_failure=False)
        if websocket:
            self.client.ws_set_options(path="/mqtt")
        if password is not None:
            self.client.username_pw_set("sdk-user", token(self.device) if password is OWN_TOKEN else password)
        if will is not None:
            self.client.will_set(*will, qos=1)
        self.seen: list[tuple[Any, ...]] = []
        self._commands_read = 0
        self.client.on_connect = lambda c, u, flags, code, p: self.seen.append(("connack", flags.session_present,
                                                                                  str(code)))
        self.client.on_disconnect = lambda c, u, flags, code, p: self.seen.append(("disconnected", str(code)))
        self.client.on_publish = lambda c, u, mid, code, p: self.seen.append(("published", mid))
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.seen.append(("suback", mid,
                                                                                 [code.value for code in codes]))
        self.client.on_message = lambda c, u, message: self.seen.append(("message", message.topic, message.payload,
                                                                         message.qos))
        self.client.connect("127.0.0.1", gateway.port if websocket else gateway.mqtt_port, keepalive)
        self.client.loop_start()
        self._running = True

    def connack(self) -> tuple[bool, str]:
        """(session present, reason) of the CONNACK."""
        return wait_until(lambda: next((seen[1:] for seen in self.seen if seen[0] == "connack"), None), WAIT)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        return self.client.publish(topic, payload, qos=qos, retain=retain).mid

    def acked(self, mid: int) -> bool:
        return ("published", mid) in self.seen

    def event(self, name: str, payload: bytes) -> None:
        """A QoS 1 event, PUBACKed."""
        mid = self.publish(f"events/{name}", payload)
        wait_until(lambda: self.acked(mid), WAIT)

    def subscribe(self, *filters: tuple[str, int]) -> list[int]:
        """The SUBACK's return codes."""
        _, mid = self.client.subscribe(list(filters))
        return wait_until(lambda: next((seen[2] for seen in self.seen if seen[:2] == ("suback", mid)), None), WAIT)

    def messages(self) -> list[tuple[str, bytes, int]]:
        return [seen[1:] for seen in self.seen if seen[0] == "message"]

    def next_command(self) -> tuple[str, dict[str, Any], int]:
        """(name, payload, QoS) of the next command PUBLISH."""
        topic, payload, qos = wait_until(lambda: self.messages()[self._commands_read:], WAIT)[0]
        self._commands_read += 1
        assert topic.startswith("commands/"), topic
        return topic[len("commands/"):], orjson.loads(payload), qos

    def reply(self, command_id: str, ok: bool = True, data: Any = None, error: str | None = None) -> None:
        body: dict[str, Any] = {"ok": ok, "data": data}
        if error is not None:
            body["error"] = error
        mid = self.publish(f"replies/{command_id}", orjson.dumps(body))
        wait_until(lambda: self.acked(mid), WAIT)

    def answer(self, **reply: Any) -> tuple[str, dict[str, Any], int]:
        """Reply to the next command; return it."""
        command = self.next_command()
        self.reply(command[1]["id"], **reply)
        return command

    def disconnected(self) -> bool:
        return any(seen[0] == "disconnected" for seen in self.seen)

    def silence(self) -> socket.socket:
        """Stop paho's loop (no more PINGREQs, nothing read) and keep the socket open; return it."""
        self.client.loop_stop()
        self._running = False
        return self.client.socket()

    def drop(self) -> None:
        """The network fails: the socket is reset (RST), with no DISCONNECT."""
        sock = self.silence()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def close(self) -> None:
        if self._running:
            self.client.disconnect()
            self.client.loop_stop()
            self._running = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mqtt_device(gateway: Gateway, device: str | None = None, **options: Any) -> MqttDevice:
    """A paho device whose CONNECT was accepted (return code 0, session present 0)."""
    client = MqttDevice(gateway, device, **options)
    assert client.connack() == (False, "Success"), client.seen
    return client


def closed_by_gateway(sock: socket.socket) -> bool:
    """Whether the gateway closed this socket, reading (and dropping) whatever it sent before."""
    sock.setblocking(True)
    sock.settimeout(WAIT)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


class RawMqtt:
    """A device on a bare socket: sends exactly the bytes it is given; reads the gateway's packets one by one."""

    def __init__(self, gateway: Gateway) -> None:
        self.sock = socket.create_connection(("127.0.0.1", gateway.mqtt_port), timeout=WAIT)
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def connect(self, device: str, password: str | None = None, **options: Any) -> int:
        """Send a CONNECT; the CONNACK's return code (its session present flag must be 0)."""
        self.send(build.connect(device, password, **options))
        first, body = self.read()
        assert first == CONNACK and len(body) == 2 and body[0] == 0, (first, body)
        return body[1]

    def read(self) -> tuple[int, bytes]:
        """The gateway's next packet as (first byte, body); raises Closed when the gateway closes instead."""
        while (packet := self._split()) is None:
            data = self._receive()
            if not data:
                raise Closed("the gateway closed the connection")
            self._buffer += data
        return packet

    def _receive(self) -> bytes:
        """The next bytes of the gateway's stream; b"" once it has closed it."""
        try:
            return self.sock.recv(65536)
        except ConnectionResetError:
            return b""

    def _split(self) -> tuple[int, bytes] | None:
        length, shift = 0, 0
        for index in range(1, min(len(self._buffer), 5)):
            length |= (self._buffer[index] & 0x7F) << shift
            shift += 7
            if not self._buffer[index] & 0x80:
                end = index + 1 + length
                if len(self._buffer) < end:
                    return None
                packet = (self._buffer[0], self._buffer[index + 1:end])
                self._buffer = self._buffer[end:]
                return packet
        return None

    def expect_closed(self) -> None:
        """The gateway closes the connection without another packet."""
        try:
            packet = self.read()
        except Closed:
            return
        except TimeoutError:
            pytest.fail(f"the gateway did not close the connection within {WAIT}s")
        pytest.fail(f"expected the connection to close, got {packet}")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RawMqttWs(RawMqtt):
    """RawMqtt over `GET /mqtt`: what it sends travels in binary WebSocket messages, one per `send` argument."""

    def __init__(self, gateway: Gateway, subprotocols: tuple[str, ...] = ("mqtt",)) -> None:
        self.sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=WAIT)
        self._buffer = b""
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.ws.send(Request(host=f"127.0.0.1:{gateway.port}", target="/mqtt",
                                               subprotocols=list(subprotocols))))
        self.upgrade: AcceptConnection | RejectConnection | None = None
        while self.upgrade is None:
            self.ws.receive_data(self.sock.recv(65536) or None)
            self.upgrade = next((event for event in self.ws.events()
                                 if isinstance(event, AcceptConnection | RejectConnection)), None)

    def send(self, *messages: bytes) -> None:
        self.sock.sendall(b"".join(self.ws.send(BytesMessage(data=message)) for message in messages))

    def send_text(self, text: str) -> None:
        self.sock.sendall(self.ws.send(TextMessage(data=text)))

    def _receive(self) -> bytes:
        while True:
            events = list(self.ws.events())
            if data := b"".join(bytes(event.data) for event in events if isinstance(event, Message)):
                return data
            if any(isinstance(event, CloseConnection) for event in events):
                return b""
            chunk = super()._receive()
            self.ws.receive_data(chunk or None)
