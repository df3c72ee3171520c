"""app/broker/'s wire in-process: frames.py's codec and messages.py against py-amqp's own encoder
and parser, and wires.py's AmqpWire (one send per writer pass, the lock, the reader's dispatch) over
a socket pair."""

from __future__ import annotations

import socket
import struct
import types
from typing import Any

import amqp
import gevent
import pytest
from amqp import spec
from amqp.method_framing import frame_writer
from amqp.serialization import dumps, loads

from app.broker import frames, memory_wire
from app.broker.messages import (
    COMMAND,
    EVENT,
    PARTITION_PREFETCH,
    REPLY,
    Command,
    Refusal,
    claim_body,
    decode_claim,
    decode_notice,
    notice_body,
    parse_command,
)
from app.broker.wires import AmqpWire


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


def test_our_basic_ack_of_a_delivery_is_py_amqp_bytes() -> None:
    for channel, tag in [(1, 1), (7, 2**40), (65535, 2**64 - 1)]:
        out = bytearray(b"before")
        frames.encode_basic_ack(out, channel, tag)
        assert bytes(out) == b"before" + py_amqp_frames((1, channel, spec.Basic.Ack, dumps("Lb", (tag, False)), None))


def test_our_basic_reject_requeues_and_is_py_amqp_bytes() -> None:
    for channel, tag in [(1, 1), (65535, 2**64 - 1)]:
        out = bytearray()
        frames.encode_basic_reject(out, channel, tag)
        assert bytes(out) == py_amqp_frames((1, channel, spec.Basic.Reject, dumps("Lb", (tag, True)), None))


def test_basic_deliver_decodes_all_five_fields() -> None:
    for args in [("warren.commands.h.1.ab", 7, True, "", "warren.commands.h.1.ab"),  # a forward, by name
                 ("warren.routes.3", 2**40, False, "warren.routes", "lock-1"),  # a claim, through the hash
                 ("q", 1, False, "devices.commands", "é" * 100)]:
        [(kind, channel, payload)] = read_all(py_amqp_frames((1, 5, spec.Basic.Deliver, dumps("sLbss", args), None)),
                                              step=7)
        assert (kind, channel, payload[:4]) == (1, 5, frames.BASIC_DELIVER)
        assert frames.decode_deliver(payload) == args


def test_basic_return_decodes_and_memory_writes_it_as_rabbitmq_does() -> None:
    for args in [(312, "NO_ROUTE", "", "warren.commands.h.1.ab"), (313, "NO_CONSUMERS", "devices.commands", "d")]:
        payload = method(spec.Basic.Return, "Bsss", args)
        assert payload[:4] == frames.BASIC_RETURN
        assert frames.decode_return(payload) == (args[0], args[2], args[3])
    # MemoryWire's emulated return of a mandatory publish no queue took (memory://'s `make run`)
    assert memory_wire._return_method("", "gone.q") == method(spec.Basic.Return, "Bsss", (312, "NO_ROUTE", "", "gone.q"))


def header_payload(encoded_properties: bytes, body_size: int) -> bytes:
    """A content header frame's payload: class, weight, body size, then the properties."""
    return struct.pack(">HHQ", 60, 0, body_size) + encoded_properties


def test_any_properties_round_trip_through_the_header_decoder() -> None:
    """A forward carries a command's own properties on, with our headers added: every type a table holds."""
    properties = {"content_type": "application/json", "delivery_mode": 2, "type": "warren.command",
                  "message_id": "c-1", "reply_to": "api.q", "correlation_id": "k-1", "expiration": "5000",
                  "timestamp": 1700000000,
                  "application_headers": {"x-warren-device": "lock-1", "x-warren-tag": 2**40, "x-small": 7,
                                          "x-negative": -3, "x-warren-again": True, "x-no": False}}
    encoded = frames.encode_properties(properties)
    assert encoded == amqp.Message(**properties)._serialize_properties()
    size, decoded = frames.decode_header(header_payload(encoded, 42))
    assert (size, decoded) == (42, properties)
    headers = decoded["application_headers"]
    assert headers["x-warren-again"] is True and headers["x-no"] is False  # bools stay bools, not 1 and 0
    message = amqp.Message()  # py-amqp's own parser reads the same
    message.inbound_header(header_payload(encoded, 0))
    assert message.properties == properties
    assert frames.decode_header(header_payload(frames.encode_properties({}), 0)) == (0, {})


