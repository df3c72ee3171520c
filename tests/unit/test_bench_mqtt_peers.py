"""bench.mqtt_peers' pure parts: costs per unit of work from made-up marks, Warren against RabbitMQ figure by
figure, and the load tool's `broker` device dialect (topics under devices/<id>/, stamped commands timed)."""

from __future__ import annotations

import argparse
import time

import orjson
import pytest

from app.mqtt import MqttDecoder, Publish, Subscribe
from bench.mqtt_peers.figures import HIGHER, LOWER, ROWS, Row, at, ratio, standing, unit_costs, verdict, with_broker
from bench.mqtt_peers.servers import known_servers
from bench.stampede import mqtt_codec
from bench.stampede.device import Stats
from bench.stampede.links import Target
from bench.stampede.mqtt_device import BrokerMqttDevice, MqttDevice


def mark(t: float, cpu: float, **counters: float) -> dict:
    return {"t": t, "cpu_s": cpu, "established": 0, "pongs": 0, "acked": 0, "commands": 0, "up": 0, **counters}


MARKS = {
    "before_connect": mark(0.0, 1.0, rss_mb=100.0, pss_mb=90.0),
    "connected": mark(2.0, 3.0, established=1000, up=1000),
    "held": mark(5.0, 3.5, established=1000, up=1000, rss_mb=110.0, pss_mb=95.0),
    "idle_start": mark(5.0, 3.5, established=1000, up=1000),
    "idle_end": mark(15.0, 4.5, established=1000, up=1000, pongs=500),  # 0.1 core idle
    "events_start": mark(15.0, 4.5, up=1000),
    "events_end": mark(25.0, 6.5, up=1000, acked=500),  # 2 s busy, 1 of them above idle
    "commands_start": mark(25.0, 6.5, up=1000, commands=0),
    "commands_end": mark(35.0, 7.5, up=1000, commands=0),  # none answered
    "reconnect_0_start": mark(40.0, 8.0, established=1000),
    "reconnect_0_done": mark(42.0, 9.0, established=2000),
}


def test_unit_costs_come_from_the_marks() -> None:
    assert unit_costs(MARKS, devices=1000) == {
        "setup_cpu_ms": 2.0,  # 2 CPU s / 1,000 sessions
        "rss_kib_per_session": 10.24, "pss_kib_per_session": 5.12,  # 10 MiB, 5 MiB over 1,000
        "heartbeat_cpu_ms": 2.0,  # 1 CPU s / 500 PINGREQs answered
        "keepalive_round_ms": 2000.0,  # the same for all 1,000 held devices
        "idle_cores": 0.1,
        "event_cpu_ms": 2.0,  # (2 - 0.1 x 10) CPU s / 500 events
        "command_cpu_ms": None,  # nothing answered: no cost per command
        "reconnect_cpu_ms": 1.0,
    }


def test_unit_costs_of_another_gauge_and_of_missing_marks() -> None:
    marks = {name: {**values, "broker_cpu_s": values["cpu_s"] * 2} for name, values in MARKS.items()}
    broker = unit_costs(marks, devices=1000, prefix="broker_")
    assert (broker["setup_cpu_ms"], broker["event_cpu_ms"], broker["rss_kib_per_session"]) == (4.0, 4.0, None)
    assert set(unit_costs({}, devices=10).values()) == {None}


def test_verdict_follows_the_better_direction() -> None:
    assert verdict(LOWER, 1.0, 2.0) == "ahead"
    assert verdict(LOWER, 3.0, 2.0) == "behind"
    assert verdict(HIGHER, 3.0, 2.0) == "ahead"
    assert verdict(HIGHER, 1.0, 2.0) == "behind"
    assert verdict(LOWER, 0, 0) == "even"
    assert verdict(None, 1.0, 2.0) == ""
    assert verdict(LOWER, None, 2.0) == ""
    assert ratio(1.0, 4.0) == 0.25
    assert ratio(1.0, 0) is None
    assert ratio(None, 1.0) is None


def test_standing_counts_each_view_apart() -> None:
    rows = (Row("rate", at("rate"), HIGHER), Row("own cpu", at("units", "server", "cpu"), view="alone"),
            Row("cpu with broker", with_broker("cpu"), view="with_broker"), Row("count", at("count"), None),
            Row("latency", at("latency")))
    warren = {"rate": 10, "count": 5, "units": {"server": {"cpu": 1.0}, "broker": {"cpu": 3.0}}}
    rabbit = {"rate": 5, "count": 1, "latency": 2.0, "units": {"server": {"cpu": 2.0}}}
    assert standing(rows, warren, rabbit, "alone") == {
        "ahead": ["rate", "own cpu"], "even": [], "behind": [], "not compared": ["latency"]}
    assert standing(rows, warren, rabbit, "with_broker") == {
        "ahead": ["rate"], "even": [], "behind": ["cpu with broker"], "not compared": ["latency"]}


