"""MQTT devices through a real Session and Registry, over a fake byte stream (PROTOCOL.md section 8).

The transport is driven with packets built from the standard (bench/stampede/mqtt_codec.py, the one client-side encoder)
and what it writes is parsed back; RabbitMQ is the FakeBroker of the unit tier.
"""

from __future__ import annotations

import struct
import time
from typing import Any

import gevent
import orjson
import pytest
from fakes import CONFIG, SECRET, Command, make_registry, wait_for
from gevent.queue import Queue
from prometheus_client import REGISTRY

from app import auth
from app.sessions.registry import Registry
from app.sessions.session import Session
from app.transports.mqtt import MqttConnection
from bench.stampede import mqtt_codec as client

TOKEN = auth.mint(SECRET, "lock-1")


class FakeStream:
    def __init__(self) -> None:
        self.inbox: Queue = Queue()
        self.out = b""
        self.finished = self.closed = False

    def recv(self) -> bytes | None:
        return self.inbox.get()

    def send(self, data: bytes) -> None:
        self.out += data

    def finish(self) -> None:
        self.finished = True
        self.inbox.put(None)

    def close(self) -> None:
        self.closed = True

    def packets(self) -> list[tuple[int, bytes]]:
        """(packet type, body) of everything written so far."""
        return [(first >> 4, body) for first, body in self.headed_packets()]

    def headed_packets(self) -> list[tuple[int, bytes]]:
        """(first byte: type and flags, body) of everything written so far."""
        found, data = [], self.out
        while data:
            first, length, shift, pos = data[0], 0, 0, 1
            while True:
                byte = data[pos]
                length |= (byte & 0x7F) << shift
                shift, pos = shift + 7, pos + 1
                if not byte & 0x80:
                    break
            found.append((first, data[pos:pos + length]))
            data = data[pos + length:]
        return found

    def kinds(self) -> list[int]:
        return [kind for kind, _ in self.packets()]


CONNACK, PUBLISH, PUBACK, SUBACK, UNSUBACK, PINGRESP = 2, 3, 4, 9, 11, 13


@pytest.fixture
def registry() -> Registry:
    return make_registry()


def open_session(registry: Registry, connect: bytes) -> tuple[FakeStream, Session, gevent.Greenlet]:
    stream = FakeStream()
    conn = MqttConnection(stream, "127.0.0.1:9", max_frame_bytes=65536, max_keepalive=1200)
    session = Session(conn, registry, registry.broker)
    runner = gevent.spawn(session.run)
    stream.inbox.put(connect)
    wait_for(lambda: CONNACK in stream.kinds() or stream.closed)
    return stream, session, runner


def connack_code(stream: FakeStream) -> int:
    return next(body[1] for kind, body in stream.packets() if kind == CONNACK)


def test_connect_is_a_hello_and_keep_alive_the_idle_allowance(registry: Registry) -> None:
    stream, session, _ = open_session(registry, client.connect("lock-1", TOKEN, keep_alive=20, username="any"))
    assert connack_code(stream) == 0 and stream.packets()[0][1] == b"\x00\x00"  # session present 0
    assert session.idle_limit == 30.0 and "lock-1" in registry.sessions


@pytest.mark.parametrize(("packet", "code"), [
    (client.connect("lock-1", "0" * 64), 0x05),
    (client.connect("lock-1", None), 0x05),
    (client.connect("", TOKEN), 0x02),
    (client.connect("lock.1", TOKEN), 0x02),
    (client.connect("lock-1", TOKEN, level=3), 0x01),
    (client.connect("lock-1", TOKEN, level=6), 0x01),
    # MQTT 5 (PROTOCOL.md section 9) says why in its own codes: test_mqtt5_transport.py has the rest.
    (client.connect("lock-1", "0" * 64, level=5), 0x86),
    (client.connect("lock-1", TOKEN, level=5, will=("status/lost", b"x")), 0x87),
    (client.connect("lock-1", TOKEN, will=("status/lost", b"x")), 0x05),
])
def test_refused_connects_get_their_connack_code_and_close(registry: Registry, packet: bytes, code: int) -> None:
    stream, _, runner = open_session(registry, packet)
    runner.join(1)
    assert connack_code(stream) == code and stream.closed and registry.sessions == {}


