"""The MQTT codec against real clients: paho-mqtt 2.2.0 and the mosquitto_pub/mosquitto_sub binaries.

Each test listens on its own socket (the kernel picks the port: a broker may
hold 1883), lets a real client connect, reads what it sends through
`MqttDecoder`, and answers with the codec's encoders, checking that the client
understood them (its callbacks, its output, its exit status).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections import deque
from collections.abc import Iterator

import paho.mqtt.client as paho
import pytest

from app.mqtt import (
    Connect,
    Disconnect,
    MqttDecoder,
    MqttError,
    Packet,
    PingReq,
    Properties,
    PubAck,
    Publish,
    Subscribe,
    Unsubscribe,
    Will,
    connack,
    pingresp,
    puback,
    publish,
    suback,
    unsuback,
)
from support.waiting import wait_until

LIMIT = 65536


class Peer:
    """The server side of one client connection, read through the codec."""

    def __init__(self, listener: socket.socket) -> None:
        self.sock, _ = listener.accept()
        self.sock.settimeout(10)
        self.decoder = MqttDecoder(LIMIT)
        self.queue: deque[Packet] = deque()
        self.pings = 0

    def read(self) -> Packet:
        while not self.queue:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the client closed the connection")
            self.queue.extend(self.decoder.feed(data))
        return self.queue.popleft()

    def next(self) -> Packet:
        """The next packet that is not a PINGREQ (those a client's keep-alive timer sends at any moment)."""
        while isinstance(packet := self.read(), PingReq):
            self.pings += 1
            self.send(pingresp())
        return packet

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """Our own listening socket on a port the kernel picks (a broker may hold 1883)."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        sock.settimeout(10)
        yield sock


def port_of(sock: socket.socket) -> int:
    return sock.getsockname()[1]


def test_paho_and_the_codec_understand_each_other(listener: socket.socket) -> None:
    seen: list[tuple] = []
    logs: list[str] = []
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="lock-0001", protocol=paho.MQTTv311)
    client.will_set("events/gone", b"bye", qos=1)
    client.username_pw_set("sdk-user", "a1b2c3")
    client.on_connect = lambda c, u, flags, code, props: seen.append(("connect", flags.session_present, code.value))
    client.on_subscribe = lambda c, u, mid, codes, props: seen.append(("subscribe", mid, [x.value for x in codes]))
    client.on_unsubscribe = lambda c, u, mid, codes, props: seen.append(("unsubscribe", mid))
    client.on_publish = lambda c, u, mid, code, props: seen.append(("published", mid))
    client.on_message = lambda c, u, msg: seen.append(("message", msg.topic, msg.payload, msg.qos, msg.retain))
    client.on_log = lambda c, u, level, text: logs.append(text)
    client.connect("127.0.0.1", port_of(listener), keepalive=1)
    client.loop_start()
    try:
        peer = Peer(listener)
        assert peer.next() == Connect("MQTT", 4, "lock-0001", True, 1, Will("events/gone", b"bye", 1, False),
                                      "sdk-user", b"a1b2c3")
        peer.send(connack(0, session_present=True))
        wait_until(lambda: ("connect", True, 0) in seen)

        _, mid = client.subscribe([("commands/#", 1), ("other/x", 0)])
        assert peer.next() == Subscribe(mid, [("commands/#", 1), ("other/x", 0)])
        peer.send(suback(mid, [1, 0x80]))
        wait_until(lambda: ("subscribe", mid, [1, 0x80]) in seen)

        client.publish("events/door.opened", b'{"a":1}', qos=0)
        assert peer.next() == Publish("events/door.opened", b'{"a":1}')
        mid = client.publish("events/door.closed", b"23.5 C", qos=1).mid
        assert peer.next() == Publish("events/door.closed", b"23.5 C", 1, False, False, mid)
        peer.send(puback(mid))
        wait_until(lambda: ("published", mid) in seen)

        peer.send(publish("commands/unlock", b'{"id":"c-1","data":null}', qos=1, packet_id=77)
                  + publish("commands/lock", b"", retain=True))
        assert peer.next() == PubAck(77)
        wait_until(lambda: ("message", "commands/unlock", b'{"id":"c-1","data":null}', 1, False) in seen)
        wait_until(lambda: ("message", "commands/lock", b"", 0, True) in seen)

        _, mid = client.unsubscribe("commands/#")
        assert peer.next() == Unsubscribe(mid, ["commands/#"])
        peer.send(unsuback(mid))
        wait_until(lambda: ("unsubscribe", mid) in seen)

        assert peer.read() == PingReq()  # idle now, so its keep-alive (1 s) sends one
        peer.send(pingresp())
        wait_until(lambda: "Received PINGRESP" in logs, timeout=5)
        client.disconnect()
        assert peer.next() == Disconnect()
    finally:
        client.loop_stop()


@pytest.mark.parametrize(("code", "reason"), [(2, "Client identifier not valid"), (3, "Server unavailable"),
                                              (4, "Bad user name or password"), (5, "Not authorized")])
def test_paho_reads_our_connack_refusals(listener: socket.socket, code: int, reason: str) -> None:
    seen: list[str] = []
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="lock-0001", reconnect_on_failure=False)
    client.on_connect = lambda c, u, flags, rc, props: seen.append(str(rc))
    client.connect("127.0.0.1", port_of(listener))
    client.loop_start()
    try:
        peer = Peer(listener)
        assert isinstance(peer.next(), Connect)
        peer.send(connack(code))
        wait_until(lambda: seen)
        assert seen == [reason]
    finally:
        client.loop_stop()


def test_paho_answers_connack_0x01_by_retrying_as_mqtt_3_1(listener: socket.socket) -> None:
    """What the gateway will see: paho reconnects at once with 'MQIsdp' level 3, which the codec refuses."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="lock-0001")
    client.connect("127.0.0.1", port_of(listener))
    client.loop_start()
    try:
        peer = Peer(listener)
        assert peer.next() == Connect("MQTT", 4, "lock-0001", True, 60)
        peer.send(connack(1))
        with pytest.raises(MqttError) as caught:
            Peer(listener).next()
        assert caught.value.code == "bad_frame" and "MQIsdp" in caught.value.message
    finally:
        client.loop_stop()


def mosquitto(binary: str, *args: str) -> subprocess.Popen:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed")
    return subprocess.Popen([path, "-h", "127.0.0.1", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_mosquitto_pub_is_decoded(listener: socket.socket) -> None:
    process = mosquitto("mosquitto_pub", "-p", str(port_of(listener)), "-V", "mqttv311", "-i", "lock-0002",
                        "-u", "sdk", "-P", "f00d", "-k", "300", "--will-topic", "events/gone", "--will-payload",
                        "bye", "--will-qos", "1", "--will-retain", "-q", "1", "-t", "events/door.opened",
                        "-m", '{"battery":97}')
    peer = Peer(listener)
    assert peer.next() == Connect("MQTT", 4, "lock-0002", True, 300, Will("events/gone", b"bye", 1, True), "sdk",
                                  b"f00d")
    peer.send(connack(0))
    packet = peer.next()
    assert packet == Publish("events/door.opened", b'{"battery":97}', 1, False, False, packet.packet_id)
    peer.send(puback(packet.packet_id))
    assert peer.next() == Disconnect()
    assert process.wait(10) == 0, process.stderr.read()


def test_mosquitto_sub_is_decoded_and_reads_our_publish(listener: socket.socket) -> None:
    process = mosquitto("mosquitto_sub", "-p", str(port_of(listener)), "-i", "lock-0003", "-q", "1",
                        "-t", "commands/#", "-t", "commands/+", "-C", "2", "-v")
    peer = Peer(listener)
    hello = peer.next()
    assert isinstance(hello, Connect) and hello.client_id == "lock-0003" and hello.password is None
    peer.send(connack(0))
    request = peer.next()
    assert request == Subscribe(request.packet_id, [("commands/#", 1), ("commands/+", 1)])
    peer.send(suback(request.packet_id, [1, 0x80]))
    peer.send(publish("commands/unlock", b'{"id":"c-9","data":{"for":5}}', qos=1, packet_id=300))
    assert peer.next() == PubAck(300)
    peer.send(publish("commands/open", b"x" * 200))  # a two-byte remaining length
    assert peer.next() == Disconnect()
    out, err = process.communicate(timeout=10)
    assert process.returncode == 0, err
    assert out.decode().splitlines() == ['commands/unlock {"id":"c-9","data":{"for":5}}', "commands/open " + "x" * 200]


@pytest.mark.parametrize(("version", "expected"), [
    ("5", Connect("MQTT", 5, "x", True, 60, properties=Properties(receive_maximum=20))), ("31", None)])
def test_mosquitto_other_versions(listener: socket.socket, version: str, expected: Connect | None) -> None:
    """MQTT 5 decodes in full (test_mqtt5_real_clients.py goes further); 3.1 ('MQIsdp') is not MQTT 3.1.1 at all."""
    process = mosquitto("mosquitto_pub", "-p", str(port_of(listener)), "-V", version, "-i", "x", "-t", "a", "-m", "b")
    try:
        peer = Peer(listener)
        if expected is None:
            with pytest.raises(MqttError) as caught:
                peer.next()
            assert caught.value.code == "bad_frame" and "MQIsdp" in caught.value.message
        else:
            assert peer.next() == expected
            peer.send(connack(1))
        peer.sock.close()
    finally:
        process.kill()
        process.wait(10)
