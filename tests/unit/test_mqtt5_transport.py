"""MQTT 5 devices through a real Session and Registry, over a fake byte stream (PROTOCOL.md section 9).

As test_mqtt_transport.py (its FakeStream), with version 5 packets built here from
app.mqtt.properties' encoder and the gateway's packets read back with its decoder.
"""

from __future__ import annotations

import struct
import time
from typing import Any

import gevent
import orjson
import pytest
from fakes import CONFIG, SECRET, Command, make_registry, wait_for
from test_mqtt_transport import FakeStream

from app import auth
from app.mqtt import properties as props5
from app.mqtt.packets import Properties
from app.sessions.bans import Ban, now_ms
from app.sessions.ports import EventProperties
from app.sessions.registry import Registry
from app.sessions.session import Session
from app.transports.mqtt import MqttConnection
from bench.stampede import mqtt_codec as client

TOKEN = auth.mint(SECRET, "lock-1")
CONNACK, PUBLISH, PUBACK, SUBACK, DISCONNECT = 2, 3, 4, 9, 14
_U16 = struct.Struct("!H")


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return _U16.pack(len(raw)) + raw


def connect5(client_id: str = "lock-1", password: str | None = TOKEN, keep_alive: int = 60,
             props: Properties | None = None, will: tuple[str, bytes] | None = None,
             will_props: Properties | None = None) -> bytes:
    flags, payload = 0x02, [props5.encode(props, props5.CONNECT), s(client_id)]
    if will is not None:
        flags |= 0x04
        payload += [props5.encode(will_props, props5.WILL), s(will[0]), s(will[1])]
    if password is not None:
        flags |= 0x40
        payload.append(s(password))
    return client.packet(0x10, b"".join((s("MQTT"), bytes((5, flags)), _U16.pack(keep_alive), *payload)))


def publish5(topic: str, payload: bytes, packet_id: int | None = None, props: Properties | None = None,
             qos: int | None = None, retain: bool = False) -> bytes:
    qos = (0 if packet_id is None else 1) if qos is None else qos
    head = s(topic) + (_U16.pack(packet_id or 1) if qos else b"")
    return client.packet(0x30 | qos << 1 | retain, head + props5.encode(props, props5.PUBLISH) + payload)


def subscribe5(packet_id: int, *filters: tuple[str, int], props: Properties | None = None) -> bytes:
    body = b"".join(s(topic) + bytes((qos,)) for topic, qos in filters)
    return client.packet(0x82, _U16.pack(packet_id) + props5.encode(props, props5.SUBSCRIBE) + body)


def open5(registry: Registry, connect: bytes) -> tuple[FakeStream, Session, gevent.Greenlet]:
    stream = FakeStream()
    conn = MqttConnection(stream, "127.0.0.1:9", max_frame_bytes=65536, max_keepalive=1200)
    session = Session(conn, registry, registry.broker)
    runner = gevent.spawn(session.run)
    stream.inbox.put(connect)
    wait_for(lambda: CONNACK in stream.kinds() or stream.closed)
    return stream, session, runner


def connack(stream: FakeStream) -> tuple[int, Properties]:
    body = next(body for kind, body in stream.packets() if kind == CONNACK)
    return body[1], props5.decode(body, 2, len(body), props5.CONNACK)[0]


def last(stream: FakeStream, kind: int) -> bytes:
    return [body for found, body in stream.packets() if found == kind][-1]


def disconnect(stream: FakeStream) -> tuple[int, Properties | None]:
    body = last(stream, DISCONNECT)
    return body[0], props5.decode(body, 1, len(body), props5.DISCONNECT)[0] if len(body) > 1 else None


def published(stream: FakeStream) -> list[tuple[str, int | None, Properties, Any]]:
    """(topic, packet id, properties, payload) of every PUBLISH written."""
    found = []
    for first, body in stream.headed_packets():
        if first >> 4 != PUBLISH:
            continue
        end = 2 + _U16.unpack(body[:2])[0]
        packet_id = _U16.unpack(body[end:end + 2])[0] if first & 6 else None
        props, pos = props5.decode(body, end + 2 if packet_id else end, len(body), props5.PUBLISH)
        found.append((body[2:end].decode(), packet_id, props, orjson.loads(body[pos:])))
    return found


