"""MQTT 5.0 devices against real gunicorn and the real RabbitMQ (PROTOCOL.md section 9).

Over TCP, TLS (MQTT_TLS_PORT, a trustme CA) and `/mqtt` WebSocket: the CONNACK and
its properties, each refusal code, commands with their properties, events not
stored (PUBACK 0x83, the connection stays), takeover across protocol levels, an
operator's kick, topic aliases, the device's Receive Maximum, presence, and the
Will Delay Interval across two gateway instances. Devices are bare sockets
(support/mqtt5_devices.py), where a test must see every packet and property, or
paho-mqtt 2.x in MQTTv5 mode, unmodified.
"""

from __future__ import annotations

import shutil
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest
import requests
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from app.mqtt.packets import Properties
from support.devices import in_background, uid
from support.gateways import API_TOKEN, Gateway, start_gateway
from support.mqtt5_devices import (
    DISCONNECT,
    PUBACK,
    PUBLISH,
    SUBACK,
    Raw5,
    command_publish,
    publish5,
    reason_and_properties,
    subscribe5,
)
from support.mqtt_devices import RawMqtt, token
from support.rabbitmq import PRIVATE_VHOST, EventTap, private_vhost, routed
from support.tls_devices import Pki
from support.waiting import WAIT, wait_until

API = {"Authorization": f"Bearer {API_TOKEN}"}
SERVER_PROPERTIES = Properties(receive_maximum=64, maximum_qos=1, retain_available=0, maximum_packet_size=65536,
                               topic_alias_maximum=16, subscription_identifiers_available=0,
                               shared_subscription_available=0)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.make(tmp_path_factory.mktemp("pki5"))


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Gateway]:
    """Two workers with TLS on; HEARTBEAT 30 (a will is held at most 60 s)."""
    instance = start_gateway(tmp_path_factory.mktemp("mqtt5"), workers=2, HELLO_TIMEOUT="2",
                             MQTT_MAX_KEEPALIVE="600", **pki.tls_env())
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def second(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Another instance on the same RabbitMQ: a host of its own, as far as devices can tell."""
    instance = start_gateway(tmp_path_factory.mktemp("mqtt5-b"), workers=1)
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """On a vhost of its own, so that no catch-all queue of another tool routes its events."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is needed to make a private vhost (the shared one may route every key)")
    instance = start_gateway(tmp_path_factory.mktemp("mqtt5-private"), workers=1,
                             AMQP_URL=private_vhost(PRIVATE_VHOST))
    yield instance
    instance.stop()


# == CONNECT ==========================================================================================
@pytest.mark.parametrize(("transport", "presence"), [("tcp", "mqtt"), ("tls", "mqtts"), ("ws", "mqtt-ws")])
def test_connack_properties_and_presence(gw: Gateway, pki: Pki, transport: str, presence: str) -> None:
    device = uid("mq5")
    with EventTap(f"{device}.session.*") as tap, Raw5(gw, transport, pki) as raw:
        code, props = raw.connect(device, keep_alive=0, props=Properties(session_expiry_interval=3600))
        assert code == 0x00
        assert props == Properties(session_expiry_interval=0, server_keep_alive=600, **_fields(SERVER_PROPERTIES))
        assert tap.get(f"{device}.session.connected")["data"] == {"transport": presence, "mqtt": 5}


def test_a_keep_alive_within_the_maximum_is_not_repeated(gw: Gateway) -> None:
    with Raw5(gw) as raw:
        assert raw.connect(uid("mq5"), keep_alive=30) == (0x00, SERVER_PROPERTIES)


def _fields(props: Properties) -> dict[str, Any]:
    return {name: value for name in props.__dataclass_fields__ if (value := getattr(props, name)) not in (None, ())}


@pytest.mark.parametrize(("case", "options", "device", "code"), [
    ("wrong token", {"password": "00" * 32}, None, 0x86),
    ("no password", {"password": None}, None, 0x86),
    ("client id with a dot", {}, "lock.5", 0x85),
    ("will on another topic", {"will": ("status/gone", b"x")}, None, 0x87),
    ("an authentication method", {"props": Properties(authentication_method="SCRAM-SHA-256")}, None, 0x8C),
])
def test_refused_connects_say_why(gw: Gateway, case: str, options: dict, device: str | None, code: int) -> None:
    with Raw5(gw) as raw:
        assert raw.connect(device or uid("mq5"), **options) == (code, Properties(reason_string="unauthorized")), case
        raw.expect_closed()


