"""A device that speaks MQTT 5.0 to Warren (PROTOCOL.md section 9): the same work as mqtt_device's 3.1.1
device, as a stock version 5 client does it, so that the two cost the same to compare.

    CONNECT level 5 (no properties)                               -> CONNACK 0x00 (and the gateway's properties)
    SUBSCRIBE commands/# (subscription options: QoS 1)            -> SUBACK granting 0x01
    every heartbeat: PINGREQ                                      -> PINGRESP
    PUBLISH commands/<name> (Response Topic replies/<id>, ...)    -> PUBACK, then PUBLISH to the Response Topic
    PUBLISH events/bench.tick (QoS 1, no properties)              -> PUBACK 0x00 (ack) or 0x83 (nack, its
                                                                     Reason String counted as the reason)

A refused CONNECT counts as `connack:0x89` and so on, with the refusal's
`retry_after` honoured; a DISCONNECT from the gateway ends the session under its
Reason String (the section 4 code: `replaced`, `shutting_down`, ...) or
`disconnect:0x8e` without one.
"""

from __future__ import annotations

import time

import orjson

from bench.stampede import mqtt5_codec, mqtt_codec
from bench.stampede.device import Failure, Inbox, World
from bench.stampede.mqtt5_codec import CONNACK, DISCONNECT, NAMES5, PINGRESP, PUBACK, PUBLISH, SUBACK
from bench.stampede.mqtt_device import COMMANDS, EVENT_TOPIC, REPLY, MqttDevice, keep_alive


class Mqtt5Device(MqttDevice):
    __slots__ = ()

    def greet(self, inbox: Inbox, world: World) -> float:
        seconds = keep_alive(world.heartbeat)
        inbox.send(mqtt5_codec.connect(self.name, self.token, seconds, username=self.name))
        expect(inbox.next(), CONNACK, b"\x00")
        inbox.send(mqtt5_codec.subscribe(world.packet_id(), COMMANDS, 1))
        expect(inbox.next(), SUBACK, b"\x01")
        return float(seconds)

    def send_event(self, event_id: str, seq: int, world: World) -> bool:
        packet_id = world.packet_id()
        self.pending[packet_id] = (event_id, time.monotonic())  # before the write: the PUBACK may come first
        payload = orjson.dumps({"ref": event_id, "seq": seq})
        if self.send(mqtt5_codec.publish(EVENT_TOPIC, payload, packet_id)):
            return True
        self.pending.pop(packet_id, None)
        return False

    def handle(self, packet: mqtt_codec.Packet, world: World) -> tuple[str, float | None] | None:
        kind = packet[0]
        stats = world.stats
        if kind == PINGRESP:
            stats.pongs += 1
        elif kind == PUBACK:
            sent = self.pending.pop(packet[1], None)  # None: the PUBACK of a reply
            if sent is None:
                return None
            event_id, at = sent
            if packet[2] >= 0x80:
                stats.nacked[packet[3] or f"puback:0x{packet[2]:02x}"] += 1
            else:
                stats.acked += 1
                stats.acked_ids.append(event_id)
                stats.ack_ms.append(round((time.monotonic() - at) * 1000, 2))
        elif kind == PUBLISH:
            self.answer(packet, world)
        elif kind == DISCONNECT:
            return packet[2] or f"disconnect:0x{packet[1]:02x}", packet[3]
        elif kind == CONNACK:
            return "unexpected:CONNACK", None
        return None

    def answer(self, packet: mqtt_codec.Packet, world: World) -> None:
        """Acknowledge a command and reply on its Response Topic, in one write (two would wait on Nagle)."""
        _, topic, _, packet_id, response_topic = packet
        if response_topic is None or not topic.startswith("commands/"):
            return
        reply = mqtt5_codec.publish(response_topic, REPLY, world.packet_id())
        self.send(mqtt_codec.puback(packet_id) + reply if packet_id is not None else reply)
        world.stats.commands += 1


def expect(packet: mqtt_codec.Packet, kind: int, codes: bytes) -> None:
    """Raise a Failure unless `packet` is a `kind` (CONNACK or SUBACK) carrying reason code(s) `codes`; a
    refused CONNACK's `retry_after` goes with it, and a DISCONNECT instead is counted under its reason."""
    if packet[0] != kind:
        if packet[0] == DISCONNECT:
            raise Failure(packet[2] or f"disconnect:0x{packet[1]:02x}", packet[3])
        raise Failure(f"unexpected:{NAMES5.get(packet[0], packet[0])}")
    got = bytes((packet[1],)) if kind == CONNACK else packet[2]
    if got != codes:
        raise Failure(f"{NAMES5[kind].lower()}:0x{got.hex()}", packet[3] if kind == CONNACK else None)