def test_a_forward_is_a_mandatory_publish_to_the_default_exchange_with_the_messages_properties() -> None:
    ours, _theirs = socket.socketpair()
    wire = amqp_wire(fake_amqp(ours))
    properties = {"type": "warren.command", "message_id": "c-1",
                  "application_headers": {"x-warren-device": "lock-1", "x-warren-again": True}}
    wire.forward("warren.commands.h.1.ab", properties, b'{"name":"unlock"}', channel=3)
    (kind, channel, args), (_, _, header), (_, _, body) = read_all(bytes(wire.out), step=100)
    assert (kind, channel, struct.unpack_from(">HH", args)) == (1, 3, spec.Basic.Publish)
    assert loads("Bssbb", args, 4)[0] == [0, "", "warren.commands.h.1.ab", True, False]
    assert frames.decode_header(header) == (len(body), properties) and body == b'{"name":"unlock"}'
    wire.ack(99, channel=3)
    assert bytes(wire.out).endswith(py_amqp_frames((1, 3, spec.Basic.Ack, dumps("Lb", (99, False)), None)))


def test_inbound_methods_decode() -> None:
    assert frames.decode_ack(method(spec.Basic.Ack, "Lb", (2**40, True))) == (2**40, True)
    assert frames.decode_ack(method(spec.Basic.Nack, "Lb", (3, False))) == (3, False)
    assert frames.encode_ack(2**40, multiple=True) == method(spec.Basic.Ack, "Lb", (2**40, True))  # memory://'s


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


def test_claims_and_notices_round_trip_and_junk_is_none() -> None:
    assert decode_claim(claim_body("lock-1", "s-1", 12.5, "warren.commands.h", True, 4)) == (
        "lock-1", "s-1", 12.5, "warren.commands.h", True, 4)
    assert decode_claim(b'{"device":"d","session":"s","started":3,"holder":"h","fresh":false,"epoch":1}') == (
        "d", "s", 3.0, "h", False, 1)
    for junk in [b"junk", b"[]", b'{"device":"d"}',
                 b'{"device":1,"session":"s","started":1,"holder":"h","fresh":true,"epoch":1}',
                 b'{"device":"d","session":"s","started":"1","holder":"h","fresh":true,"epoch":1}',
                 b'{"device":"d","session":"s","started":1,"holder":"h","fresh":1,"epoch":1}',
                 b'{"device":"d","session":"s","started":1,"holder":"h","fresh":true,"epoch":true}',
                 b'{"device":"d","session":"s","started":1,"holder":"h","fresh":true}']:
        assert decode_claim(junk) is None
    assert decode_notice(notice_body("lock-1", "s-1")) == ("lock-1", "s-1")
    for junk in [b"junk", b"[]", b'{"device":"d"}', b'{"device":"d","session":2}']:
        assert decode_notice(junk) is None


# -- the batching frame writer over a real socket --------------------------------------------------------
def fake_amqp(sock: socket.socket) -> Any:
    return types.SimpleNamespace(transport=types.SimpleNamespace(sock=sock, _read_buffer=b""), frame_max=4096,
                                 bytes_recv=0, bytes_sent=0, on_inbound_frame=None, frame_writer=None,
                                 heartbeat_tick=lambda: None)


def amqp_wire(connection: Any, contents: dict | None = None) -> AmqpWire:
    """An AmqpWire on a fake py-amqp connection, for a link that handles no frames of its own but `contents`."""
    kombu = types.SimpleNamespace(connection=connection,
                                  channel=lambda: types.SimpleNamespace(basic_consume=lambda *_a, **_k: None))
    link = types.SimpleNamespace(methods={}, contents=contents or {}, on_blocked=None, on_unblocked=None)
    return AmqpWire(kombu, types.SimpleNamespace(channel_id=1), link)  # type: ignore[arg-type]