def test_a_banned_device_is_refused_0x8a_with_retry_after(gw: Gateway) -> None:
    device = uid("mq5")
    banned = requests.put(f"{gw.http}/devices/{device}/ban", json={"for": 120}, headers=API, timeout=20)
    assert banned.status_code == 200, banned.text
    try:
        with Raw5(gw) as raw:
            code, props = raw.connect(device)
            assert code == 0x8A and props is not None and props.reason_string == "banned"
            [(key, value)] = props.user_properties
            assert key == "retry_after" and 100 < float(value) <= 120
            raw.expect_closed()
    finally:
        requests.delete(f"{gw.http}/devices/{device}/ban", headers=API, timeout=20)


def test_a_live_session_banned_gets_disconnect_0x98(gw: Gateway) -> None:
    device = uid("mq5")
    with Raw5(gw) as raw:
        raw.connect(device)
        try:
            requests.put(f"{gw.http}/devices/{device}/ban", json={"for": 60}, headers=API, timeout=20)
            code, props = raw.expect(DISCONNECT)
            assert code == 0x98 and props is not None and props.reason_string == "banned"
            assert [key for key, _ in props.user_properties] == ["retry_after"]
        finally:
            requests.delete(f"{gw.http}/devices/{device}/ban", headers=API, timeout=20)


# == commands =========================================================================================
def test_a_command_round_trip_with_paho_v5(gw: Gateway) -> None:
    device = uid("mq5")
    messages: list[Any] = []
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=device, protocol=paho.MQTTv5,
                         reconnect_on_failure=False)
    client.username_pw_set("sdk", token(device))
    client.on_message = lambda c, u, message: messages.append(message)
    client.connect("127.0.0.1", gw.mqtt_port, 60)
    client.loop_start()
    try:
        client.subscribe("commands/#", qos=1)
        wait_until(lambda: requests.get(f"{gw.http}/devices/{device}", headers=API, timeout=10).status_code == 200,
                   WAIT)
        answer = in_background(gw.command, device, "unlock", {"for": 5}, timeout=20)
        wait_until(lambda: messages, WAIT)
        message = messages[0]
        assert message.topic == "commands/unlock"
        props = message.properties
        command_id = props.CorrelationData.decode()
        assert props.ResponseTopic == f"replies/{command_id}" and props.ContentType == "application/json"
        assert props.PayloadFormatIndicator == 1 and 15 <= props.MessageExpiryInterval <= 20
        reply = PahoProperties(PacketTypes.PUBLISH)
        reply.CorrelationData = props.CorrelationData
        client.publish(props.ResponseTopic, b'{"ok": true, "data": {"opened": 1}}', qos=1, properties=reply)
        response = answer.result(timeout=WAIT)
        assert response.status_code == 200 and response.json()["data"] == {"opened": 1}, response.text
    finally:
        client.disconnect()
        client.loop_stop()


def test_receive_maximum_1_holds_the_second_command_until_the_first_is_pubacked(gw: Gateway) -> None:
    device = uid("mq5")
    with Raw5(gw) as raw:
        raw.connect(device, props=Properties(receive_maximum=1))
        raw.send(subscribe5(1, ("commands/#", 1)))
        assert raw.read() == (SUBACK, b"\x00\x01\x00\x01")  # no properties, QoS 1 granted
        answers = [in_background(gw.command, device, name, None, timeout=20) for name in ("first", "second")]
        first, body = raw.read()
        assert first & 0xF0 == PUBLISH
        topic, packet_id, _, _ = command_publish(body, 1)
        raw.raw.sock.settimeout(1.0)
        with pytest.raises(TimeoutError):  # the second waits for the first's PUBACK
            raw.read()
        raw.raw.sock.settimeout(WAIT)
        raw.send(bytes((0x40, 2)) + packet_id.to_bytes(2, "big"))  # type: ignore[union-attr]
        first, body = raw.read()
        assert first & 0xF0 == PUBLISH and {topic, command_publish(body, 1)[0]} == {"commands/first", "commands/second"}
        for answer in answers:
            answer.cancel()