def test_overloaded_is_connack_3() -> None:
    registry = make_registry(CONFIG.__class__(**{**CONFIG.__dict__, "max_connections": 0}))
    stream, _, _ = open_session(registry, client.connect("lock-1", TOKEN))
    assert connack_code(stream) == 0x03


def test_first_packet_not_connect_closes_without_connack(registry: Registry) -> None:
    stream, _, runner = open_session(registry, client.PINGREQ)
    runner.join(1)
    assert stream.closed and CONNACK not in stream.kinds()


def test_qos1_event_is_pubacked_only_after_the_confirm(registry: Registry) -> None:
    stream, _, _ = open_session(registry, client.connect("lock-1", TOKEN))
    stream.inbox.put(client.publish("events/door.opened", b'{"by":"app"}', qos=1, packet_id=7))
    wait_for(lambda: registry.broker.events)
    name, _event_id, done = registry.broker.events[0]
    assert name == "door.opened" and PUBACK not in stream.kinds()
    done(None)
    assert stream.packets()[-1] == (PUBACK, struct.pack("!H", 7))


def test_qos1_event_that_cannot_be_stored_closes_without_puback(registry: Registry) -> None:
    stream, _, runner = open_session(registry, client.connect("lock-1", TOKEN))
    stream.inbox.put(client.publish("events/door.opened", b"on", qos=1, packet_id=8))
    wait_for(lambda: registry.broker.events)
    registry.broker.events[0][2]("unroutable")
    runner.join(1)
    assert stream.closed and PUBACK not in stream.kinds()


def test_payloads_become_data(registry: Registry) -> None:
    stream, _, _ = open_session(registry, client.connect("lock-1", TOKEN))
    published: list[Any] = []
    registry.broker.publish_event = lambda device, session, name, event_id, data, done, *_: published.append(data)
    for payload in (b'{"t":23.5}', b"23.5 C", b""):
        stream.inbox.put(client.publish("events/temp", payload))
    wait_for(lambda: len(published) == 3)
    assert published == [{"t": 23.5}, "23.5 C", None]


@pytest.mark.parametrize("packet", [
    client.publish("events/x", b"\xff\xfe"),  # not UTF-8
    client.publish("events/x", b"1", qos=2),
    client.publish("events/x", b"1", retain=True),
    client.publish("lights/on", b"1"),
    client.publish("replies/c-1", b"not an object"),
    client.connect("lock-1", TOKEN),  # a second CONNECT
    b"\x20\x02\x00\x00",  # CONNACK: a packet a client may not send
])
def test_what_a_device_may_not_send_closes_its_connection(registry: Registry, packet: bytes) -> None:
    stream, _, runner = open_session(registry, client.connect("lock-1", TOKEN))
    stream.inbox.put(packet)
    runner.join(1)
    assert runner.dead and stream.closed and registry.sessions == {}


def test_commands_wait_for_a_subscription_then_flow_at_the_granted_qos(registry: Registry) -> None:
    stream, _, _ = open_session(registry, client.connect("lock-1", TOKEN))
    registry.deliver(Command("lock-1", "c-1", data={"for": 5}))
    assert PUBLISH not in stream.kinds()  # held: nobody subscribed yet
    stream.inbox.put(client.subscribe(3, ("commands/#", 1), ("other/#", 0), ("commands/+", 2)))
    wait_for(lambda: PUBLISH in stream.kinds())
    suback = next(body for kind, body in stream.packets() if kind == SUBACK)
    assert suback == struct.pack("!H", 3) + bytes([1, 0x80, 1])
    first, body = next((first, b) for first, b in stream.headed_packets() if first >> 4 == PUBLISH)
    assert (first >> 1) & 3 == 1  # at the QoS granted: 1
    topic_length = struct.unpack("!H", body[:2])[0]
    assert body[2:2 + topic_length] == b"commands/unlock"
    assert orjson.loads(body[2 + topic_length + 2:]) == {"id": "c-1", "data": {"for": 5}}
    stream.inbox.put(client.publish("replies/c-1", b'{"ok":true,"data":{"done":1}}', qos=1, packet_id=9))
    wait_for(lambda: registry.broker.replies)
    assert registry.broker.replies == [("c-1", True, {"done": 1}, None)]
    assert stream.packets()[-1] == (PUBACK, struct.pack("!H", 9))