@pytest.fixture
def registry() -> Registry:
    return make_registry()


def test_connack_properties_say_what_the_gateway_takes(registry: Registry) -> None:
    stream, session, _ = open5(registry, connect5(keep_alive=0, props=Properties(session_expiry_interval=300)))
    code, props = connack(stream)
    assert code == 0 and stream.packets()[0][1][0] == 0  # session present 0
    assert props == Properties(session_expiry_interval=0, server_keep_alive=1200, receive_maximum=64, maximum_qos=1,
                               retain_available=0, maximum_packet_size=65536, topic_alias_maximum=16,
                               subscription_identifiers_available=0, shared_subscription_available=0)
    assert session.idle_limit == 1800.0
    assert registry.broker.presence[-1] == ("lock-1", "connected", {"transport": "mqtt", "mqtt": 5})


def test_a_keep_alive_honoured_as_asked_is_not_repeated(registry: Registry) -> None:
    stream, _, _ = open5(registry, connect5(keep_alive=20))
    assert connack(stream)[1].server_keep_alive is None and connack(stream)[1].session_expiry_interval is None


@pytest.mark.parametrize(("packet", "code"), [
    (connect5(password="0" * 64), 0x86),
    (connect5(password=None), 0x86),
    (connect5(client_id="lock.1"), 0x85),
    (connect5(will=("status/lost", b"x")), 0x87),
    (connect5(props=Properties(authentication_method="SCRAM-SHA-1")), 0x8C),
])
def test_refused_connects_say_why(registry: Registry, packet: bytes, code: int) -> None:
    stream, _, runner = open5(registry, packet)
    runner.join(1)
    assert connack(stream) == (code, Properties(reason_string="unauthorized")) and stream.closed


def test_banned_and_overloaded_refusals_carry_retry_after(registry: Registry) -> None:
    registry.broker.ban(Ban("lock-1", now_ms(), until=now_ms() + 60_000))
    stream, _, _ = open5(registry, connect5())
    code, props = connack(stream)
    assert code == 0x8A and props.reason_string == "banned" and props.user_properties[0][0] == "retry_after"
    assert 58 <= float(props.user_properties[0][1]) <= 60
    busy = make_registry(CONFIG.__class__(**{**CONFIG.__dict__, "max_connections": 0}))
    stream, _, _ = open5(busy, connect5())
    code, props = connack(stream)
    assert code == 0x89 and props.reason_string == "overloaded" and props.user_properties[0][0] == "retry_after"


def test_an_event_not_stored_gets_puback_0x83_and_the_connection_stays(registry: Registry) -> None:
    stream, _, _ = open5(registry, connect5())
    stream.inbox.put(publish5("events/door", b"1", packet_id=7))
    wait_for(lambda: registry.broker.events)
    registry.broker.events[-1][2]("unroutable")
    wait_for(lambda: PUBACK in stream.kinds())
    body = last(stream, PUBACK)
    assert body[:3] == _U16.pack(7) + b"\x83"
    assert props5.decode(body, 3, len(body), props5.PUBACK)[0] == Properties(
        reason_string="unroutable", user_properties=(("retry_after", "30"),))
    stream.inbox.put(publish5("events/door", b"2", packet_id=8))
    wait_for(lambda: len(registry.broker.events) == 2)
    registry.broker.events[-1][2](None)
    wait_for(lambda: last(stream, PUBACK) == _U16.pack(8))
    assert not stream.finished


def test_request_problem_information_0_leaves_the_explanations_out(registry: Registry) -> None:
    stream, _, _ = open5(registry, connect5(props=Properties(request_problem_information=0)))
    stream.inbox.put(publish5("events/door", b"1", packet_id=7))
    wait_for(lambda: registry.broker.events)
    registry.broker.events[-1][2]("broker_unavailable")
    wait_for(lambda: PUBACK in stream.kinds())
    assert last(stream, PUBACK) == _U16.pack(7) + b"\x83"


