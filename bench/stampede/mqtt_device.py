"""A device that speaks MQTT 3.1.1 to Warren (PROTOCOL.md section 8), as a stock client would use it.

    CONNECT (client id = device, password = token, keep alive = the heartbeat) -> CONNACK 0x00
    SUBSCRIBE commands/# at QoS 1                                             -> SUBACK granting 1
    every heartbeat: PINGREQ                                                  -> PINGRESP (a heartbeat answered)
    PUBLISH commands/<name> {"id", "data"} (QoS 1) -> PUBACK, then PUBLISH replies/<id> {"ok": true, "data": {}}
    PUBLISH events/bench.tick (QoS 1)                                         -> PUBACK (the event's ack)

The session counts as up at the SUBACK: only then can commands reach the device.
A command whose data holds `sent` (the sender's time.time(), bench.mqtt_peers
stamps its commands so) is also timed from that moment to its arrival here
(Stats.command_ms; sender and device are processes of one machine, one clock).
`BrokerMqttDevice` does the same work on a general MQTT broker (RabbitMQ's MQTT
plugin, Mosquitto: bench.mqtt_peers), its topics under `devices/<id>/`.
The gateway names an MQTT event itself, so the device's own event id travels in
the payload (`ref`), where the backend side looks for it (backend.EventVerifier).
A refused CONNECT is counted as `connack:0x05` and so on; the gateway has no
error frame for MQTT, so a session it ends is counted as `eof`.
"""

from __future__ import annotations

import time

import orjson

from bench.stampede import mqtt_codec
from bench.stampede.device import Device, Failure, Inbox, World
from bench.stampede.mqtt_codec import CONNACK, NAMES, PINGRESP, PUBACK, PUBLISH, SUBACK

COMMANDS = "commands/#"
EVENT_TOPIC = "events/bench.tick"
REPLY = orjson.dumps({"ok": True, "data": {}})
DEFAULT_KEEP_ALIVE = 30


def keep_alive(heartbeat: float | None) -> int:
    """CONNECT's keep alive: whole seconds, at least 1 (0 would mean the gateway's longest, MQTT_MAX_KEEPALIVE)."""
    return max(1, round(heartbeat)) if heartbeat else DEFAULT_KEEP_ALIVE


class MqttDevice(Device):
    __slots__ = ()

    def greet(self, inbox: Inbox, world: World) -> float:
        seconds = keep_alive(world.heartbeat)
        username, password = self.credentials()
        inbox.send(mqtt_codec.connect(self.name, password, seconds, username=username))
        expect(inbox.next(), CONNACK, b"\x00")
        inbox.send(mqtt_codec.subscribe(world.packet_id(), (self.topic(COMMANDS), 1)))
        expect(inbox.next(), SUBACK, b"\x01")
        return float(seconds)

    def credentials(self) -> tuple[str, str]:
        """CONNECT's user name and password: Warren reads the password as the device's token."""
        return self.name, self.token

    def topic(self, name: str) -> str:
        """The topic `name` (events/..., commands/#, replies/...) as this device's server names it."""
        return name

    def ping(self) -> bool:
        return self.send(mqtt_codec.PINGREQ)

    def send_event(self, event_id: str, seq: int, world: World) -> bool:
        packet_id = world.packet_id()
        self.pending[packet_id] = (event_id, time.monotonic())  # before the write: the PUBACK may come first
        payload = orjson.dumps({"ref": event_id, "seq": seq})
        if self.send(mqtt_codec.publish(self.topic(EVENT_TOPIC), payload, packet_id)):
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
            if sent is not None:
                event_id, at = sent
                stats.acked += 1
                stats.acked_ids.append(event_id)
                stats.ack_ms.append(round((time.monotonic() - at) * 1000, 2))
        elif kind == PUBLISH:
            self.answer(packet, world)
        elif kind == CONNACK:
            return "unexpected:CONNACK", None
        return None

    def answer(self, packet: mqtt_codec.Packet, world: World) -> None:
        """Acknowledge a command and reply to it, in one write (two small writes would wait on Nagle)."""
        _, topic, payload, packet_id = packet
        if not topic.startswith(self.topic("commands/")):
            return
        command = orjson.loads(payload)
        reply = mqtt_codec.publish(self.topic(f"replies/{command['id']}"), REPLY, world.packet_id())
        self.send(mqtt_codec.puback(packet_id) + reply if packet_id is not None else reply)
        world.stats.commands += 1
        data = command.get("data")
        if isinstance(data, dict) and "sent" in data:
            world.stats.command_ms.append(round((time.time() - data["sent"]) * 1000, 2))


class BrokerMqttDevice(MqttDevice):
    """The same device on a general MQTT broker: topics under `devices/<id>/` (the broker routes any topic,
    so each device keeps to its own), and the broker's default user (guest/guest, which RabbitMQ knows and
    Mosquitto, allowing anonymous clients, does not check) instead of a token."""

    __slots__ = ()

    def credentials(self) -> tuple[str, str]:
        return "guest", "guest"

    def topic(self, name: str) -> str:
        return f"devices/{self.name}/{name}"


def expect(packet: mqtt_codec.Packet, kind: int, codes: bytes) -> None:
    """Raise a Failure unless `packet` is a `kind` (CONNACK or SUBACK) carrying return code(s) `codes`."""
    if packet[0] != kind:
        raise Failure(f"unexpected:{NAMES.get(packet[0], packet[0])}")
    got = bytes((packet[1],)) if kind == CONNACK else packet[2]
    if got != codes:
        raise Failure(f"{NAMES[kind].lower()}:0x{got.hex()}")
