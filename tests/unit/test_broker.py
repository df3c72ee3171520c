"""app/broker/ in-process: the wire codec against py-amqp, the links' logic against a recording wire,
the whole facade on kombu's `memory://` transport, and (when one answers) the real RabbitMQ."""

from __future__ import annotations

import gc
import itertools
import socket
import struct
import time
import types
import uuid
from typing import Any

import amqp
import gevent
import orjson
import pytest
from amqp import spec
from amqp.method_framing import frame_writer
from amqp.serialization import dumps, loads
from gevent.event import Event
from kombu import Connection, Exchange, Queue

from app.broker import Broker, frames, link, rpc
from app.broker.consumer import MAX_WINDOW, START_WINDOW, CommandConsumer, Window
from app.broker.link import WRITE_BATCH, AmqpWire, MemoryWire, node_order
from app.broker.messages import (
    ASK,
    ASK_TYPE,
    COMMAND,
    EVENT,
    REPLY,
    Command,
    Refusal,
    decode_ask,
    decode_takeover,
    encode_takeover,
    parse_command,
)
from app.broker.publisher import Publisher

RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"


def wait_for(predicate: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        gevent.sleep(0.005)


def method(sig: tuple[int, int], argsig: str = "", args: tuple = ()) -> bytes:
    return struct.pack(">HH", *sig) + (dumps(argsig, args) if argsig else b"")


def py_amqp_frames(*writes: tuple) -> bytes:
    """Frames as py-amqp's own writer encodes them."""
    sink = bytearray()
    writer = frame_writer(types.SimpleNamespace(frame_max=4096, bytes_sent=0),
                          types.SimpleNamespace(write=sink.extend))
    for write in writes:
        writer(*write)
    return bytes(sink)


class ChunkedSocket:
    """A socket that hands out `data` a few bytes at a time, then EOF."""

    def __init__(self, data: bytes, step: int = 3) -> None:
        self.chunks = [data[i:i + step] for i in range(0, len(data), step)]

    def recv(self, _size: int) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


def read_all(data: bytes, step: int) -> list[tuple[int, int, bytes]]:
    """Every frame in `data`, read `step` bytes at a time."""
    reader, got = frames.FrameReader(ChunkedSocket(data, step)), []
    with pytest.raises(ConnectionResetError):
        while True:
            got += reader.read()
    return got


class RecordingWire:
    """What a link writes, as calls; answers binds like RabbitMQ (acknowledges_binds)."""

    acknowledges_binds = True
    collecting = False

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def publish(self, kind: Any, routing_key: str, body: bytes, values: tuple) -> None:
        self.calls.append(("publish", kind, routing_key, body, values))

    def bind(self, queue: str, exchange: str, routing_key: str) -> None:
        self.calls.append(("bind", routing_key))

    def unbind(self, queue: str, exchange: str, routing_key: str) -> None:
        self.calls.append(("unbind", routing_key))

    def ops(self) -> list[tuple[str, str]]:
        return [(c[0], c[2]) if c[0] == "publish" else c for c in self.calls]


# -- the wire codec ----------------------------------------------------------------------------------
def test_publish_frames_decode_as_py_amqp_reads_them() -> None:
    values = ("corr-1", "reply.q", "5000", "msg-1", 1700000000)
    body = bytes(range(256)) * 40  # 10 kB: three body frames at frame_max 4096
    out = bytearray()
    frames.encode_publish(out, 1, 4096, COMMAND, "lock-1", COMMAND.properties.encode(values), body)
    (kind, channel, args), (header_kind, _, header), *bodies = read_all(bytes(out), step=1000)
    assert (kind, channel, header_kind, [b[0] for b in bodies]) == (1, 1, 2, [3, 3, 3])
    assert struct.unpack_from(">HH", args) == spec.Basic.Publish
    assert loads("Bssbb", args, 4)[0] == [0, "devices.commands", "lock-1", True, False]
    message = amqp.Message()  # py-amqp's own content parser
    message.inbound_header(header)
    for _, _, piece in bodies:
        message.inbound_body(piece)
    assert message.ready and message.body == body
    assert message.properties == COMMAND.properties.as_dict(values)


def test_fixed_properties_are_serialized_as_py_amqp_does() -> None:
    for kind, values in [(EVENT, ("d/e/1",)), (REPLY, ("c-9",)), (COMMAND, ("c", "r", "1", "m", 5))]:
        expected = amqp.Message(**kind.properties.as_dict(values))._serialize_properties()
        assert kind.properties.encode(values) == expected
    with pytest.raises(ValueError):
        frames.Properties({"message_id": "x"}, ("correlation_id",))  # a variable before a fixed one
    with pytest.raises(ValueError):
        frames.shortstr("x" * 256)


def test_bind_and_unbind_are_py_amqp_bytes() -> None:
    for encode, sig, argsig, args in [
        (frames.encode_bind, spec.Queue.Bind, "BsssbF", (0, "q", "devices.commands", "lock-1", False, {})),
        (frames.encode_unbind, spec.Queue.Unbind, "BsssF", (0, "q", "devices.commands", "lock-1", {})),
    ]:
        out = bytearray()
        encode(out, 1, "q", "devices.commands", "lock-1")
        assert bytes(out) == py_amqp_frames((1, 1, sig, dumps(argsig, args), None))


def test_inbound_methods_decode() -> None:
    deliver = method(spec.Basic.Deliver, "sLbss", ("ctag", 7, True, "devices.commands", "lock-1"))
    assert frames.decode_deliver(deliver) == ("devices.commands", "lock-1")
    returned = method(spec.Basic.Return, "Bsss", (312, "NO_ROUTE", "devices.events", "d.e"))
    assert frames.decode_return(returned) == (312, "NO_ROUTE", "devices.events", "d.e")
    assert frames.decode_ack(method(spec.Basic.Ack, "Lb", (2**40, True))) == (2**40, True)
    assert frames.decode_ack(method(spec.Basic.Nack, "Lb", (3, False))) == (3, False)


def test_frame_reader_reassembles_any_split_and_checks_frame_ends() -> None:
    data = py_amqp_frames((8, 0, None, None, None), (1, 1, spec.Basic.Ack, dumps("Lb", (1, False)), None)) * 5
    got = read_all(data, step=3)
    assert [(t, c) for t, c, _ in got] == [(8, 0), (1, 1)] * 5
    with pytest.raises(amqp.exceptions.UnexpectedFrame):
        frames.FrameReader(ChunkedSocket(data[:-1] + b"\x00", step=len(data))).read()


# -- parsing commands -------------------------------------------------------------------------------
def parse(body: bytes, max_bytes: int = 1000, **properties: Any) -> Command | Refusal:
    return parse_command("lock-1", properties, body, max_bytes, monotonic=100.0, wall=5000.0)


def test_parse_command_builds_it_complete() -> None:
    command = parse(b'{"name":"unlock","data":{"a":1}}', message_id="m-1", reply_to="r", correlation_id="c")
    assert command == Command("lock-1", "m-1", "unlock", {"a": 1}, "r", "c", 160.0)
    with pytest.raises(AttributeError):
        command.name = "lock"  # type: ignore[misc]
    made = parse(b'{"name":"unlock"}', reply_to="")
    assert isinstance(made, Command) and len(made.id) == 32 and made.correlation_id == made.id
    assert made.reply_to is None and made.data is None


@pytest.mark.parametrize("body", [b"not json", b"[1]", b'{"data":1}', b'{"name":""}', b'{"name":7}'])
def test_parse_command_refuses_bad_commands(body: bytes) -> None:
    refusal = parse(body, message_id="m-2", reply_to="r")
    assert refusal == Refusal("lock-1", "m-2", "r", "m-2", "bad_command")


def test_parse_command_refuses_too_large_before_parsing() -> None:
    assert parse(b'{"name":"x","data":"' + b"a" * 100 + b'"}', max_bytes=50).error == "too_large"


@pytest.mark.parametrize(("properties", "deadline"), [
    ({}, 160.0),  # 60 s by default, counted from now
    ({"expiration": "5000"}, 105.0),
    ({"expiration": "5000", "timestamp": 4998}, 103.0),  # waited 2 s in the queue
    ({"expiration": "5000", "timestamp": 6000}, 105.0),  # a sender's clock ahead of ours waits nothing
    ({"expiration": "soon"}, 160.0),
    ({"expiration": "1000", "timestamp": 4000}, -899.0),  # expired long ago
])
def test_command_deadline_from_expiration_and_timestamp(properties: dict, deadline: float) -> None:
    assert parse(b'{"name":"x"}', **properties).deadline == deadline


def test_takeover_notice_round_trip_and_junk() -> None:
    assert decode_takeover(encode_takeover("lock-1", "s-1", 12.5)) == ("lock-1", 12.5, "s-1")
    for junk in [b"junk", b"[]", b'{"device":"d"}', b'{"device":1,"started":1,"session":"s"}']:
        assert decode_takeover(junk) is None


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
    publisher._on_blocked("low on memory")
    now: list[str | None] = []
    publisher.publish(EVENT, "lock-1.door", b"{}", ("m1",), now.append)
    assert now == ["broker_unavailable"] and queued == []
    wire = RecordingWire()
    publisher.write(wire)
    assert queued == ["broker_unavailable"] and wire.calls == []
    publisher._on_unblocked()
    assert publisher.accepting


def test_a_lost_connection_fails_pending_and_queued(publisher: Publisher) -> None:
    pending = publish_events(publisher, 1)
    queued: list[str | None] = []
    publisher.publish(EVENT, "lock-1.door", b"{}", ("q",), queued.append)
    publisher.connected = False
    publisher.on_lost()
    assert pending == {0: "broker_unavailable"} and queued == ["broker_unavailable"]


# -- the consumer's bindings -------------------------------------------------------------------------
def consumer(live: list[tuple[str, float, str]] | None = None, url: str = "amqp://nowhere",
             takeover: Any = None) -> CommandConsumer:
    def fail(*_args: Any) -> None:
        raise AssertionError("no delivery expected")

    made = CommandConsumer(url, max_command_bytes=1000, deliver=fail, refuse=fail, takeover=takeover or fail,
                           reply_received=fail, asked=fail, live_sessions=lambda: list(live or []))
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
    deliver = method(spec.Basic.Deliver, "sLbss", ("c", 1, False, "devices.commands", "d0"))
    link_.contents[frames.BASIC_DELIVER](deliver, {"type": "warren.takeover"}, encode_takeover("d0", "s-x", 2.0))
    assert not link_._wakeup.is_set()  # someone else's notice answers none of ours
    link_.contents[frames.BASIC_DELIVER](deliver, {"type": "warren.takeover"}, encode_takeover("d0", "s0", 1.0))
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
    link_.setup(memory, memory.channel())
    assert link_.queue_name != old_queue
    link_.connected = True
    link_.write(wire)
    assert wire.ops() == [("bind", "a"), ("bind", "b"), ("bind", "c"), ("publish", "a"), ("publish", "b")]
    notice = wire.calls[3]
    assert decode_takeover(notice[3]) == ("a", 1.0, "s-a")


def test_rebinding_after_a_reconnect_lets_sessions_run_between_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    bound: list[str] = []
    monkeypatch.setattr(MemoryWire, "bind", lambda self, queue, exchange, key: bound.append(key))
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


# -- node rotation and failover ------------------------------------------------------------------------
def test_node_order_spreads_workers_and_their_failover() -> None:
    url = "amqp://a;amqp://b; amqp://c"
    orders = [node_order(url, n) for n in range(6)]
    assert [o[0] for o in orders] == ["amqp://a", "amqp://b", "amqp://c"] * 2
    assert orders[0][1] != orders[3][1]  # the two workers on node a fail over to different nodes
    assert all(sorted(o) == ["amqp://a", "amqp://b", "amqp://c"] for o in orders)
    assert node_order("amqp://only", 7) == ["amqp://only"]


def test_a_link_fails_over_along_its_order(monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[str] = []
    dead = {"memory://b"}

    def connect(url: str, **_kwargs: Any) -> Any:
        attempts.append(url)
        if url in dead:
            return types.SimpleNamespace(connect=lambda: (_ for _ in ()).throw(ConnectionRefusedError(url)))
        return Connection("memory://")

    monkeypatch.setattr(link, "Connection", connect)
    monkeypatch.setattr(link, "backoff_delays", lambda: itertools.repeat(0.0))
    publisher = Publisher("memory://a;memory://b;memory://c", node_offset=1)
    runner = gevent.spawn(publisher.run)
    try:
        wait_for(lambda: publisher.connected)
        assert attempts == ["memory://b", "memory://c"]
    finally:
        runner.kill()


# -- the HTTP API's commands -----------------------------------------------------------------------------
class FakePublisher:
    def __init__(self) -> None:
        self.sent: list[tuple] = []

    def publish(self, kind: Any, routing_key: str, body: bytes, values: tuple, done: Any = None) -> None:
        self.sent.append((kind, routing_key, body, values, done))


def test_rpc_resolves_from_the_reply_a_return_or_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    publisher = FakePublisher()
    client = rpc.RpcClient(publisher, reply_to=lambda: "our.queue")  # type: ignore[arg-type]
    replied = client.send_command("lock-1", "unlock", {"x": 1}, timeout=5)
    kind, key, body, values, _done = publisher.sent[0]
    assert (kind, key, orjson.loads(body), values[1], values[2]) == (COMMAND, "lock-1", {"name": "unlock",
                                                                      "data": {"x": 1}}, "our.queue", "5000")
    client.reply_received(values[0], b'{"ok":true,"data":7,"error":null}')
    assert replied.get(timeout=1) == {"ok": True, "data": 7, "error": None}

    offline = client.send_command("lock-2", "unlock", None, timeout=5)
    publisher.sent[1][4]("unroutable")  # returned by RabbitMQ: no worker holds lock-2
    assert offline.get(timeout=1) == {"ok": False, "error": "offline", "data": None}

    monkeypatch.setattr(rpc, "ABANDON_GRACE", 0.0)
    silent = client.send_command("lock-3", "unlock", None, timeout=0.02)
    assert silent.get(timeout=1) == {"ok": False, "error": "timeout", "data": None}
    client.reply_received(publisher.sent[2][3][0], b'{"ok":true}')  # too late: changes nothing
    assert silent.get()["error"] == "timeout"


def test_an_operators_question_resolves_from_the_holder_a_return_or_its_timeout() -> None:
    publisher = FakePublisher()
    client = rpc.RpcClient(publisher, reply_to=lambda: "our.queue")  # type: ignore[arg-type]
    held = client.ask("lock-1", "info", timeout=5)
    kind, key, body, values, _done = publisher.sent[0]
    assert (kind, key, decode_ask(body), values[4]) == (ASK, "lock-1", "info", ASK_TYPE)
    client.reply_received(values[0], b'{"device":"lock-1","online":true,"session":"s"}')
    assert held.get(timeout=1) == {"device": "lock-1", "online": True, "session": "s"}
    nobody = client.ask("lock-2", "kick", timeout=5)
    publisher.sent[1][4]("unroutable")
    assert nobody.get(timeout=1) == {"device": "lock-2", "online": False}
    assert client.ask("lock-3", "info", timeout=0.02).get(timeout=1) == {"error": "timeout"}


# -- the batching frame writer over a real socket --------------------------------------------------------
def fake_amqp(sock: socket.socket) -> Any:
    return types.SimpleNamespace(transport=types.SimpleNamespace(sock=sock, _read_buffer=b""), frame_max=4096,
                                 bytes_recv=0, bytes_sent=0, on_inbound_frame=None, frame_writer=None,
                                 heartbeat_tick=lambda: None)


def test_a_writer_pass_is_one_send_and_never_interleaves_with_protocol_writes() -> None:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    connection = fake_amqp(ours)
    wire = AmqpWire(types.SimpleNamespace(connection=connection), types.SimpleNamespace(channel_id=1))
    sends: list[int] = []
    real_send = ours.send
    wire._sock = types.SimpleNamespace(send=lambda data: sends.append(len(data)) or real_send(data))
    wire.collecting = True
    for n in range(50):
        wire.publish(EVENT, "lock-1.door", b"{}", (f"m{n}",))
    connection.frame_writer(8, 0, None, None, None)  # py-amqp's heartbeat, inside the pass: batched
    wire.collecting = False
    wire.flush()
    assert len(sends) == 1
    received = bytearray()
    _more(theirs, received)
    assert [t for t, _, _ in read_all(bytes(received), len(received))] == [1, 2, 3] * 50 + [frames.HEARTBEAT]

    big = b"x" * 4000
    for _ in range(400):  # more than the socket buffers: the flush blocks partway
        frames.encode_publish(wire.out, 1, 4096, EVENT, "lock-1.door", EVENT.properties.encode(("m",)), big)
    flusher = gevent.spawn(wire.flush)
    gevent.sleep(0.01)
    protocol_write = gevent.spawn(connection.frame_writer, 1, 0, spec.Connection.CloseOk, "", None)
    gevent.sleep(0.01)
    assert not flusher.dead and not protocol_write.dead  # the reader's write waits for the lock
    received = bytearray()
    while not (flusher.dead and protocol_write.dead) or _more(theirs, received):
        _more(theirs, received)
        gevent.sleep(0.001)
    kinds = [(t, payload[:4]) for t, _, payload in read_all(bytes(received), step=len(received))]
    assert len(kinds) == 400 * 3 + 1
    assert kinds[-1] == (1, method(spec.Connection.CloseOk))  # whole, after every frame of the pass


def _more(sock: socket.socket, into: bytearray) -> bool:
    try:
        data = sock.recv(1 << 16)
    except BlockingIOError:
        return False
    into += data
    return bool(data)


def test_the_reader_dispatches_deliveries_and_hands_py_amqp_the_rest() -> None:
    ours, theirs = socket.socketpair()
    connection = fake_amqp(ours)
    to_py_amqp: list[tuple] = []
    connection.on_inbound_frame = to_py_amqp.append
    wire = AmqpWire(types.SimpleNamespace(connection=connection), types.SimpleNamespace(channel_id=1))
    delivered: list[tuple] = []
    message = amqp.Message(b"a" * 5000, message_id="m-1", type="t")
    theirs.sendall(py_amqp_frames(
        (1, 1, spec.Basic.Deliver, dumps("sLbss", ("c", 1, False, "devices.commands", "lock-1")), message),
        (8, 0, None, None, None),
        (1, 0, spec.Connection.Blocked, dumps("s", ("low memory",)), None),
        (1, 1, spec.Channel.Close, dumps("BsBB", (406, "PRECONDITION_FAILED", 60, 40)), None),
    ))
    contents = {frames.BASIC_DELIVER: lambda m, p, b: delivered.append((frames.decode_deliver(m), p, b))}
    with pytest.raises(amqp.exceptions.ChannelError, match="PRECONDITION_FAILED"):
        wire.read_forever({}, contents)
    assert delivered == [(("devices.commands", "lock-1"), {"message_id": "m-1", "type": "t"}, b"a" * 5000)]
    assert [(t, c, p[:4]) for t, c, p in to_py_amqp] == [(1, 0, method(spec.Connection.Blocked))]
    assert connection.bytes_recv == 7  # every frame, heartbeats too, is traffic to py-amqp's heartbeat check


# -- the facade on the in-process broker -----------------------------------------------------------------
@pytest.fixture
def memory_broker() -> Any:
    seen: dict[str, list] = {"commands": [], "takeovers": []}

    def answer(device: str, kind: str) -> dict[str, Any] | None:
        return {"device": device, "online": True, "asked": kind} if device in seen["takeovers"][0] else None

    broker = Broker("memory://", deliver=seen["commands"].append,
                    takeover=lambda *notice: seen["takeovers"].append(notice),
                    live_sessions=list, max_command_bytes=200, answer=answer)
    runners = [gevent.spawn(each.run) for each in broker.links]
    wait_for(lambda: broker.ready)
    yield broker, seen
    gevent.killall(runners)


def test_in_process_broker_routes_as_rabbitmq_would(memory_broker: Any) -> None:
    broker, seen = memory_broker
    device, stranger = f"mem-{uuid.uuid4().hex[:8]}", f"mem-{uuid.uuid4().hex[:8]}"
    witness = Connection("memory://").channel()
    Queue(f"w-{device}", Exchange("devices.events", type="topic"), routing_key=f"{device}.#")(witness).declare()
    outcomes: list[str | None] = []
    broker.publish_event(device, "s-1", "door.opened", "e-1", {"a": 1}, outcomes.append)
    broker.publish_event(stranger, "s-2", "door.opened", "e-1", None, outcomes.append)
    wait_for(lambda: len(outcomes) == 2)
    assert outcomes == [None, "unroutable"]
    stored = orjson.loads(witness.basic_get(f"w-{device}").body)
    assert {k: stored[k] for k in ("device", "session", "id", "name", "data")} == {
        "device": device, "session": "s-1", "id": "e-1", "name": "door.opened", "data": {"a": 1}}

    broker.bind(device)
    broker.announce(device, 3.0, "s-1")
    wait_for(lambda: seen["takeovers"] == [(device, 3.0, "s-1")])  # our own notice: the bind is in effect
    result = broker.send_command(device, "unlock", {"door": 2}, timeout=5)
    wait_for(lambda: seen["commands"])
    command = seen["commands"][0]
    assert (command.device, command.name, command.data) == (device, "unlock", {"door": 2})
    broker.reply(command, ok=True, data="opened")
    assert result.get(timeout=2) == {"device": device, "id": command.id, "ok": True, "data": "opened",
                                     "error": None}
    assert broker.send_command(stranger, "unlock", None, timeout=5).get(timeout=2)["error"] == "offline"
    too_large = broker.send_command(device, "unlock", "x" * 300, timeout=5).get(timeout=2)
    assert (too_large["ok"], too_large["error"]) == (False, "too_large")
    assert broker.ask(device, "info", 5).get(timeout=2) == {"device": device, "online": True, "asked": "info"}
    assert broker.ask(stranger, "info", 5).get(timeout=2) == {"device": stranger, "online": False}
    assert broker.backlog == 0 and broker.accepting


# -- the real RabbitMQ -------------------------------------------------------------------------------------
def _rabbitmq_answers() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=0.5).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _rabbitmq_answers(), reason="needs RabbitMQ on 127.0.0.1:5672")
def test_real_rabbitmq_confirms_routes_and_survives_a_cut_connection() -> None:
    device, session = f"unit-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:8]
    commands: list[Command] = []
    routed = Event()

    def takeover(dev: str, started: float, session_id: str) -> None:
        if (dev, session_id) == (device, session):
            routed.set()

    broker = Broker(RABBITMQ, deliver=commands.append, takeover=takeover, max_command_bytes=1000,
                    live_sessions=lambda: [(device, 1.0, session)])
    runners = [gevent.spawn(each.run) for each in broker.links]
    try:
        wait_for(lambda: broker.ready, timeout=10)
        broker.bind(device)
        broker.announce(device, 1.0, session)
        assert routed.wait(5)
        witness = Connection(RABBITMQ)
        queue = Queue(f"unit.{device}", Exchange("devices.events", type="topic", durable=True),
                      routing_key=f"{device}.#", exclusive=True)
        queue(witness.default_channel).declare()
        outcomes: list[str | None] = []
        broker.publish_event(device, session, "door.opened", "e-1", {"n": 1}, outcomes.append)
        wait_for(lambda: outcomes, timeout=5)
        assert outcomes == [None]
        stored = orjson.loads(queue(witness.default_channel).get(no_ack=True).body)
        assert (stored["device"], stored["id"], stored["data"]) == (device, "e-1", {"n": 1})
        witness.release()
        assert broker.send_command(f"nobody-{device}", "unlock", None, 5).get(timeout=5)["error"] == "offline"

        for sock in [o for o in gc.get_objects() if isinstance(o, socket.socket) and _peer_port(o) == 5672]:
            sock.shutdown(socket.SHUT_RDWR)  # the network cuts both connections
        routed.clear()
        assert routed.wait(15)  # reconnected, re-bound and re-announced
        wait_for(lambda: broker.ready, timeout=5)
        result = broker.send_command(device, "unlock", {"n": 1}, 5)
        wait_for(lambda: commands, timeout=5)
        broker.reply(commands[0], ok=True, data="done")
        assert result.get(timeout=5)["data"] == "done"
    finally:
        gevent.killall(runners)


def _peer_port(sock: socket.socket) -> int | None:
    try:
        return sock.getpeername()[1]
    except (OSError, IndexError, TypeError):
        return None
