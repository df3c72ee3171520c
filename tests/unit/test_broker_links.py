"""app/broker/'s links in-process: the publisher's confirms and the consumer's bindings, notices and
pacing against a recording wire, and the link's reconnect on kombu's `memory://` transport."""

from __future__ import annotations

import itertools
import logging
import struct
import time
import types
import uuid
from typing import Any

import gevent
import pytest
from amqp import spec
from amqp.serialization import dumps
from gevent.event import Event
from kombu import Connection, Exchange, Queue

from app.broker import frames, link
from app.broker import publisher as publisher_module
from app.broker.consumer import MAX_WINDOW, START_WINDOW, CommandConsumer, Window
from app.broker.link import WRITE_BATCH
from app.broker.messages import EVENT, PRESENCE, decode_takeover, encode_takeover
from app.broker.publisher import NACK_STREAK, Publisher
from app.broker.wires import MemoryWire


def wait_for(predicate: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        gevent.sleep(0.005)


def method(sig: tuple[int, int], argsig: str = "", args: tuple = ()) -> bytes:
    return struct.pack(">HH", *sig) + (dumps(argsig, args) if argsig else b"")


class RecordingWire:
    """What a link writes, as calls; answers binds like RabbitMQ (acknowledges_binds)."""

    acknowledges_binds = True
    collecting = False

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.channels: list[int] = []  # the channel of each call (0: the link's own)

    def publish(self, kind: Any, routing_key: str, body: bytes, values: tuple, channel: int = 0) -> None:
        self.calls.append(("publish", kind, routing_key, body, values))
        self.channels.append(channel)

    def bind(self, queue: str, exchange: str, routing_key: str, channel: int = 0) -> None:
        self.calls.append(("bind", routing_key))
        self.channels.append(channel)

    def unbind(self, queue: str, exchange: str, routing_key: str, channel: int = 0) -> None:
        self.calls.append(("unbind", routing_key))
        self.channels.append(channel)

    def ops(self) -> list[tuple[str, str]]:
        return [(c[0], c[2]) if c[0] == "publish" else c for c in self.calls]


# -- the publisher's confirms -------------------------------------------------------------------------
def ack(tag: int, multiple: bool = False, sig: tuple[int, int] = spec.Basic.Ack) -> bytes:
    return method(sig, "Lb", (tag, multiple))


@pytest.fixture
def publisher() -> Publisher:
    publisher = Publisher("amqp://nowhere", confirm_timeout=10.0)
    publisher.connected = True
    return publisher


def publish_events(publisher: Publisher, count: int) -> dict[int, str | None]:
    outcomes: dict[int, str | None] = {}
    for n in range(count):
        publisher.publish(EVENT, "lock-1.door", b"{}", (f"m{n}",), lambda o, n=n: outcomes.__setitem__(n, o))
    assert publisher.write(RecordingWire()) is False
    return outcomes


def test_confirms_settle_single_multiple_and_nack(publisher: Publisher) -> None:
    outcomes = publish_events(publisher, 5)
    assert outcomes == {} and publisher.backlog == 5
    publisher.methods[frames.BASIC_ACK](ack(2))
    assert outcomes == {1: None}
    publisher.methods[frames.BASIC_ACK](ack(4, multiple=True))
    assert outcomes == {0: None, 1: None, 2: None, 3: None}
    publisher.methods[frames.BASIC_NACK](ack(5, sig=spec.Basic.Nack))
    assert outcomes[4] == "broker_unavailable" and publisher.backlog == 0


def test_a_return_before_the_ack_is_unroutable(publisher: Publisher) -> None:
    outcomes = publish_events(publisher, 2)
    returned = method(spec.Basic.Return, "Bsss", (312, "NO_ROUTE", "devices.events", "lock-1.door"))
    publisher.contents[frames.BASIC_RETURN](returned, {"message_id": "m1"}, b"{}")
    publisher.methods[frames.BASIC_ACK](ack(2, multiple=True))
    assert outcomes == {0: None, 1: "unroutable"}


def test_acks_for_unknown_tags_change_nothing(publisher: Publisher) -> None:
    outcomes = publish_events(publisher, 2)
    publisher.methods[frames.BASIC_ACK](ack(1))
    publisher.methods[frames.BASIC_ACK](ack(1))  # again
    publisher.methods[frames.BASIC_ACK](ack(99))  # never published
    assert outcomes == {0: None} and publisher.backlog == 1
    publisher.methods[frames.BASIC_ACK](ack(99, multiple=True))  # covers what exists, no more
    assert outcomes == {0: None, 1: None}
    later = publish_events(publisher, 1)
    assert later == {} and publisher.backlog == 1


def test_an_overdue_confirm_fails_and_drops_an_unblocked_connection(publisher: Publisher) -> None:
    outcomes = publish_events(publisher, 2)
    publisher.tick(time.monotonic() + 5)
    assert outcomes == {}
    with pytest.raises(ConnectionError):
        publisher.tick(time.monotonic() + 11)
    assert outcomes == {0: "broker_unavailable", 1: "broker_unavailable"}
    publisher.blocked = True  # RabbitMQ withholds confirms on purpose: not a dead connection
    outcomes = publish_events(publisher, 0) or {}
    publisher.blocked = False
    blocked_outcomes = publish_events(publisher, 1)
    publisher.blocked = True
    publisher.tick(time.monotonic() + 11)
    assert blocked_outcomes == {0: "broker_unavailable"}


def test_give_up_answers_every_pending_publish_once(publisher: Publisher) -> None:
    outcomes = publish_events(publisher, 3)
    assert publisher.give_up("shutting_down") == 3
    publisher.methods[frames.BASIC_ACK](ack(3, multiple=True))
    assert outcomes == {0: "shutting_down", 1: "shutting_down", 2: "shutting_down"}


def test_blocked_refuses_at_once_and_fails_what_was_queued(publisher: Publisher) -> None:
    queued: list[str | None] = []
    publisher.publish(EVENT, "lock-1.door", b"{}", ("m0",), queued.append)
    publisher.on_blocked("low on memory")
    now: list[str | None] = []
    publisher.publish(EVENT, "lock-1.door", b"{}", ("m1",), now.append)
    assert now == ["broker_unavailable"] and queued == []
    wire = RecordingWire()
    publisher.write(wire)
    assert queued == ["broker_unavailable"] and wire.calls == []
    publisher.on_unblocked()
    assert publisher.accepting


def test_a_lost_connection_fails_pending_and_queued(publisher: Publisher) -> None:
    pending = publish_events(publisher, 1)
    queued: list[str | None] = []
    publisher.publish(EVENT, "lock-1.door", b"{}", ("q",), queued.append)
    publisher.connected = False
    publisher.on_lost()
    assert pending == {0: "broker_unavailable"} and queued == ["broker_unavailable"]


def nack(tag: int, multiple: bool = False) -> bytes:
    return ack(tag, multiple, sig=spec.Basic.Nack)


def test_a_streak_of_nacks_with_no_ack_drops_the_connection(publisher: Publisher,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """RabbitMQ 3.10 keeps nacking a channel that first published to a leaderless quorum queue."""
    clock = [100.0]
    monkeypatch.setattr(publisher_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    publish_events(publisher, 2)
    publisher.methods[frames.BASIC_NACK](nack(1))
    clock[0] += NACK_STREAK - 0.5
    publish_events(publisher, 1)
    publisher.methods[frames.BASIC_NACK](nack(3, multiple=True))  # a later nack does not restart the streak
    publisher.tick(100.0 + NACK_STREAK - 0.1)
    with pytest.raises(ConnectionError, match="nacked for 2s with no ack"):
        publisher.tick(100.0 + NACK_STREAK + 0.1)


def test_an_ack_ends_a_streak_of_nacks(publisher: Publisher) -> None:
    publish_events(publisher, 3)
    publisher.methods[frames.BASIC_NACK](nack(1))
    publisher.methods[frames.BASIC_ACK](ack(2))
    publisher.tick(time.monotonic() + NACK_STREAK + 1)
    publisher.methods[frames.BASIC_NACK](nack(3))  # a new streak, from now
    started = time.monotonic()
    publisher.tick(started + NACK_STREAK - 0.1)
    with pytest.raises(ConnectionError):
        publisher.tick(started + NACK_STREAK + 0.1)


def test_a_reconnect_ends_a_streak_of_nacks(publisher: Publisher) -> None:
    publish_events(publisher, 1)
    publisher.methods[frames.BASIC_NACK](nack(1))
    publisher.connected = False
    publisher.on_lost()  # the link's teardown, before it connects a fresh channel
    publisher.connected = True
    publisher.tick(time.monotonic() + NACK_STREAK + 1)


def test_the_in_process_wire_answers_a_pass_as_rabbitmq_would() -> None:
    """memory:// has no confirms or returns: its wire routes as RabbitMQ would and answers at the flush,
    through the same handlers RabbitMQ's answers reach (returns first, then one ack for the pass)."""
    publisher = Publisher("memory://")
    memory = Connection("memory://")
    wire = MemoryWire(memory, memory.channel(), publisher)
    publisher.setup(wire)
    publisher.connected = True
    device = f"w-{uuid.uuid4().hex[:8]}"
    witness = memory.channel()
    Queue(f"w-{device}", Exchange("devices.events", type="topic"), routing_key=f"{device}.#")(witness).declare()
    outcomes: dict[int, str | None] = {}
    for n, (kind, key) in enumerate([(EVENT, f"{device}.door"), (EVENT, "nobody.door"), (PRESENCE, "nobody.x")]):
        publisher.publish(kind, key, b"{}", (f"m{n}",), lambda o, n=n: outcomes.__setitem__(n, o))
    publisher.write(wire)
    assert outcomes == {} and publisher.backlog == 3  # nothing answered before the flush, as on a socket
    wire.flush()
    assert outcomes == {0: None, 1: "unroutable", 2: None} and publisher.backlog == 0
    assert witness.basic_get(f"w-{device}").properties["message_id"] == "m0"
    assert witness.basic_get(f"w-{device}") is None  # one event reached the queue, once


# -- the consumer's bindings -------------------------------------------------------------------------
def consumer(live: list[tuple[str, float, str]] | None = None, url: str = "amqp://nowhere",
             takeover: Any = None) -> CommandConsumer:
    def fail(*_args: Any) -> None:
        raise AssertionError("no delivery expected")

    made = CommandConsumer(url, max_command_bytes=1000, refuse=fail, reply_received=fail, asked=fail)
    made.attach(types.SimpleNamespace(deliver=fail, announced=takeover or fail,  # an `Inbound` of callables
                                      live_sessions=lambda: list(live or []), answer=fail))
    made.connected = True
    return made


def test_bindings_are_refcounted() -> None:
    link_, wire = consumer(), RecordingWire()
    link_.bind("a")
    link_.bind("a")
    link_.unbind("a")
    link_.write(wire)
    assert wire.ops() == [("bind", "a")]
    link_.unbind("a")
    link_.bind("b")
    link_.unbind("b")  # bound and unbound before the writer ran: the bind is stale
    link_.write(wire)
    assert wire.ops() == [("bind", "a"), ("unbind", "a"), ("unbind", "b")]


def test_binds_are_paced_by_their_acknowledgements() -> None:
    link_, wire = consumer(), RecordingWire()
    for n in range(START_WINDOW + 100):
        link_.bind(f"d{n}")
    link_.announce("d0", 1.0, "s0")
    assert link_.write(wire) is False
    assert len(wire.calls) == START_WINDOW
    for _ in range(START_WINDOW // 2 - 1):
        link_.methods[frames.QUEUE_BIND_OK](b"")
    link_._wakeup.clear()
    link_.methods[frames.QUEUE_BIND_OK](b"")  # half the window answered: the writer is woken
    assert link_._wakeup.is_set()
    link_.write(wire)
    assert len(wire.calls) == START_WINDOW + 101
    assert wire.ops()[-1] == ("publish", "d0")  # the notice still follows its bind


def test_the_window_holds_what_rabbitmq_answers_in_queue_delay() -> None:
    window, now = Window(), 100.0
    assert window.size == START_WINDOW
    window.wrote(now, outstanding=0)
    for _ in range(40):  # 10 µs a bind
        now += 0.00001
        window.answered(now, outstanding=10)
    assert window.size == MAX_WINDOW
    for _ in range(3):  # 80 ms a bind: RabbitMQ deleting our old queue's bindings, ours racing it
        now += 0.08
        window.answered(now, outstanding=10)
    assert window.size == 0  # closed: nothing more until it answers promptly again
    window.answered(now, outstanding=0)
    window.tick()
    assert window.size == 1  # one write a tick tries again
    now += 60
    window.wrote(now, outstanding=0)  # the idle minute before is no write's cost
    for _ in range(5):
        now += 0.0001
        window.answered(now, outstanding=1)
    assert 1 < window.size < MAX_WINDOW  # reopening, as prompt answers come back
    for _ in range(30):
        now += 0.0001
        window.answered(now, outstanding=1)
    assert window.size == MAX_WINDOW


def announced_link(heard: list[tuple]) -> tuple[CommandConsumer, RecordingWire]:
    """A consumer holding START_WINDOW + 4 sessions that announced themselves, one window of it written."""
    link_, wire = consumer(takeover=lambda *notice: heard.append(notice)), RecordingWire()
    link_.connected = False
    for n in range(START_WINDOW + 4):
        link_.bind(f"d{n}")  # bound while down: the reconnect would re-bind them
    link_.connected = True
    for n in range(START_WINDOW + 4):
        link_.announce(f"d{n}", 1.0, f"s{n}")
    assert link_.write(wire) is False and len(wire.calls) == START_WINDOW
    assert link_.write(wire) is False and len(wire.calls) == START_WINDOW  # nothing came back yet
    link_._wakeup.clear()
    return link_, wire


def test_notices_wait_for_their_own_echo() -> None:
    heard: list[tuple] = []
    link_, wire = announced_link(heard)
    notice = {"type": "warren.takeover"}
    link_._dispatch("devices.commands", "d0", notice, encode_takeover("d0", "s-x", 2.0))
    assert not link_._wakeup.is_set()  # someone else's notice answers none of ours
    link_._dispatch("devices.commands", "d0", notice, encode_takeover("d0", "s0", 1.0))
    assert heard == [("d0", 2.0, "s-x"), ("d0", 1.0, "s0")]
    assert link_._wakeup.is_set()  # ours came back at once: RabbitMQ is quick, the window opens
    link_.write(wire)
    assert len(wire.calls) == START_WINDOW + 4


def test_notices_that_never_come_back_are_given_up_on() -> None:
    link_, wire = announced_link([])
    link_.tick(time.monotonic() + 1)
    link_.write(wire)
    assert len(wire.calls) == START_WINDOW
    link_.tick(time.monotonic() + 60)  # not back after ECHO_TIMEOUT: their devices were unbound meanwhile
    link_.write(wire)
    assert len(wire.calls) == START_WINDOW + 4


def test_a_devices_bind_unbind_and_notice_keep_to_one_lane_and_devices_spread_over_lanes() -> None:
    """RabbitMQ runs a channel's binds one at a time (a cluster transaction each), hence several lanes;
    the welcome relies on a device's bind preceding its notice, which only one channel guarantees."""
    link_, wire = consumer(), RecordingWire()
    link_._lanes = (5, 6, 7, 8)  # what setup opens on RabbitMQ (not on memory://)
    devices = [f"lane-{n}" for n in range(64)]
    for device in devices:
        link_.bind(device)
        link_.announce(device, 1.0, f"s-{device}")
    for device in devices[::2]:
        link_.unbind(device)
    link_.window.size = MAX_WINDOW
    link_.write(wire)
    lanes_of: dict[str, list[int]] = {}
    for call, channel in zip(wire.calls, wire.channels, strict=True):
        lanes_of.setdefault(call[1] if call[0] != "publish" else call[2], []).append(channel)
    assert set(lanes_of) == set(devices) and {len(set(lanes)) for lanes in lanes_of.values()} == {1}
    assert {lanes[0] for lanes in lanes_of.values()} == {5, 6, 7, 8}
    assert [op for op, device in wire.ops() if device == devices[1]] == ["bind", "publish"]
    assert [op for op, device in wire.ops() if device == devices[0]] == ["unbind"]  # bound and gone before the pass


def test_a_reconnect_rebinds_every_device_then_announces_every_session() -> None:
    live = [("a", 1.0, "s-a"), ("b", 2.0, "s-b")]
    link_, wire = consumer(live), RecordingWire()
    for device in ("a", "b", "c"):
        link_.bind(device)
    old_queue = link_.queue_name
    link_.connected = False
    link_.on_lost()
    link_.announce("a", 1.0, "s-a")  # while down: nothing queued, the reconnect announces
    memory = Connection("memory://")
    link_.setup(MemoryWire(memory, memory.channel(), link_))
    assert link_.queue_name != old_queue
    link_.connected = True
    link_.write(wire)
    assert wire.ops() == [("bind", "a"), ("bind", "b"), ("bind", "c"), ("publish", "a"), ("publish", "b")]
    notice = wire.calls[3]
    assert decode_takeover(notice[3]) == ("a", 1.0, "s-a")


def test_the_end_of_rebinding_after_a_connect_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    heard: list[tuple] = []
    link_, wire = consumer([("a", 1.0, "s-a")], takeover=lambda *notice: heard.append(notice)), RecordingWire()
    link_.bind("a")
    link_.bind("b")
    link_.connected = False
    link_.on_lost()
    memory = Connection("memory://")
    link_.setup(MemoryWire(memory, memory.channel(), link_))
    link_.connected = True
    link_.write(wire)
    assert wire.ops() == [("bind", "a"), ("bind", "b"), ("publish", "a")]
    with caplog.at_level(logging.INFO, logger="warren.broker"):
        link_.methods[frames.QUEUE_BIND_OK](b"")
        link_.methods[frames.QUEUE_BIND_OK](b"")
        link_.tick(time.monotonic())
        assert "bound again" not in caplog.text  # the notice's echo is still to come
        link_._dispatch("devices.commands", "a", {"type": "warren.takeover"}, encode_takeover("a", "s-a", 1.0))
        link_.tick(time.monotonic())
    assert heard == [("a", 1.0, "s-a")]
    assert caplog.text.count("consumer: 2 devices bound again") == 1


def test_rebinding_after_a_reconnect_lets_sessions_run_between_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    bound: list[str] = []
    monkeypatch.setattr(MemoryWire, "bind", lambda self, queue, exchange, key, channel=0: bound.append(key))
    drops = itertools.count()
    drop = Event()
    real_read = MemoryWire.read_forever

    def read_forever(self: MemoryWire, *args: Any) -> None:
        if next(drops) == 0:
            drop.wait()
            raise ConnectionResetError("dropped")  # the first connection dies: a reconnect
        real_read(self, *args)

    monkeypatch.setattr(MemoryWire, "read_forever", read_forever)
    monkeypatch.setattr(link, "backoff_delays", lambda: itertools.repeat(0.0))
    devices = [f"r-{uuid.uuid4().hex[:6]}-{n}" for n in range(3 * WRITE_BATCH)]
    link_ = consumer(url="memory://")
    link_.bound = dict.fromkeys(devices, 1)
    seen: list[int] = []
    runner = gevent.spawn(link_.run)

    def watch() -> None:  # a busy session: ready to run whenever the hub lets it
        while True:
            if not seen or seen[-1] != len(bound):
                seen.append(len(bound))
            gevent.sleep(0)

    watcher = gevent.spawn(watch)
    try:
        wait_for(lambda: len(bound) == len(devices))
        drop.set()
        wait_for(lambda: len(bound) == 2 * len(devices))  # all bound again after the reconnect
        assert any(len(devices) < n < 2 * len(devices) for n in seen)  # sessions ran midway through
    finally:
        gevent.killall([runner, watcher])