def test_commands_held_past_their_deadline_are_not_written(registry: Registry) -> None:
    stream, session, _ = open_session(registry, client.connect("lock-1", TOKEN))
    before = REGISTRY.get_sample_value("warren_commands_total", {"outcome": "expired"}) or 0.0
    registry.deliver(Command("lock-1", "c-2", deadline=time.monotonic() + 0.05))
    gevent.sleep(0.1)  # its deadline passes while it is held
    stream.inbox.put(client.subscribe(1, ("commands/#", 0)))
    wait_for(lambda: SUBACK in stream.kinds())
    stream.inbox.put(client.PINGREQ)  # once answered, the SUBSCRIBE before it was handled whole
    wait_for(lambda: PINGRESP in stream.kinds())
    assert PUBLISH not in stream.kinds() and session.pending == {}
    assert REGISTRY.get_sample_value("warren_commands_total", {"outcome": "expired"}) == before + 1


def test_command_names_that_cannot_be_topics_are_bad_command(registry: Registry) -> None:
    open_session(registry, client.connect("lock-1", TOKEN))
    registry.deliver(Command("lock-1", "c-3", name="a/b"))
    assert registry.broker.replies == [("c-3", False, None, "bad_command")]


def test_unknown_reply_is_counted_and_the_connection_stays(registry: Registry) -> None:
    stream, _, runner = open_session(registry, client.connect("lock-1", TOKEN))
    before = unknown_commands()
    stream.inbox.put(client.publish("replies/nope", b'{"ok":true}'))
    stream.inbox.put(client.PINGREQ)
    wait_for(lambda: PINGRESP in stream.kinds())
    assert not runner.dead
    assert unknown_commands() == before + 1


def unknown_commands() -> float:
    return REGISTRY.get_sample_value("warren_errors_sent_total", {"code": "unknown_command"}) or 0.0


def test_will_fires_on_a_drop_but_not_after_disconnect(registry: Registry) -> None:
    for ending, wills in [(None, 1), (client.DISCONNECT, 0)]:
        stream, _, runner = open_session(registry, client.connect("lock-1", TOKEN, will=("events/lock.lost", b"gone")))
        registry.broker.events.clear()
        stream.inbox.put(ending)
        runner.join(1)
        assert [(name, stream.closed) for name, _, _ in registry.broker.events] == [("lock.lost", True)] * wills
        assert registry.broker.presence[-1] == ("lock-1", "closed", {"reason": "closed"})


def test_replaced_by_another_transport_closes_the_mqtt_connection(registry: Registry) -> None:
    stream, session, runner = open_session(registry, client.connect("lock-1", TOKEN))
    registry.broker.replace("lock-1", session.id)  # a newer session claimed the device elsewhere
    runner.join(1)
    assert stream.closed and registry.broker.presence[-1] == ("lock-1", "closed", {"reason": "replaced"})


def test_unsubscribe_holds_commands_again(registry: Registry) -> None:
    stream, _, _ = open_session(registry, client.connect("lock-1", TOKEN))
    stream.inbox.put(client.subscribe(1, ("commands/#", 0)))
    stream.inbox.put(client.unsubscribe(2, "commands/#"))
    wait_for(lambda: UNSUBACK in stream.kinds())
    registry.deliver(Command("lock-1", "c-4"))
    assert PUBLISH not in stream.kinds()
    stream.inbox.put(client.subscribe(3, ("commands/+", 0)))  # subscribed again: what was held flows
    wait_for(lambda: PUBLISH in stream.kinds())
    publishes = [first for first, _ in stream.headed_packets() if first >> 4 == PUBLISH]
    assert publishes == [PUBLISH << 4]  # once, at QoS 0 as now granted (the first subscription was QoS 0 too)