# == events ===========================================================================================
def test_an_unroutable_event_gets_puback_0x83_and_the_next_one_0x00_on_the_same_connection(private: Gateway) -> None:
    device, name = uid("nobody-listens"), f"probe.{uuid.uuid4().hex[:8]}"
    if routed(f"{device}.{name}", PRIVATE_VHOST):
        pytest.skip(f"a queue on vhost {PRIVATE_VHOST} routes every key: an unroutable event cannot be made")
    with Raw5(private) as raw, EventTap(f"{device}.kept.*", vhost=PRIVATE_VHOST) as tap:
        raw.connect(device)
        raw.send(publish5(f"events/{name}", b"1", packet_id=1))
        first, body = raw.read()
        assert first == PUBACK and body[:2] == b"\x00\x01"
        code, props = reason_and_properties(first, body)
        assert code == 0x83 and props is not None and props.reason_string == "unroutable"
        assert [key for key, _ in props.user_properties] == ["retry_after"]
        raw.send(publish5("events/kept.one", b'{"n": 2}', packet_id=2))
        assert raw.read() == (PUBACK, b"\x00\x02")
        assert tap.get(f"{device}.kept.one")["data"] == {"n": 2}


def test_topic_aliases_name_events(gw: Gateway) -> None:
    device = uid("mq5")
    with EventTap(f"{device}.door.*") as tap, Raw5(gw) as raw:
        raw.connect(device)
        raw.send(publish5("events/door.opened", b"1", packet_id=1, props=Properties(topic_alias=3)))
        raw.send(publish5("", b"2", packet_id=2, props=Properties(topic_alias=3)))
        assert [raw.read(), raw.read()] == [(PUBACK, b"\x00\x01"), (PUBACK, b"\x00\x02")]
        assert [tap.get(f"{device}.door.opened")["data"] for _ in range(2)] == [1, 2]


# == takeover, operators ==============================================================================
def test_takeover_from_3_1_1_to_5_and_back(gw: Gateway) -> None:
    device = uid("mq5")
    with RawMqtt(gw) as old, Raw5(gw) as v5:
        assert old.connect(device, token(device)) == 0x00
        assert v5.connect(device)[0] == 0x00
        old.expect_closed()  # 3.1.1 has no way to say why
        with RawMqtt(gw) as again:
            assert again.connect(device, token(device)) == 0x00
            assert v5.expect(DISCONNECT) == (0x8E, Properties(reason_string="replaced"))
            v5.expect_closed()


def test_an_operators_kick_is_disconnect_0x98(gw: Gateway) -> None:
    device = uid("mq5")
    with Raw5(gw) as raw:
        raw.connect(device)
        kicked = requests.delete(f"{gw.http}/devices/{device}/session", headers=API, timeout=10)
        assert kicked.status_code == 200, kicked.text
        assert raw.expect(DISCONNECT) == (0x98, Properties(reason_string="kicked"))


# == Will Delay Interval across instances =============================================================
def _cut(raw: Raw5) -> None:
    """The network fails: reset, no DISCONNECT."""
    raw.raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    raw.close()


def test_a_delayed_will_comes_after_session_closed(gw: Gateway) -> None:
    device = uid("mq5")
    with EventTap(f"{device}.#") as tap:
        raw = Raw5(gw)
        raw.connect(device, will=("events/lock.lost", b'"gone"'), will_props=Properties(will_delay_interval=2))
        tap.get(f"{device}.session.connected")
        _cut(raw)
        assert tap.get()["name"] == "session.closed"
        assert tap.get(timeout=WAIT)["name"] == "lock.lost"


def test_a_new_session_on_another_instance_within_the_delay_drops_the_will(gw: Gateway, second: Gateway) -> None:
    device = uid("mq5")
    with EventTap(f"{device}.#") as tap:
        raw = Raw5(gw)
        raw.connect(device, will=("events/lock.lost", b'"gone"'), will_props=Properties(will_delay_interval=4))
        tap.get(f"{device}.session.connected")
        _cut(raw)
        assert tap.get()["name"] == "session.closed"
        with Raw5(second) as again:
            assert again.connect(device)[0] == 0x00
            assert tap.get(f"{device}.session.connected")["data"]["mqtt"] == 5
            with pytest.raises(pytest.fail.Exception):
                tap.get(f"{device}.lock.lost", timeout=6)
