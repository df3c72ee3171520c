"""The load tool's MQTT 5 client (bench.stampede.mqtt5_codec, mqtt5_device) against the gateway's codec:
what the device sends decodes in app.mqtt at level 5, and what app.mqtt.packets5 sends parses in the device."""

from __future__ import annotations

import time

import orjson
import pytest

from app.mqtt import MqttDecoder, Properties, PubAck, Publish, Subscribe
from app.mqtt import packets5 as p5
from bench.stampede import mqtt5_codec as c5
from bench.stampede import mqtt_codec
from bench.stampede.device import Failure, Stats
from bench.stampede.links import Target
from bench.stampede.mqtt5_device import Mqtt5Device, expect


def decoded(*packets: bytes) -> list:
    decoder = MqttDecoder(65536)
    found = decoder.feed(c5.connect("dev-1", "tok", 30, username="dev-1") + b"".join(packets))
    assert decoder.protocol_level == 5
    return found


def test_connect_decodes_at_level_5() -> None:
    (connect,) = decoded()
    assert (connect.protocol_level, connect.client_id, connect.keep_alive, connect.clean_session) == (
        5, "dev-1", 30, True)
    assert connect.password == b"tok"
    assert connect.username == "dev-1"


def test_subscribe_publish_puback_decode_at_level_5() -> None:
    long_payload = b"x" * 300  # a two-byte remaining length
    _, subscribe, event, reply, long_one, ack = decoded(
        c5.subscribe(7, "commands/#", 1), c5.publish("events/bench.tick", b'{"seq":1}', 8),
        c5.publish("replies/c-1", b'{"ok":true}', 9), c5.publish("events/big", long_payload, 10),
        mqtt_codec.puback(11))
    assert isinstance(subscribe, Subscribe)
    assert (subscribe.packet_id, subscribe.filters) == (7, [("commands/#", 1)])
    assert not subscribe.options[0].no_local
    assert isinstance(event, Publish)
    assert (event.topic, event.payload, event.qos, event.packet_id) == ("events/bench.tick", b'{"seq":1}', 1, 8)
    assert event.properties in (None, Properties())
    assert (reply.topic, reply.payload, reply.packet_id) == ("replies/c-1", b'{"ok":true}', 9)
    assert (long_one.payload, long_one.packet_id) == (long_payload, 10)
    assert isinstance(ack, PubAck)
    assert ack.packet_id == 11


def test_server_packets_parse() -> None:
    connack = p5.connack(0, props=Properties(receive_maximum=100, maximum_qos=1, retain_available=0,
                                             maximum_packet_size=65536, topic_alias_maximum=16,
                                             subscription_identifiers_available=0, server_keep_alive=30))
    command = p5.publish("commands/reboot", b'{"id":"c-1","data":{}}', 1, 3, props=Properties(
        response_topic="replies/c-1", correlation_data=b"c-1", message_expiry_interval=60,
        content_type="application/json", payload_format_indicator=1))
    stream = b"".join((connack, p5.suback(7, [1]), command, p5.puback(8), p5.pingresp(),
                       p5.puback(9, 0x83, Properties(reason_string="unroutable",
                                                     user_properties=(("retry_after", "2.5"),))),
                       p5.disconnect(0x8E, Properties(reason_string="replaced"))))
    packets, rest = c5.parse(stream)
    assert rest == b""
    assert packets == [
        (c5.CONNACK, 0, None, None),
        (c5.SUBACK, 7, b"\x01"),
        (c5.PUBLISH, "commands/reboot", b'{"id":"c-1","data":{}}', 3, "replies/c-1"),
        (c5.PUBACK, 8, 0, None),
        (c5.PINGRESP,),
        (c5.PUBACK, 9, 0x83, "unroutable"),
        (c5.DISCONNECT, 0x8E, "replaced", None),
    ]


def test_parse_keeps_an_unfinished_packet() -> None:
    command = p5.publish("commands/x", b"{}" * 100, 1, 3, props=Properties(response_topic="replies/c"))
    for cut in range(len(command)):
        first, rest = c5.parse(command[:cut])
        assert first == []
        (packet,), left = c5.parse(rest + command[cut:])
        assert packet[4] == "replies/c"
        assert left == b""


def test_refusals_carry_their_reason_and_retry_after() -> None:
    refused = p5.connack(0x89, props=Properties(reason_string="overloaded", user_properties=(("retry_after", "3"),)))
    (packet,), _ = c5.parse(refused)
    with pytest.raises(Failure) as caught:
        expect(packet, c5.CONNACK, b"\x00")
    assert (caught.value.reason, caught.value.retry_after) == ("connack:0x89", 3.0)
    (packet,), _ = c5.parse(p5.disconnect(0x8B, Properties(reason_string="shutting_down",
                                                              user_properties=(("retry_after", "1"),))))
    with pytest.raises(Failure) as caught:
        expect(packet, c5.CONNACK, b"\x00")
    assert (caught.value.reason, caught.value.retry_after) == ("shutting_down", 1.0)
    (packet,), _ = c5.parse(p5.suback(1, [0x87]))
    with pytest.raises(Failure, match="suback:0x87"):
        expect(packet, c5.SUBACK, b"\x01")


def test_malformed_property_block_is_a_protocol_violation() -> None:
    with pytest.raises(c5.ProtocolViolation):
        c5.parse(b"\x30\x08\x00\x01a\x05\x03\x00\x05x")  # a Content Type longer than the block


class _World:
    def __init__(self) -> None:
        self.stats = Stats()
        self.ids = iter(range(100, 200))

    def packet_id(self) -> int:
        return next(self.ids)


class _Recorded(Mqtt5Device):
    """A device whose writes are kept instead of sent."""

    __slots__ = ("sent",)

    def send(self, data: bytes) -> bool:
        self.sent.append(data)
        return True


def test_device_acks_nacks_and_answers_on_the_response_topic() -> None:
    device = _Recorded("dev-1", b"secret", Target("mqtt5://127.0.0.1:1883"))
    sent: list[bytes] = []
    device.sent = sent
    world = _World()
    device.pending[5] = ("e-5", time.monotonic())
    device.pending[6] = ("e-6", time.monotonic())
    for raw in (p5.puback(5), p5.puback(6, 0x83, Properties(reason_string="broker_unavailable")), p5.pingresp()):
        ((packet,), _) = c5.parse(raw)
        assert device.handle(packet, world) is None  # type: ignore[arg-type]
    assert (world.stats.acked, world.stats.acked_ids, dict(world.stats.nacked), world.stats.pongs) == (
        1, ["e-5"], {"broker_unavailable": 1}, 1)
    ((command,), _) = c5.parse(p5.publish("commands/x", orjson.dumps({"id": "c-9"}), 1, 4,
                                          props=Properties(response_topic="replies/c-9")))
    device.handle(command, world)  # type: ignore[arg-type]
    assert world.stats.commands == 1
    (ack, reply) = MqttDecoder(1024).feed(c5.connect("d") + sent[0])[1:]
    assert ack.packet_id == 4
    assert (reply.topic, orjson.loads(reply.payload)) == ("replies/c-9", {"ok": True, "data": {}})
    ((end,), _) = c5.parse(p5.disconnect(0x8E, Properties(reason_string="replaced")))
    assert device.handle(end, world) == ("replaced", None)  # type: ignore[arg-type]
