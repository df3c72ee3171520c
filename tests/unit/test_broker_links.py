"""app/broker/'s links in-process: the publisher's confirms, and the consumer's claims, releases and what
it does with each kind of delivery, against a recording wire; the link's reconnect on kombu's `memory://`."""

from __future__ import annotations

import itertools
import struct
import time
import types
import uuid
from typing import Any

import gevent
import orjson
import pytest
from amqp import spec
from amqp.serialization import dumps
from gevent.event import Event
from kombu import Connection, Exchange, Queue

from app.broker import frames, link
from app.broker.bans import BanStream
from app.broker.consumer import CommandConsumer
from app.broker.directory import HOLDER_GRACE
from app.broker.link import NACK_STREAK, WRITE_BATCH
from app.broker.memory_wire import MemoryWire
from app.broker.messages import (
    AGAIN_HEADER,
    ASK_TYPE,
    BAN_TYPE,
    CLAIM,
    CLAIM_TYPE,
    DEVICE_HEADER,
    EVENT,
    FORWARD_TYPE,
    MARK_TYPE,
    PRESENCE,
    RELEASE,
    REPLACED_NOTICE,
    REPLACED_TYPE,
    REPLY,
    RING_PROBE,
    ROUTED_NOTICE,
    ROUTED_TYPE,
    TAG_HEADER,
    Command,
    Refusal,
    ask_body,
    ban_body,
    claim_body,
    decode_ban,
    decode_claim,
    decode_notice,
    notice_body,
)
from app.broker.partitions import ROUTING_NACK_STREAK, ROUTING_NACKS_DESPITE_ACKS, receipt, split_receipt
from app.broker.publisher import Publisher
from app.sessions.bans import Ban