def test_every_row_reads_a_results_dict_without_failing() -> None:
    labels = [row.label for row in ROWS]
    assert len(labels) == len(set(labels))
    assert [row.read({}) for row in ROWS] == [None] * len(ROWS)


def test_known_servers() -> None:
    assert known_servers("mosquitto,warren") == ["mosquitto", "warren"]
    for bad in ("warren,warren", "emqx", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            known_servers(bad)


class _World:
    def __init__(self) -> None:
        self.stats = Stats()
        self.ids = iter(range(100, 200))
        self.heartbeat = 30.0

    def packet_id(self) -> int:
        return next(self.ids)


class _Inbox:
    """What a device writes while it opens a session, and the server's answers, in order."""

    def __init__(self, *answers: bytes) -> None:
        self.sent: list[bytes] = []
        self.answers = [packet for raw in answers for packet in mqtt_codec.parse(raw)[0]]

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def next(self) -> mqtt_codec.Packet:
        return self.answers.pop(0)


def recorded(base: type[MqttDevice], name: str = "dev-1") -> MqttDevice:
    """A device of class `base` whose writes are kept (in `sent`) instead of sent."""

    class Recorded(base):  # type: ignore[valid-type, misc]
        __slots__ = ("sent",)

        def send(self, data: bytes) -> bool:
            self.sent.append(data)
            return True

    device = Recorded(name, b"secret", Target("mqtt://127.0.0.1:1883"))
    device.sent = []
    return device


def test_a_broker_device_connects_as_guest_and_subscribes_under_its_own_topics() -> None:
    device = BrokerMqttDevice("dev-1", b"secret", Target("mqtt://127.0.0.1:1883"))
    inbox = _Inbox(b"\x20\x02\x00\x00", b"\x90\x03\x00\x64\x01")
    assert device.greet(inbox, _World()) == 30.0  # type: ignore[arg-type]
    connect, subscribe = MqttDecoder(65536).feed(b"".join(inbox.sent))
    assert (connect.client_id, connect.username, connect.password, connect.keep_alive) == ("dev-1", "guest",
                                                                                            b"guest", 30)
    assert isinstance(subscribe, Subscribe)
    assert subscribe.filters == [("devices/dev-1/commands/#", 1)]


def test_a_broker_device_acks_replies_and_times_a_stamped_command() -> None:
    device = recorded(BrokerMqttDevice)
    world = _World()
    payload = orjson.dumps({"id": "c-9", "data": {"sent": time.time() - 2.0}})
    (command,), _ = mqtt_codec.parse(mqtt_codec.publish("devices/dev-1/commands/unlock", payload, 7))
    assert device.handle(command, world) is None  # type: ignore[arg-type]
    decoder = MqttDecoder(65536)
    decoder.feed(mqtt_codec.connect("dev-1", "guest", 30))
    ack, reply = decoder.feed(b"".join(device.sent))
    assert ack.packet_id == 7
    assert isinstance(reply, Publish)
    assert (reply.topic, orjson.loads(reply.payload), reply.qos) == ("devices/dev-1/replies/c-9", {"ok": True,
                                                                                                    "data": {}}, 1)
    assert world.stats.commands == 1
    (delivery_ms,) = world.stats.command_ms
    assert delivery_ms >= 2000.0  # stamped two seconds before it was handled


def test_a_broker_device_ignores_warrens_command_topic() -> None:
    device = recorded(BrokerMqttDevice)
    world = _World()
    (command,), _ = mqtt_codec.parse(mqtt_codec.publish("commands/unlock", b'{"id": "c-1", "data": {}}', 8))
    assert device.handle(command, world) is None  # type: ignore[arg-type]
    assert (device.sent, world.stats.commands) == ([], 0)



def test_warrens_device_keeps_its_topics_and_times_only_stamped_commands() -> None:
    device = recorded(MqttDevice)
    world = _World()
    assert device.credentials() == ("dev-1", device.token)
    for data in ({}, {"sent": time.time() - 1.0}):
        payload = orjson.dumps({"id": "c-1", "data": data})
        (command,), _ = mqtt_codec.parse(mqtt_codec.publish("commands/unlock", payload, 8))
        device.handle(command, world)  # type: ignore[arg-type]
    assert world.stats.commands == 2
    assert len(world.stats.command_ms) == 1
    assert world.stats.command_ms[0] >= 1000.0
    (_, reply), _ = mqtt_codec.parse(device.sent[0])
    assert reply[1] == "replies/c-1"
