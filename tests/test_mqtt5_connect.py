"""What an MQTT 5 CONNECT sets up, against real gunicorn and RabbitMQ (PROTOCOL.md sections 8 and 9).

A CONNECT over MAX_FRAME_BYTES: a version 5 client hears CONNACK 0x95, a 3.1.1 one is
closed in silence, and both are counted as `frame_too_large`. A will's Message Expiry
Interval and User Properties reach RabbitMQ as an event's do (expiration, headers),
and a will marked UTF-8 that is not gets CONNACK 0x99. Devices are bare sockets
(support/mqtt5_devices.py), so that every byte the gateway sends is seen.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import orjson
import pytest

from app.mqtt.packets import Properties
from bench.stampede import mqtt_codec as build
from support.devices import uid
from support.gateways import Gateway, counted, start_gateway
from support.mqtt5_devices import CONNACK, Raw5, connect5
from support.mqtt_devices import RawMqtt, token
from support.rabbitmq import EventTap
from support.waiting import WAIT, wait_until

MAX_FRAME_BYTES = 4096
TOO_LARGE = 'warren_errors_sent_total{code="frame_too_large"}'


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One worker, so that the error counts of one test are its own."""
    instance = start_gateway(tmp_path_factory.mktemp("mqtt5-connect"), workers=1, HELLO_TIMEOUT="2",
                             MAX_FRAME_BYTES=str(MAX_FRAME_BYTES))
    yield instance
    instance.stop()


# == a CONNECT over MAX_FRAME_BYTES ===================================================================
@pytest.mark.parametrize("transport", ["tcp", "ws"])
def test_an_oversized_version_5_connect_gets_connack_0x95_frame_too_large(gw: Gateway, transport: str) -> None:
    before = counted(gw, TOO_LARGE)
    packet = connect5(uid("mq5"), password="x" * MAX_FRAME_BYTES)
    assert len(packet) > MAX_FRAME_BYTES
    with Raw5(gw, transport) as raw:
        raw.send(packet)
        assert raw.read() == (CONNACK, b"\x00\x95\x12\x1f\x00\x0fframe_too_large")  # that and nothing more
        raw.expect_closed()
    wait_until(lambda: counted(gw, TOO_LARGE) == before + 1, WAIT)


def test_an_oversized_3_1_1_connect_is_closed_without_a_connack(gw: Gateway) -> None:
    before = counted(gw, TOO_LARGE)
    device = uid("mq")
    packet = build.connect(device, token(device) + "x" * MAX_FRAME_BYTES)
    assert len(packet) > MAX_FRAME_BYTES
    with RawMqtt(gw) as raw:
        raw.send(packet)
        raw.expect_closed()
    wait_until(lambda: counted(gw, TOO_LARGE) == before + 1, WAIT)


# == will properties ==================================================================================
def test_a_wills_expiry_and_user_properties_reach_rabbitmq(gw: Gateway) -> None:
    device = uid("mq5")
    users = (("site", "north"), ("tag", "x"), ("tag", "y"))
    will_props = Properties(message_expiry_interval=300, user_properties=users)
    with EventTap(f"{device}.#") as tap:
        raw = Raw5(gw)
        assert raw.connect(device, will=("events/lock.lost", b'"gone"'), will_props=will_props)[0] == 0x00
        session = tap.get(f"{device}.session.connected")["session"]
        raw.raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        raw.close()  # the network fails: a reset, no DISCONNECT
        message = tap.message(f"{device}.lock.lost")
    assert message.properties["application_headers"] == {"site": "north", "tag": ["x", "y"]}
    assert message.properties["expiration"] == "300000"
    assert message.properties["delivery_mode"] == 2  # persistent, as every event
    body = orjson.loads(message.body)
    assert (body["id"], body["data"]) == (f"will-{session}", "gone")


def test_a_will_marked_utf8_that_is_not_gets_connack_0x99(gw: Gateway) -> None:
    with Raw5(gw) as raw:
        refusal = raw.connect(uid("mq5"), will=("events/lock.lost", b"\xff\xfe"),
                              will_props=Properties(payload_format_indicator=1))
        assert refusal == (0x99, Properties(reason_string="bad_frame"))
        raw.expect_closed()