def wait_for(predicate: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        gevent.sleep(0.005)


def method(sig: tuple[int, int], argsig: str = "", args: tuple = ()) -> bytes:
    return struct.pack(">HH", *sig) + (dumps(argsig, args) if argsig else b"")


class RecordingWire:
    """What a link writes, as calls."""

    collecting = False

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.channels: list[int] = []  # the channel of each call (0: the link's own)

    def publish(self, kind: Any, routing_key: str, body: bytes, values: tuple, channel: int = 0) -> None:
        self.calls.append(("publish", kind, routing_key, body, values))
        self.channels.append(channel)

    def forward(self, routing_key: str, properties: dict, body: bytes, channel: int) -> None:
        self.calls.append(("forward", routing_key, properties, body))
        self.channels.append(channel)

    def ack(self, tag: int, channel: int, multiple: bool = False) -> None:
        self.calls.append(("ack", tag) if not multiple else ("ack-up-to", tag))
        self.channels.append(channel)

    def follow_stream(self, name: str, arguments: dict, on_message: Any) -> int:
        self.calls.append(("follow", name, arguments["x-queue-type"]))
        self.channels.append(0)
        self.on_stream = on_message
        return 9

    def reject(self, tag: int, channel: int) -> None:
        self.calls.append(("reject", tag))
        self.channels.append(channel)

    def ops(self) -> list[tuple[Any, str]]:
        """(kind, routing key) of each publish."""
        return [(c[1], c[2]) for c in self.calls if c[0] == "publish"]


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
    monkeypatch.setattr(link, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
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


# -- the consumer: claims and releases out ---------------------------------------------------------------
class Heard:
    """The sessions side (`Inbound`) and the facade's callbacks of a consumer, recording every call."""

    def __init__(self, live: list[tuple[str, float, str]] | None = None) -> None:
        self.calls: list[tuple] = []
        self.live = list(live or [])

    def deliver(self, command: Command, again: bool = False) -> None:
        self.calls.append(("deliver", command, again))

    def routed(self, device: str, session_id: str) -> None:
        self.calls.append(("routed", device, session_id))

    def replaced(self, device: str, session_id: str) -> None:
        self.calls.append(("replaced", device, session_id))

    def live_sessions(self) -> list[tuple[str, float, str]]:
        return list(self.live)

    def ban_changed(self, ban: Any) -> None:
        self.calls.append(("ban", ban))

    def answer(self, device: str, question: str) -> None:
        raise AssertionError("the consumer hands questions to the facade (`asked`), not to the Inbound")

    def refuse(self, refusal: Refusal) -> None:
        self.calls.append(("refuse", refusal))

    def reply_received(self, correlation_id: str | None, body: bytes) -> None:
        self.calls.append(("reply", correlation_id, body))

    def asked(self, device: str, question: str, reply_to: str | None, correlation_id: str | None) -> None:
        self.calls.append(("asked", device, question, reply_to, correlation_id))


def consumer(heard: Heard | None = None, url: str = "amqp://nowhere") -> tuple[CommandConsumer, Heard]:
    heard = heard or Heard()
    made = CommandConsumer(url, max_command_bytes=100, refuse=heard.refuse, reply_received=heard.reply_received,
                           asked=heard.asked)
    made.attach(heard)
    made.connected = True
    return made, heard


def test_claims_and_releases_go_in_order_to_their_devices_partition() -> None:
    link_, wire = consumer()[0], RecordingWire()
    link_.claim("a", 1.5, "s-a")
    link_.release("b", "s-b")
    link_.claim("b", 2.0, "s-b2")
    assert link_._wakeup.is_set()
    assert link_.write(wire) is False
    assert wire.ops() == [(CLAIM, "a"), (RELEASE, "b"), (CLAIM, "b")]  # the hash exchange keys on the device
    # A new session: fresh, stated as of this connection (its epoch).
    assert decode_claim(wire.calls[0][3]) == ("a", "s-a", 1.5, link_.queue_name, True, link_.epoch)
    assert decode_notice(wire.calls[1][3]) == ("b", "s-b")
    assert decode_claim(wire.calls[2][3]) == ("b", "s-b2", 2.0, link_.queue_name, True, link_.epoch)
    assert set(wire.channels) == {link_.owner._channel_id}  # on the partitions' channel, in confirm mode


def test_a_claim_rabbitmq_refuses_is_made_again_as_a_restatement_and_a_release_as_it_was() -> None:
    """A partition queue changing leader (its node going down) may nack what it was sent meanwhile."""
    link_, wire = consumer()[0], RecordingWire()
    link_.claim("a", 1.5, "s-a")
    link_.release("b", "s-b")
    link_.claim("c", 2.5, "s-c")
    link_.write(wire)
    link_.methods[frames.BASIC_ACK](ack(1))  # the first claim is in
    link_.methods[frames.BASIC_NACK](ack(3, multiple=True, sig=spec.Basic.Nack))  # the other two are not
    link_.write(wire)
    assert len(wire.calls) == 3  # not at once: the queue may refuse for seconds (a leader election)
    link_.tick(time.monotonic())
    link_.write(wire)
    again = wire.calls[3:]
    assert [(c[1], c[2]) for c in again] == [(RELEASE, "b"), (CLAIM, "c")]
    assert decode_notice(again[0][3]) == ("b", "s-b")
    assert decode_claim(again[1][3]) == ("c", "s-c", 2.5, link_.queue_name, False, link_.epoch)  # not fresh now


def test_a_forward_rabbitmq_refuses_goes_back_to_its_partition_to_be_passed_on_again() -> None:
    link_, wire = consumer()[0], RecordingWire()
    link_.owner.directory.claim(3, "lock-1", "s-1", 1.0, "holder.q", fresh=True, partition=0, now=time.monotonic())
    link_.owner.delivered(0, 9, False, "devices.commands", "lock-1", {"message_id": "c-1"}, b'{"name":"x"}')
    link_.write(wire)
    assert wire.calls[0][0] == "forward"
    link_.methods[frames.BASIC_NACK](ack(1, sig=spec.Basic.Nack))
    link_.write(wire)
    assert wire.calls[1:] == []  # not at once: its queue may refuse for seconds
    link_.tick(time.monotonic())
    link_.write(wire)
    assert wire.calls[1:] == [("reject", 9)]  # requeued, not acked: the next take sees where the device is then


def test_nothing_is_queued_while_disconnected_and_a_loss_drops_what_was() -> None:
    link_, wire = consumer()[0], RecordingWire()
    link_.connected = False
    link_.claim("a", 1.0, "s-a")  # the reconnect claims every live session instead
    link_.release("a", "s-a")
    assert not link_._wakeup.is_set()
    link_.connected = True
    link_.claim("b", 1.0, "s-b")
    old_queue = link_.queue_name
    link_.connected = False
    link_.on_lost()
    assert link_.queue_name != old_queue  # the exclusive queue died with the connection
    link_.connected = True
    link_.write(wire)
    assert wire.calls == []


def test_a_writer_pass_writes_at_most_a_batch() -> None:
    link_, wire = consumer()[0], RecordingWire()
    for n in range(WRITE_BATCH + 5):
        link_.claim(f"d{n}", 1.0, f"s{n}")
    assert link_.write(wire) is True and len(wire.calls) == WRITE_BATCH
    assert link_.write(wire) is False and len(wire.calls) == WRITE_BATCH + 5
    assert wire.ops()[-1] == (CLAIM, f"d{WRITE_BATCH + 4}")


def test_a_connect_claims_every_live_session_again_not_fresh() -> None:
    heard = Heard([("a", 1.0, "s-a"), ("b", 2.0, "s-b")])
    link_, _ = consumer(heard)
    link_.claim("stale", 1.0, "s-x")  # queued before the loss: gone with it
    epoch = link_.epoch
    link_.connected = False
    link_.on_lost()
    memory = Connection("memory://")
    link_.setup(MemoryWire(memory, memory.channel(), link_))
    link_.connected = True
    wire = RecordingWire()
    link_.write(wire)
    # The ring check's probes first (the in-process broker has one partition), then the claims.
    assert wire.ops()[2:] == [(CLAIM, "a"), (CLAIM, "b")]
    assert [kind for kind, _key in wire.ops()[:2]] == [RING_PROBE, RING_PROBE]
    # Re-statements under the new queue's name, weighed by hello time against a session started meanwhile.
    # ... from a later connection than any claim before, whichever reaches the owner first.
    assert [decode_claim(call[3]) for call in wire.calls[2:]] == [
        ("a", "s-a", 1.0, link_.queue_name, False, epoch + 1), ("b", "s-b", 2.0, link_.queue_name, False, epoch + 1)]


def test_the_consumer_will_not_run_without_an_inbound() -> None:
    link_ = CommandConsumer("memory://", max_command_bytes=100, refuse=print, reply_received=print, asked=print)
    memory = Connection("memory://")
    with pytest.raises(RuntimeError, match="no Inbound"):
        link_.setup(MemoryWire(memory, memory.channel(), link_))


# -- the consumer: what comes in --------------------------------------------------------------------------
def forwarded(device: Any = "lock-1", **headers: Any) -> dict[str, Any]:
    """The properties of a command its partition's owner passed on to us."""
    application_headers = {"x-warren-tag": 7, **headers}
    if device is not None:
        application_headers[DEVICE_HEADER] = device
    return {"type": FORWARD_TYPE, "message_id": "c-1", "reply_to": "api.q", "correlation_id": "k-1",
            "application_headers": application_headers}


def test_a_forwarded_command_is_delivered_and_a_redelivered_one_is_marked_again() -> None:
    link_, heard = consumer()
    before = time.monotonic()
    link_._dispatch(1, False, "", link_.queue_name, forwarded(), b'{"name":"unlock","data":{"door":2}}')
    link_._dispatch(2, False, "", link_.queue_name, forwarded(**{AGAIN_HEADER: True}), b'{"name":"unlock"}')
    [(what, command, again), (_, second, again_second)] = heard.calls
    assert what == "deliver" and again is False and again_second is True
    assert (command.device, command.id, command.name, command.data, command.reply_to, command.correlation_id) == (
        "lock-1", "c-1", "unlock", {"door": 2}, "api.q", "k-1")
    assert before + 59 < command.deadline <= time.monotonic() + 60  # no expiration: the default TTL
    assert (second.device, second.id, second.data) == ("lock-1", "c-1", None)


@pytest.mark.parametrize("device", [None, 7])
def test_a_forward_without_a_device_header_is_ignored(device: Any) -> None:
    link_, heard = consumer()
    link_._dispatch(1, False, "", link_.queue_name, forwarded(device), b'{"name":"unlock"}')
    assert heard.calls == []


@pytest.mark.parametrize(("body", "error"), [(b'{"name":"unlock","data":"' + b"x" * 100 + b'"}', "too_large"),
                                             (b"not json", "bad_command"), (b'{"data":1}', "bad_command")])
def test_a_forward_that_is_no_command_is_refused_to_its_sender(body: bytes, error: str) -> None:
    link_, heard = consumer()
    link_._dispatch(1, True, "", link_.queue_name, forwarded(), body)
    assert heard.calls == [("refuse", Refusal("lock-1", "c-1", "api.q", "k-1", error))]


def test_the_owners_notices_reach_the_sessions_side() -> None:
    link_, heard = consumer()
    for kind, session in [(ROUTED_TYPE, "s-1"), (REPLACED_TYPE, "s-0")]:
        link_._dispatch(1, False, "", link_.queue_name, {"type": kind, "app_id": "lock-1"},
                        notice_body("lock-1", session))
    assert heard.calls == [("routed", "lock-1", "s-1"), ("replaced", "lock-1", "s-0")]


def test_the_owners_notices_to_its_own_queue_are_taken_in_process_and_others_published() -> None:
    """A session of a device whose partition this worker owns is welcomed without a trip through RabbitMQ;
    the older session it replaces, held by another worker, hears so through that worker's queue."""
    link_, heard = consumer()
    wire = RecordingWire()
    claim = {"type": CLAIM_TYPE}
    link_.owner.delivered(0, 1, False, "warren.routes", "lock-1", claim,
                          claim_body("lock-1", "s-0", 1.0, "other.queue", True, 0))
    link_.owner.delivered(0, 2, False, "warren.routes", "lock-1", claim,
                          claim_body("lock-1", "s-1", 2.0, link_.queue_name, True, link_.epoch))
    link_.write(wire)
    assert wire.ops() == [(ROUTED_NOTICE, "other.queue"), (REPLACED_NOTICE, "other.queue")]
    assert [decode_notice(call[3]) for call in wire.calls if call[0] == "publish"] == [("lock-1", "s-0")] * 2
    assert heard.calls == [("routed", "lock-1", "s-1")]
    # And back: the other worker's newer session replaces ours, which hears so in-process.
    link_.owner.delivered(0, 3, False, "warren.routes", "lock-1", claim,
                          claim_body("lock-1", "s-2", 3.0, "other.queue", True, 0))
    link_.write(wire)
    assert wire.ops()[2:] == [(ROUTED_NOTICE, "other.queue")]
    assert heard.calls[1:] == [("replaced", "lock-1", "s-1")]


def test_a_notice_that_cannot_be_read_is_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    link_, heard = consumer()
    for body in [b"junk", b'{"device":"lock-1"}', b'{"device":1,"session":"s"}']:
        link_._dispatch(1, False, "", link_.queue_name, {"type": ROUTED_TYPE}, body)
    assert heard.calls == [] and caplog.text.count("ignoring a routing notice") == 3


def test_an_operators_question_goes_to_the_facade_with_whom_to_answer() -> None:
    link_, heard = consumer()
    asking = {"type": ASK_TYPE, "reply_to": "api.q", "correlation_id": "q-1",
              "application_headers": {DEVICE_HEADER: "lock-1", "x-warren-tag": 3}}
    link_._dispatch(1, False, "", link_.queue_name, asking, ask_body("info"))
    link_._dispatch(2, False, "", link_.queue_name, {**asking, "application_headers": {}}, ask_body("info"))
    link_._dispatch(3, False, "", link_.queue_name, asking, b"junk")
    assert heard.calls == [("asked", "lock-1", "info", "api.q", "q-1")]


def test_replies_to_our_api_come_on_the_default_exchange_untyped() -> None:
    link_, heard = consumer()
    link_._dispatch(1, False, "", link_.queue_name, {"correlation_id": "r-1"}, b'{"ok":true}')
    link_._dispatch(2, False, "devices.commands", "lock-1", {"correlation_id": "r-2"}, b'{"ok":true}')
    link_._dispatch(3, False, "", link_.queue_name, {"type": "something.else", "correlation_id": "r-3"}, b"{}")
    assert heard.calls == [("reply", "r-1", b'{"ok":true}')]


def forward_returned_from_a_gone_holder() -> tuple[Any, RecordingWire]:
    """A consumer's link whose owner forwarded command c-1 (delivery 9) of lock-1 to gone.queue, which
    RabbitMQ returned: the consumer's link carries its partition owner's frames (confirms and returns
    reach the owner, the owner's publishes and acks go out in the consumer's writer pass)."""
    link_, _ = consumer()
    wire = RecordingWire()
    link_.owner.directory.claim(3, "lock-1", "s-1", 1.0, "gone.queue", fresh=True, partition=0, now=0.0)
    command = {"message_id": "c-1", "reply_to": "api.q", "correlation_id": "k-1"}
    link_.owner.delivered(0, 9, False, "devices.commands", "lock-1", command, b'{"name":"unlock"}')
    link_.write(wire)
    [(what, holder, properties, _body)] = wire.calls
    assert (what, holder, properties["type"]) == ("forward", "gone.queue", FORWARD_TYPE)
    returned = method(spec.Basic.Return, "Bsss", (312, "NO_ROUTE", "", "gone.queue"))
    link_.contents[frames.BASIC_RETURN](returned, properties, b'{"name":"unlock"}')
    return link_, wire


def test_a_returned_forward_waits_for_its_holder_then_is_answered_offline_through_the_consumers_link() -> None:
    link_, wire = forward_returned_from_a_gone_holder()
    assert link_.owner.directory.holder_of("lock-1") is None
    link_.write(wire)
    assert wire.ops() == [] and ("ack", 3) in wire.calls and ("ack", 9) not in wire.calls  # parked, unacked
    link_.methods[frames.BASIC_ACK](ack(1, multiple=False))  # the forward's own confirm acks nothing
    link_.write(wire)
    assert ("ack", 9) not in wire.calls
    link_.owner.tick(time.monotonic() + HOLDER_GRACE + 0.1)  # nobody claimed lock-1 in time
    link_.write(wire)
    assert wire.ops() == [(REPLY, "api.q")]
    answer = next(call for call in wire.calls if call[0] == "publish")
    assert orjson.loads(answer[3]) == {"device": "lock-1", "id": "c-1", "ok": False, "data": None,
                                       "error": "offline"} and answer[4] == ("k-1",)
    # The command is acked right behind its `offline` answer, on the same channel, once.
    assert wire.calls.index(answer) < wire.calls.index(("ack", 9)) and wire.calls.count(("ack", 9)) == 1


def test_a_returned_forward_goes_to_the_holder_that_claims_its_device_again() -> None:
    link_, wire = forward_returned_from_a_gone_holder()
    link_.methods[frames.BASIC_ACK](ack(1, multiple=False))
    link_.owner.delivered(0, 11, False, "warren.routes", "lock-1", {"type": CLAIM_TYPE},
                          claim_body("lock-1", "s-1", 1.0, "new.queue", False, 0))
    calls = len(wire.calls)
    link_.write(wire)
    forwards = [call for call in wire.calls[calls:] if call[0] == "forward"]
    assert [(holder, properties["message_id"]) for _, holder, properties, _ in forwards] == [("new.queue", "c-1")]
    assert wire.ops() == [(ROUTED_NOTICE, "new.queue")] and ("ack", 9) not in wire.calls
    link_.methods[frames.BASIC_ACK](ack(3, multiple=True))  # the notice and the forward: the command is done
    link_.write(wire)
    assert wire.calls.count(("ack", 9)) == 1


def test_claiming_again_after_a_reconnect_lets_sessions_run_between_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    claimed: list[str] = []
    real_publish = MemoryWire.publish

    def publish(self: MemoryWire, kind: Any, routing_key: str, body: bytes, values: tuple, channel: int = 0) -> None:
        if kind is CLAIM:
            claimed.append(routing_key)
        else:
            real_publish(self, kind, routing_key, body, values, channel)

    monkeypatch.setattr(MemoryWire, "publish", publish)
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
    live = [(f"r-{uuid.uuid4().hex[:6]}-{n}", 1.0, f"s{n}") for n in range(3 * WRITE_BATCH)]
    link_, _ = consumer(Heard(live), url="memory://")
    seen: list[int] = []
    runner = gevent.spawn(link_.run)

    def watch() -> None:  # a busy session: ready to run whenever the hub lets it
        while True:
            if not seen or seen[-1] != len(claimed):
                seen.append(len(claimed))
            gevent.sleep(0)

    watcher = gevent.spawn(watch)
    try:
        wait_for(lambda: len(claimed) == len(live))
        drop.set()
        wait_for(lambda: len(claimed) == 2 * len(live))  # all claimed again after the reconnect
        assert claimed[len(live):] == [device for device, _, _ in live]
        assert any(len(live) < n < 2 * len(live) for n in seen)  # sessions ran midway through
    finally:
        gevent.killall([runner, watcher])


def test_a_device_held_by_its_partitions_owner_gets_its_commands_in_process() -> None:
    """No second trip through RabbitMQ when the owner holds the device itself: the command reaches the
    sessions side at once and is acked; an operator's question too; another holder's still travel."""
    link_, heard = consumer()
    wire = RecordingWire()
    now = time.monotonic()
    # lock-1 claimed before the last owner died (restored): a command redelivered with it still reaches it.
    link_.owner.directory.claim(3, "lock-1", "s-1", 1.0, link_.queue_name, fresh=False, partition=0, now=now,
                                redelivered=True)
    link_.owner.directory.claim(4, "lock-2", "s-2", 1.0, "other.q", fresh=True, partition=0, now=now)
    link_.owner.delivered(0, 9, True, "devices.commands", "lock-1", {"message_id": "c-1"}, b'{"name":"unlock"}')
    link_.owner.delivered(0, 10, False, "devices.commands", "lock-1",
                          {"type": "warren.ask", "reply_to": "api.q", "correlation_id": "k"}, b'{"kind":"info"}')
    link_.owner.delivered(0, 11, False, "devices.commands", "lock-2", {"message_id": "c-2"}, b'{"name":"lock"}')
    [(what, command, again)] = [call for call in heard.calls if call[0] == "deliver"]
    assert (what, command.device, command.id, command.name, again) == ("deliver", "lock-1", "c-1", "unlock", True)
    assert ("asked", "lock-1", "info", "api.q", "k") in heard.calls
    link_.write(wire)
    assert [call for call in wire.calls if call[0] == "ack"] == [("ack", 9), ("ack", 10)]
    assert [call[1] for call in wire.calls if call[0] == "forward"] == ["other.q"]


# -- the ban stream, and the consumer waiting for it --------------------------------------------------------
def stream_record(wire: RecordingWire, tag: int, ban: Ban) -> None:
    wire.on_stream(tag, False, "", "warren.bans", {"type": BAN_TYPE}, ban_body(ban))


def ban_stream() -> tuple[BanStream, list[Ban], RecordingWire]:
    stream, changed, wire = BanStream("amqp://nowhere", "warren.bans"), [], RecordingWire()
    stream.changed = changed.append
    stream.connected = True
    stream.setup(wire)
    return stream, changed, wire


def test_claims_wait_until_the_ban_stream_is_replayed_and_a_ban_read_reaches_the_sessions() -> None:
    stream, changed, wire = ban_stream()
    assert wire.calls[0] == ("follow", "warren.bans", "stream")
    heard = Heard()
    link_ = CommandConsumer("amqp://nowhere", max_command_bytes=100, refuse=heard.refuse,
                            reply_received=heard.reply_received, asked=heard.asked, bans=stream)
    link_.attach(heard)
    link_.connected = True
    link_.claim("a", 1.5, "s-a")
    link_.write(wire)
    assert wire.ops() == []  # nobody is welcomed before the bans are known
    stream.write(wire)
    assert [kind.properties.fixed["type"] for kind, _ in wire.ops()] == [MARK_TYPE]  # our marker, to the stream
    marker = wire.calls[-1][3]
    stream_record(wire, 1, Ban("lock-9", issued=5, until=None, reason="stolen"))
    assert changed == [Ban("lock-9", issued=5, until=None, reason="stolen")]
    assert stream.bans.banned("lock-9") is not None
    link_._wakeup.clear()
    wire.on_stream(2, False, "", "warren.bans", {"type": MARK_TYPE}, marker)
    assert stream.loaded and link_._wakeup.is_set()  # the consumer is woken to send what it held
    wire.calls.clear()
    wire.channels.clear()
    link_.write(wire)
    assert wire.ops() == [(CLAIM, "a")]
    stream.write(wire)
    assert ("ack-up-to", 2) in wire.calls  # the stream's records are acked (its credit), together
    assert wire.channels[wire.calls.index(("ack-up-to", 2))] == 9


def test_a_stream_that_cannot_be_read_is_waited_out_loudly_by_the_consumer(caplog: pytest.LogCaptureFixture) -> None:
    """The ban link may not connect at all (no stream to be had): the consumer's own tick gives up."""
    stream = BanStream("amqp://nowhere", "warren.bans")
    heard = Heard()
    link_ = CommandConsumer("amqp://nowhere", max_command_bytes=100, refuse=heard.refuse,
                            reply_received=heard.reply_received, asked=heard.asked, bans=stream)
    link_.tick(100.0)
    link_.tick(104.0)
    assert not stream.loaded
    link_.tick(105.1)
    assert stream.loaded
    assert "was not read within" in caplog.text


def test_an_older_copy_of_a_lifted_ban_changes_nothing() -> None:
    stream, changed, wire = ban_stream()
    stream_record(wire, 1, Ban("lock-9", issued=5, until=None))
    stream_record(wire, 2, Ban("lock-9", issued=9, lifted=True))
    stream_record(wire, 3, Ban("lock-9", issued=5, until=None))  # a copy, published before the lift was read
    assert stream.bans.banned("lock-9") is None
    assert [ban.lifted for ban in changed] == [False, True]


def test_bans_about_to_outlive_the_stream_are_published_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("app.sessions.bans.time.monotonic", lambda: 0.0)
    monkeypatch.setattr("app.broker.bans.time.monotonic", lambda: 0.0)
    stream, _, wire = ban_stream()
    stream_record(wire, 1, Ban("lock-1", issued=5, until=None))
    stream_record(wire, 2, Ban("lock-2", issued=5, until=6))  # ended long ago: not copied
    stream.write(wire)  # the marker
    wire.calls.clear()
    stream.tick(60.0)  # read just now: nothing due
    stream.write(wire)
    assert wire.ops() == []
    stream.tick(60.0 + 6 * 3600 + 3600 + 61)  # past COPY_AGE and any worker's jitter
    stream.write(wire)
    assert [(kind.properties.fixed["type"], decode_ban(call[3]).device) for call in wire.calls
            if call[0] == "publish" for kind in [call[1]]] == [(BAN_TYPE, "lock-1")]


def test_a_claim_copy_a_dead_owner_took_is_the_claim_of_its_session_for_the_next_owner() -> None:
    """Past CLAIM_REFRESH an owner publishes a claim again and acks the original once the copy is confirmed:
    from then on the copy is the only record of the session in the partition. Redelivered to the next
    owner, it restores the entry (a copy that is not redelivered and names no entry is a session that
    ended meanwhile: acked, as before)."""
    link_, wire = consumer()[0], RecordingWire()
    copy = claim_body("lock-1", "s-1", 1.0, "holder.q", False, 2)
    link_.owner.delivered(4, 8, True, "", "warren.routes.4", {"type": CLAIM_TYPE}, copy)
    entry = link_.owner.directory.entries["lock-1"]
    assert (entry.session, entry.holder, entry.epoch, entry.tag, entry.restored) == ("s-1", "holder.q", 2,
                                                                                      receipt(4, 8), True)
    link_.owner.delivered(4, 9, False, "", "warren.routes.4", {"type": CLAIM_TYPE},
                          claim_body("lock-2", "s-2", 1.0, "holder.q", False, 2))
    link_.write(wire)
    assert "lock-2" not in link_.owner.directory.entries and ("ack", 9) in wire.calls and ("ack", 8) not in wire.calls


def test_each_partition_is_acked_on_its_own_channel() -> None:
    """RabbitMQ walks a channel's older unacked deliveries on each ack: a command's ack on a channel holding
    every claim of the owner's partitions would walk them all. Each partition has a channel of its own, and
    what the owner holds names its partition and that channel's delivery tag."""
    link_, wire = consumer()[0], RecordingWire()
    owner = link_.owner
    owner._acking = [100 + partition for partition in range(16)]  # as `setup` opens them
    now = time.monotonic()
    owner.delivered(3, 5, False, "warren.routes", "lock-1",
                    {"type": CLAIM_TYPE}, claim_body("lock-1", "s-1", 1.0, "other.q", True, 1))
    owner.delivered(3, 6, False, "devices.commands", "lock-1", {"message_id": "c-1"}, b'{"name":"unlock"}')
    owner.delivered(0, 6, False, "devices.commands", "lock-0", {"message_id": "c-0"}, b'{"name":"unlock"}')
    link_.write(wire)
    [(forward, forward_channel)] = [(c, ch) for c, ch in zip(wire.calls, wire.channels) if c[0] == "forward"]
    assert forward_channel == owner._channel_id  # forwards and notices: on the confirmed channel
    assert forward[2]["application_headers"][TAG_HEADER] == receipt(3, 6) != 6
    link_.methods[frames.BASIC_ACK](ack(2))  # the forward (after the `routed` notice) is confirmed
    link_.write(wire)
    acks = [(c[1], ch) for c, ch in zip(wire.calls, wire.channels) if c[0] in ("ack", "reject")]
    assert acks == [(6, 100), (6, 103)]  # lock-0 answered offline at once; the command on partition 3's channel
    assert owner.directory.entries["lock-1"].tag == receipt(3, 5)  # the claim, held unacked
    assert split_receipt(receipt(15, 2**40)) == (15, 2**40) and receipt(0, 7) == 7
    assert now <= owner.directory.entries["lock-1"].since


def test_an_owner_nacked_without_pause_replaces_its_channel_even_with_acks_between() -> None:
    """After a node's loss the partitions whose leader it had nack for good while the others ack: nacks
    that keep coming (no pause of ROUTING_NACK_STREAK) for ROUTING_NACKS_DESPITE_ACKS drop the channel."""
    owner = consumer()[0].owner
    clock = 100.0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(link, "time", types.SimpleNamespace(monotonic=lambda: clock))
        for step in range(int(ROUTING_NACKS_DESPITE_ACKS / 0.25)):  # a nack and an ack every 0.25 s
            owner.confirmed(nack(2 * step + 1))
            owner.confirmed(ack(2 * step + 2))
            owner.tick(clock)
            clock += 0.25
        with pytest.raises(ConnectionError, match="nacked without pause for 2s"):
            owner.tick(clock)


def test_nacks_with_pauses_between_them_keep_the_owners_channel() -> None:
    """A nack in passing now and then (a partition electing its leader) is no stuck channel."""
    owner = consumer()[0].owner
    clock = 100.0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(link, "time", types.SimpleNamespace(monotonic=lambda: clock))
        for step in range(8):
            owner.confirmed(nack(2 * step + 1))
            owner.confirmed(ack(2 * step + 2))
            clock += ROUTING_NACK_STREAK + 0.1
            owner.tick(clock)


def test_the_publisher_keeps_its_channel_while_some_events_are_acked(publisher: Publisher,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend's queue at its length limit (`reject-publish`) nacks for as long as it is full: the
    publisher's channel is dropped only when nothing is acked, since a fresh one would not help."""
    clock = [100.0]
    monkeypatch.setattr(link, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    for step in range(20):
        publish_events(publisher, 2)
        publisher.methods[frames.BASIC_NACK](nack(2 * step + 1))
        publisher.methods[frames.BASIC_ACK](ack(2 * step + 2))
        clock[0] += 0.5
        publisher.tick(clock[0])


def test_an_owner_whose_publishes_are_only_nacked_replaces_its_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Claims and releases to a partition whose leader moved with a lost node: RabbitMQ 3.10 nacks that
    channel for good. After ROUTING_NACK_STREAK seconds of nothing but nacks the link reconnects (and
    every claim is made again), at the next nack or tick; an ack in between ends the streak."""
    clock = [100.0]
    monkeypatch.setattr(link, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    owner = consumer()[0].owner
    owner.confirmed(nack(1))
    clock[0] += ROUTING_NACK_STREAK - 0.1
    owner.confirmed(ack(2))
    clock[0] += 0.5
    owner.confirmed(nack(3))  # acked meanwhile: a new streak
    owner.tick(clock[0] + ROUTING_NACK_STREAK - 0.1)
    clock[0] += ROUTING_NACK_STREAK + 0.1
    with pytest.raises(ConnectionError, match="nacked for"):
        owner.confirmed(nack(4))
    with pytest.raises(ConnectionError, match="nacked for"):
        owner.tick(clock[0])