def test_event_properties_become_amqp_properties(registry: Registry) -> None:
    stream, _, _ = open5(registry, connect5())
    users = (("site", "a"), ("tag", "x"), ("tag", "y"), ("tag", "z"))
    stream.inbox.put(publish5("events/door", b"1", packet_id=1,
                              props=Properties(message_expiry_interval=5, user_properties=users)))
    stream.inbox.put(publish5("events/door", b"2", packet_id=2))
    wait_for(lambda: len(registry.broker.events) == 2)
    first, second = (registry.broker.event_properties[event_id] for _, event_id, _ in registry.broker.events)
    assert first == EventProperties("5000", {"site": "a", "tag": ["x", "y", "z"]}) and second is None


def test_a_json_device_cannot_set_amqp_properties() -> None:
    from fakes import FakeConn
    registry, conn = make_registry(), FakeConn()
    gevent.spawn(Session(conn, registry, registry.broker).run)
    conn.push({"type": "hello", "device": "lock-1", "token": TOKEN, "v": 1})
    conn.push({"type": "event", "id": "e-1", "name": "door", "amqp": {"expiration": "1"}})
    wait_for(lambda: registry.broker.events)
    assert registry.broker.event_properties["e-1"] is None


def test_a_command_carries_its_properties_and_waits_for_the_receive_maximum(registry: Registry) -> None:
    stream, _, _ = open5(registry, connect5(props=Properties(receive_maximum=1)))
    stream.inbox.put(subscribe5(1, ("commands/#", 1), ("other/#", 0)))
    wait_for(lambda: SUBACK in stream.kinds())
    assert last(stream, SUBACK) == _U16.pack(1) + b"\x00" + bytes((1, 0x87))
    registry.deliver(Command("lock-1", "c-1", data={"for": 5}, deadline=time.monotonic() + 9.2))
    registry.deliver(Command("lock-1", "c-2", deadline=time.monotonic() + 9.2))
    wait_for(lambda: published(stream))
    gevent.sleep(0.05)
    [(topic, packet_id, props, payload)] = published(stream)  # c-2 waits for c-1's PUBACK
    assert topic == "commands/unlock" and payload == {"id": "c-1", "data": {"for": 5}}
    assert props == Properties(response_topic="replies/c-1", correlation_data=b"c-1", message_expiry_interval=10,
                               content_type="application/json", payload_format_indicator=1)
    stream.inbox.put(client.puback(packet_id))
    wait_for(lambda: len(published(stream)) == 2)
    assert published(stream)[1][3] == {"id": "c-2", "data": None}


def test_a_command_over_the_devices_maximum_packet_size_is_too_large(registry: Registry) -> None:
    open5(registry, connect5(props=Properties(maximum_packet_size=200)))
    registry.deliver(Command("lock-1", "c-1", data="x" * 200))
    registry.deliver(Command("lock-1", "c-2", data="x"))
    assert registry.broker.replies == [("c-1", False, None, "too_large")]


@pytest.mark.parametrize(("packet", "reason", "code"), [
    (publish5("events/x", b"1", qos=2), 0x9B, "unauthorized"),
    (publish5("events/x", b"1", retain=True), 0x9A, "unauthorized"),
    (publish5("lights/on", b"1"), 0x90, "unauthorized"),
    (publish5("events/x", b"\xff", props=Properties(payload_format_indicator=1)), 0x99, "bad_frame"),
    (publish5("replies/c-1", b"not an object"), 0x99, "bad_frame"),
    (publish5("events/deep", b"[" * 201 + b"]" * 201), 0x99, "bad_frame"),  # the payload broke section 3, not the topic
    (publish5("replies/c-1", b'{"ok": true, "data": ' + b"[" * 201 + b"]" * 201 + b"}"), 0x99, "bad_frame"),
    (publish5("events/session.forged", b"1"), 0x90, "bad_frame"),  # the topic did
    (publish5("", b"1", props=Properties(topic_alias=3)), 0x82, "bad_frame"),  # an alias never set
    (publish5("events/x", b"1", props=Properties(topic_alias=17)), 0x94, "bad_frame"),
    (subscribe5(1, ("commands/#", 1), props=Properties(subscription_identifiers=(4,))), 0xA1, "bad_frame"),
    (b"\xf0\x00", 0x82, "bad_frame"),  # AUTH
    (connect5(), 0x82, "bad_frame"),  # a second CONNECT
])
def test_what_a_device_may_not_send_is_a_disconnect_saying_why(registry: Registry, packet: bytes, reason: int,
                                                                code: str) -> None:
    stream, _, runner = open5(registry, connect5())
    stream.inbox.put(packet)
    runner.join(1)
    assert disconnect(stream) == (reason, Properties(reason_string=code)) and stream.closed
    assert registry.broker.presence[-1] == ("lock-1", "closed", {"reason": code})