def test_a_writer_pass_is_one_send_and_never_interleaves_with_protocol_writes() -> None:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    connection = fake_amqp(ours)
    wire = amqp_wire(connection)
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
    returned: list[tuple] = []
    wire = amqp_wire(connection, {frames.BASIC_RETURN: lambda *content: returned.append(content)})
    delivered: list[tuple] = []
    consumed: list[tuple] = []
    channel = types.SimpleNamespace(basic_consume=lambda *args, **kwargs: consumed.append((args, kwargs)))
    wire.consume(channel, "q", lambda *message: delivered.append(message))
    assert consumed[0][0] == ("q",) and consumed[0][1]["consumer_tag"] == "q" and consumed[0][1]["no_ack"]
    message = amqp.Message(b"a" * 5000, message_id="m-1", type="t")
    back = amqp.Message(b"{}", message_id="m-2")
    return_method = dumps("Bsss", (312, "NO_ROUTE", "", "gone.q"))
    theirs.sendall(py_amqp_frames(
        (1, 1, spec.Basic.Deliver, dumps("sLbss", ("q", 1, False, "devices.commands", "lock-1")), message),
        (1, 1, spec.Basic.Deliver, dumps("sLbss", ("old.q", 2, False, "", "old.q")), message),  # an earlier queue's
        (1, 2, spec.Basic.Return, return_method, back),
        (8, 0, None, None, None),
        (1, 0, spec.Connection.Blocked, dumps("s", ("low memory",)), None),
        (1, 1, spec.Channel.Close, dumps("BsBB", (406, "PRECONDITION_FAILED", 60, 40)), None),
    ))
    with pytest.raises(amqp.exceptions.ChannelError, match="PRECONDITION_FAILED"):
        wire.read_forever()
    assert delivered == [(1, False, "devices.commands", "lock-1", {"message_id": "m-1", "type": "t"}, b"a" * 5000)]
    assert returned == [(method(spec.Basic.Return, "Bsss", (312, "NO_ROUTE", "", "gone.q")), {"message_id": "m-2"},
                         b"{}")]
    assert [(t, c, p[:4]) for t, c, p in to_py_amqp] == [(1, 0, method(spec.Connection.Blocked))]
    assert connection.bytes_recv == 14  # every frame, heartbeats too, is traffic to py-amqp's heartbeat check


def test_a_partition_is_consumed_with_the_largest_prefetch_and_published_to_with_confirms() -> None:
    """A quorum queue reads prefetch 0 as 2,000: an owner holding that many claims of one partition would get
    nothing more from it. Acked deliveries come on a channel with AMQP's largest prefetch instead."""
    made: list[Any] = []

    def channel() -> Any:
        calls: list[tuple] = []
        made.append(calls)
        return types.SimpleNamespace(basic_qos=lambda *args: calls.append(("qos", *args)),
                                     confirm_select=lambda: calls.append(("confirm",)), channel_id=len(made))

    ours, _theirs = socket.socketpair()
    wire = amqp_wire(fake_amqp(ours))
    wire.connection.channel = channel
    wire.channel_for(acks=True)
    wire.channel_for(acks=False)
    wire.confirmed_channel()
    assert made == [[("qos", 0, PARTITION_PREFETCH, False)], [], [("confirm",)]] and PARTITION_PREFETCH == 65535


def test_an_event_with_properties_carries_its_headers_and_expiration() -> None:
    """MQTT 5 events (PROTOCOL.md section 9): User Properties as headers, Message Expiry as expiration."""
    from amqp.serialization import decode_properties_basic

    from app.broker.messages import EVENT_WITH_PROPERTIES
    values = ({"site": "a", "tag": ["x", "y"]}, "5000", "lock-1/e-1/1")
    decoded, _ = decode_properties_basic(EVENT_WITH_PROPERTIES.properties.encode(values), 0)
    assert decoded["application_headers"] == {"site": "a", "tag": ["x", "y"]}
    assert (decoded["expiration"], decoded["message_id"], decoded["delivery_mode"]) == ("5000", "lock-1/e-1/1", 2)
    assert EVENT_WITH_PROPERTIES.message_id(values) == "lock-1/e-1/1"
    no_headers, _ = decode_properties_basic(EVENT_WITH_PROPERTIES.properties.encode((None, "5000", "m")), 0)
    assert "application_headers" not in no_headers and no_headers["content_type"] == "application/json"
