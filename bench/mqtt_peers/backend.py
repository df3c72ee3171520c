"""The backend side of each server: commands to devices, stamped with their send time, and every event.

On Warren it is bench.stampede's: commands to `devices.commands` over AMQP (their replies come back
to our own queue: the round trip), events consumed from `devices.events` (acked but never consumed
is counted). On a general MQTT broker it is one MQTT client doing the same with topics: it publishes
each command at QoS 1 on `devices/<id>/commands/unlock` and subscribes at QoS 1 to every device's
events (`devices/+/events/#`) and replies (`devices/+/replies/+`), so that each server carries
the same traffic: every event is delivered to one consumer, every reply to its command's sender.
Either way the command's data holds `sent` (time.time() at publishing), from which the device
times the command's arrival (bench/stampede/mqtt_device.py).
"""

from __future__ import annotations

import itertools
import socket
import time
import uuid
from collections import Counter

import gevent
import orjson
from gevent.lock import Semaphore

from bench.stampede import mqtt_codec
from bench.stampede.backend import AmqpCommands, CommandLog, unseen
from bench.stampede.links import LinkClosed, MqttLink

COMMAND_NAME = "unlock"
SUBSCRIPTIONS = (("devices/+/events/#", 1), ("devices/+/replies/+", 1))
KEEP_ALIVE = 60
CONNECT_TIMEOUT = 10.0


def stamped_command(command_id: str | None = None) -> bytes:
    """A command's data, stamped: `{"sent": time.time()}` (with the command id, for an MQTT payload)."""
    body = {"id": command_id} if command_id is not None else {"name": COMMAND_NAME}
    return orjson.dumps({**body, "data": {"sent": time.time()}})


class StampedAmqpCommands(AmqpCommands):
    """bench.stampede's AMQP commands, each stamped with the moment it is published."""

    def body(self) -> bytes:
        return stamped_command()


class MqttBackend:
    """A backend service on an MQTT broker, over one connection: commands out, replies and events in.

    It offers what bench.stampede's scenarios read of its AMQP backend (`log`, `send`, `missing`,
    `presence`, `reconnects`, `close`). The connection is not reopened: a broker that drops its
    backend mid-run has failed the run, and every command still waiting is counted as `backend_lost`.
    """

    def __init__(self, host: str, port: int, client_id: str, timeout: float) -> None:
        self.timeout = timeout
        self.log = CommandLog()
        self.seen: set[str] = set()
        self.presence: Counter = Counter()  # the brokers publish no presence events
        self.reconnects = 0
        self.pending: dict[str, tuple[float, str]] = {}  # command id -> (monotonic send time, device)
        self.packet_ids = itertools.cycle(range(1, 65536))
        self.lock = Semaphore()
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        # As py-amqp does for Warren's backend: our small writes (commands, PUBACKs) must not wait on Nagle
        # for the broker's delayed ACKs, or the backend's own waits would count as the servers' latency.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.link = MqttLink(sock)
        try:
            self.open(client_id)
        except BaseException:
            self.link.sock.close()
            raise
        self.link.sock.settimeout(None)
        self.greenlets = [gevent.spawn(self.read_forever), gevent.spawn(self.tick_forever)]

    def open(self, client_id: str) -> None:
        """CONNECT as the broker's default user, then SUBSCRIBE to every event and reply."""
        self.link.send(mqtt_codec.connect(client_id, "guest", KEEP_ALIVE, username="guest"))
        connack = self.next_packet()
        if connack[:2] != (mqtt_codec.CONNACK, 0):
            raise ConnectionError(f"the broker refused the backend's CONNECT: {connack}")
        self.link.send(mqtt_codec.subscribe(next(self.packet_ids), *SUBSCRIPTIONS))
        suback = self.next_packet()
        if suback[0] != mqtt_codec.SUBACK or suback[2] != b"\x01" * len(SUBSCRIPTIONS):
            raise ConnectionError(f"the broker did not grant the backend's subscriptions at QoS 1: {suback}")

    def next_packet(self) -> mqtt_codec.Packet:
        """The next packet while the connection opens (nothing else is in flight then)."""
        while True:
            packets = self.link.receive()
            if packets:
                return packets[0]

    def write(self, data: bytes) -> None:
        """One packet, from any greenlet: the reader's PUBACKs and the pacer's commands share the socket."""
        with self.lock:
            self.link.send(data)

    def send(self, device: str) -> None:
        """Publish one command to `device` at QoS 1; its reply closes the round trip."""
        command_id = uuid.uuid4().hex
        self.pending[command_id] = (time.monotonic(), device)
        self.log.sent += 1
        topic = f"devices/{device}/commands/{COMMAND_NAME}"
        try:
            self.write(mqtt_codec.publish(topic, stamped_command(command_id), next(self.packet_ids)))
        except OSError:
            self.log.failed(*self.pending.pop(command_id), "not_sent_backend_lost")

    def read_forever(self) -> None:
        try:
            while True:
                for packet in self.link.receive():
                    if packet[0] == mqtt_codec.PUBLISH:
                        self.on_publish(packet)
        except (LinkClosed, OSError, ValueError):
            self.lost()

    def on_publish(self, packet: mqtt_codec.Packet) -> None:
        """An event (remember its device-given id) or a reply (settle its command); PUBACK it either way."""
        _, topic, payload, packet_id = packet
        if packet_id is not None:
            self.write(mqtt_codec.puback(packet_id))
        levels = topic.split("/")
        if len(levels) < 4:
            return
        if levels[2] == "events":
            self.seen.add(orjson.loads(payload).get("ref"))
        elif levels[2] == "replies":
            sent = self.pending.pop(levels[3], None)
            if sent is None:
                self.log.outcomes["late_reply"] += 1
            elif orjson.loads(payload).get("ok"):
                self.log.answered(*sent)
            else:
                self.log.failed(*sent, "failed")

    def tick_forever(self) -> None:
        """Once a second: expire commands never answered, and keep the connection alive."""
        pinged = time.monotonic()
        while True:
            gevent.sleep(1.0)
            deadline = time.monotonic() - self.timeout - 2
            for command_id, sent in list(self.pending.items()):
                if sent[0] < deadline:
                    del self.pending[command_id]
                    self.log.failed(*sent, "timeout")
            if time.monotonic() - pinged > KEEP_ALIVE / 2:
                pinged = time.monotonic()
                try:
                    self.write(mqtt_codec.PINGREQ)
                except OSError:
                    return  # the reader sees the connection's end and counts it

    def lost(self) -> None:
        """The broker closed the backend's connection: every command still waiting has failed."""
        self.reconnects += 1  # never reopened: in the figures, a count of connections lost
        for command_id in list(self.pending):
            self.log.failed(*self.pending.pop(command_id), "backend_lost")

    def missing(self, acked_ids: list[str], wait: float = 10.0) -> list[str]:
        """Acked event ids not (yet) consumed, after waiting up to `wait` seconds for stragglers."""
        return unseen(self.seen, acked_ids, wait)

    def close(self) -> None:
        """Say goodbye (DISCONNECT) and close; harmless when called again."""
        gevent.killall(self.greenlets)
        try:
            self.write(mqtt_codec.DISCONNECT)
        except OSError:
            pass
        self.link.sock.close()