def test_topic_aliases_name_events(registry: Registry) -> None:
    stream, _, _ = open5(registry, connect5())
    stream.inbox.put(publish5("events/door", b"1", props=Properties(topic_alias=2)))
    stream.inbox.put(publish5("", b"2", props=Properties(topic_alias=2)))
    wait_for(lambda: len(registry.broker.events) == 2)
    assert [name for name, _, _ in registry.broker.events] == ["door", "door"]


@pytest.mark.parametrize(("end", "reason", "retry"), [
    (lambda registry, session: registry.broker.replace("lock-1", session.id), 0x8E, False),
    (lambda registry, session: registry.kick("lock-1"), 0x98, False),
    (lambda registry, session: registry.broker.ban(Ban("lock-1", now_ms(), until=now_ms() + 60_000)), 0x98, True),
    (lambda registry, session: session.expire(), 0x8D, False),
    (lambda registry, session: registry.drain(5), 0x8B, True),
])
def test_the_gateway_ends_a_session_with_its_reason(registry: Registry, end: Any, reason: int, retry: bool) -> None:
    stream, session, runner = open5(registry, connect5())
    end(registry, session)
    runner.join(1)
    code, props = disconnect(stream)
    assert code == reason and props is not None and props.reason_string == session.close_code
    assert [key for key, _ in props.user_properties] == (["retry_after"] if retry else [])


def test_disconnect_0x04_publishes_the_will_and_0x00_does_not(registry: Registry) -> None:
    for reason, wills in [(0x04, 1), (0x00, 0)]:
        stream, _, runner = open5(registry, connect5(will=("events/lock.lost", b"gone")))
        registry.broker.events.clear()
        stream.inbox.put(bytes((0xE0, 1, reason)))
        runner.join(1)
        assert [name for name, _, _ in registry.broker.events] == ["lock.lost"] * wills
        assert registry.broker.presence[-1] == ("lock-1", "closed", {"reason": "closed"})


def test_a_delayed_will_comes_after_session_closed(registry: Registry) -> None:
    will_props = Properties(will_delay_interval=1)
    stream, _, runner = open5(registry, connect5(will=("events/lock.lost", b"gone"), will_props=will_props))
    registry.broker.events.clear()
    stream.inbox.put(None)  # the network cut it
    runner.join(1)
    assert registry.broker.presence[-1] == ("lock-1", "closed", {"reason": "closed"})
    assert registry.broker.events == [] and 0.5 < registry.broker.wills_until["lock-1"] - time.time() <= 1
    wait_for(lambda: registry.broker.events, timeout=3)
    assert [name for name, _, _ in registry.broker.events] == ["lock.lost"]


@pytest.mark.parametrize("where", ["here", "elsewhere"])
def test_a_new_session_within_the_delay_drops_the_will(registry: Registry, where: str) -> None:
    will_props = Properties(will_delay_interval=1)
    stream, session, runner = open5(registry, connect5(will=("events/lock.lost", b"gone"), will_props=will_props))
    registry.broker.events.clear()
    stream.inbox.put(None)
    runner.join(1)
    if where == "here":
        open5(registry, connect5())
    else:  # the partition owner saw the device's claim from another worker: `replaced` for the ended session
        registry.broker.replace("lock-1", session.id)
    gevent.sleep(1.3)
    assert registry.broker.events == [] and len(registry.wills) == 0


def test_a_will_delay_is_at_most_two_heartbeats() -> None:
    registry = make_registry(CONFIG.__class__(**{**CONFIG.__dict__, "heartbeat": 0.2}))
    will_props = Properties(will_delay_interval=3600)
    stream, _, runner = open5(registry, connect5(will=("events/lock.lost", b"gone"), will_props=will_props))
    registry.broker.events.clear()
    stream.inbox.put(None)
    runner.join(1)
    wait_for(lambda: registry.broker.events, timeout=1)


def test_receive_maximum_exceeded_is_0x93(registry: Registry) -> None:
    stream, _, runner = open5(registry, connect5())
    for packet_id in range(1, 66):  # none is confirmed: the 65th is one past the Receive Maximum of 64
        stream.inbox.put(publish5("events/door", b"1", packet_id=packet_id))
    runner.join(2)
    assert disconnect(stream) == (0x93, Properties(reason_string="bad_frame"))


def test_mqtt_3_sessions_say_mqtt_4_in_presence(registry: Registry) -> None:
    stream = FakeStream()
    conn = MqttConnection(stream, "127.0.0.1:9", max_frame_bytes=65536, max_keepalive=1200)
    gevent.spawn(Session(conn, registry, registry.broker).run)
    stream.inbox.put(client.connect("lock-1", TOKEN))
    wait_for(lambda: registry.broker.presence)
    assert registry.broker.presence[-1] == ("lock-1", "connected", {"transport": "mqtt", "mqtt": 4})


@pytest.mark.parametrize("delay", [None, 1])
def test_a_wills_expiry_and_user_properties_ride_on_its_event_as_an_events_do(registry: Registry,
                                                                              delay: int | None) -> None:
    users = (("site", "a"), ("tag", "x"), ("tag", "y"))
    will_props = Properties(message_expiry_interval=30, user_properties=users, will_delay_interval=delay)
    stream, session, runner = open5(registry, connect5(will=("events/lock.lost", b"gone"), will_props=will_props))
    stream.inbox.put(None)  # the network cut it
    runner.join(1)
    wait_for(lambda: [name for name, _, _ in registry.broker.events] == ["lock.lost"], timeout=3)
    assert registry.broker.event_properties[f"will-{session.id}"] == EventProperties(
        "30000", {"site": "a", "tag": ["x", "y"]})


def test_a_will_without_those_properties_has_none(registry: Registry) -> None:
    will_props = Properties(content_type="text/plain")
    stream, session, runner = open5(registry, connect5(will=("events/lock.lost", b"gone"), will_props=will_props))
    stream.inbox.put(None)
    runner.join(1)
    assert [name for name, _, _ in registry.broker.events] == ["lock.lost"]
    assert registry.broker.event_properties[f"will-{session.id}"] is None


def test_a_will_marked_utf8_that_is_not_gets_connack_0x99(registry: Registry) -> None:
    will_props = Properties(payload_format_indicator=1)
    stream, _, runner = open5(registry, connect5(will=("events/lock.lost", b"\xff"), will_props=will_props))
    runner.join(1)
    assert connack(stream) == (0x99, Properties(reason_string="bad_frame")) and stream.closed
    assert registry.broker.presence == []
    stream, _, _ = open5(make_registry(), connect5(will=("events/lock.lost", b"\xc3\xa9"), will_props=will_props))
    assert connack(stream)[0] == 0x00  # well-formed UTF-8 is what the mark promises


def test_a_json_devices_will_cannot_set_amqp_properties() -> None:
    from fakes import FakeConn
    registry, conn = make_registry(), FakeConn()
    session = Session(conn, registry, registry.broker)
    runner = gevent.spawn(session.run)
    conn.push({"type": "hello", "device": "lock-1", "token": TOKEN, "v": 1,
               "will": {"name": "lost", "data": 1, "amqp": {"expiration": "1"}}})
    wait_for(lambda: registry.broker.presence)
    conn.push(None)
    runner.join(1)
    assert [name for name, _, _ in registry.broker.events] == ["lost"]
    assert registry.broker.event_properties[f"will-{session.id}"] is None
