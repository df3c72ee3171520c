"""Claims and releases of one partition as one message (consumer.py, partitions.py, receipts.py), and the
check that lets a holder hash devices to partitions itself (ring.py's `RingCheck`).

The owner weighs each update of a message as the message of its own it stands for, and acks the
delivery at RabbitMQ once every one of them is done: checked here case by case, and with hypothesis
over random interleavings against the one rule that matters to RabbitMQ (a delivery acked exactly
once, and only when none of its claims is still a live entry).
"""

from __future__ import annotations

import itertools
import logging
import time

import orjson
import pytest
from amqp import spec
from hypothesis import given, settings
from hypothesis import strategies as st

from app.broker import frames
from app.broker.consumer import CommandConsumer
from app.broker.directory import ACK, Directory
from app.broker.messages import (
    CLAIM_COPIES,
    CLAIMED,
    COPIES_TYPE,
    PING,
    RELEASED,
    REPLACED_NOTICE,
    RING_ANSWER,
    RING_PROBE,
    ROUTED_MANY,
    ROUTED_MANY_TYPE,
    UPDATES,
    UPDATES_TYPE,
    copies_body,
    decode_copies,
    decode_ring,
    decode_routed_many,
    decode_updates,
    notice_body,
    partition_queue,
    ring_answer_body,
    routed_many_body,
    updates_body,
)
from app.broker.partitions import CLAIM_REFRESH, COMPACT_AFTER
from app.broker.receipts import Shares, receipt
from app.broker.ring import PROBES_PER_PARTITION, RingCheck, partition_of
from tests.unit.test_broker_links import RecordingWire, ack, consumer, nack


def ring_held(link_: CommandConsumer) -> None:
    """Answer the ring check as owners would when warren.routes hashes as ring.py does."""
    for _key, expect in link_.ring.probes(16, 20):
        link_.ring.answered(expect, expect)
    assert link_.ring.holds


def sent_updates(wire: RecordingWire) -> list[tuple[str, list[tuple]]]:
    return [(call[2], decode_updates(call[3])[2]) for call in wire.calls
            if call[0] == "publish" and call[1] is UPDATES]


def test_once_the_ring_holds_a_partitions_updates_go_to_its_queue_as_one_message_in_order() -> None:
    link_, wire = consumer()[0], RecordingWire()
    ring_held(link_)
    devices = [f"lock-{n}" for n in range(40)]
    for device in devices:
        link_.claim(device, 1.5, f"s-{device}")
    link_.release("lock-0", "s-old", will_until=9.0)
    assert link_.write(wire) is False
    sent = sent_updates(wire)
    # one message per partition, and one more: lock-0's release follows its claim, so it starts the next
    assert len(sent) == len({partition_of(device, 16, 20) for device in devices}) + 1 < len(devices)
    for queue, updates in sent:
        assert all(partition_queue(partition_of(update[1], 16, 20)) == queue for update in updates)
    every = [update for _queue, updates in sent for update in updates]
    assert sorted(every) == sorted([(CLAIMED, device, f"s-{device}", 1.5, True) for device in devices]
                                   + [(RELEASED, "lock-0", "s-old", 9.0, False)])
    lock_0 = [[update[0] for update in u if update[1] == "lock-0"] for _q, u in sent if any(x[1] == "lock-0" for x in u)]
    assert lock_0 == [[CLAIMED], [RELEASED]]  # its release in the partition's next message, after its claim
    message = orjson.loads(wire.calls[0][3])
    assert (message["holder"], message["epoch"]) == (link_.queue_name, link_.epoch)
    assert set(wire.channels) == {link_.owner._channel_id}  # confirmed, as claims one by one are


def test_a_device_twice_in_one_pass_starts_its_partitions_next_message() -> None:
    link_, wire = consumer()[0], RecordingWire()
    ring_held(link_)
    link_.claim("lock-1", 1.0, "s-1")
    link_.release("lock-1", "s-1")
    link_.claim("lock-1", 2.0, "s-2")
    link_.write(wire)
    queue = partition_queue(partition_of("lock-1", 16, 20))
    assert sent_updates(wire) == [(queue, [(CLAIMED, "lock-1", "s-1", 1.0, True)]),
                                  (queue, [(RELEASED, "lock-1", "s-1", 0.0, False)]),
                                  (queue, [(CLAIMED, "lock-1", "s-2", 2.0, True)])]


def test_updates_rabbitmq_refuses_are_made_again_claims_as_restatements() -> None:
    link_, wire = consumer()[0], RecordingWire()
    ring_held(link_)
    link_.claim("lock-1", 1.0, "s-1")
    link_.release("lock-2", "s-2") if partition_of("lock-2", 16, 20) == partition_of("lock-1", 16, 20) else None
    link_.write(wire)
    [(queue, updates)] = sent_updates(wire)
    link_.methods[frames.BASIC_NACK](ack(1, sig=spec.Basic.Nack))
    link_.tick(time.monotonic())
    link_.write(wire)
    [_, (queue_again, again)] = sent_updates(wire)
    assert queue_again == queue
    assert again == [(kind, device, session, when, False if kind == CLAIMED else fresh)
                     for kind, device, session, when, fresh in updates]


def test_until_the_ring_is_checked_claims_go_one_by_one_through_the_exchange() -> None:
    link_, wire = consumer()[0], RecordingWire()
    link_.ring.probes(16, 20)  # asked, not answered yet (an owner of an older Warren drops what it cannot read)
    link_.claim("lock-1", 1.0, "s-1")
    link_.write(wire)
    assert sent_updates(wire) == [] and [call[2] for call in wire.calls] == ["lock-1"]


def test_the_ring_check_holds_once_every_place_answered_and_learns_the_binding_order() -> None:
    check = RingCheck()
    check.answered(3, 3)  # an answer to nothing asked: no proof of anything
    probes = check.probes(16, 20)
    assert sorted(place for _key, place in probes) == sorted(list(range(16)) * PROBES_PER_PARTITION)
    assert all(partition_of(key, 16, 20) == place and "." in key for key, place in probes)
    for _key, place in probes[:-1]:
        check.answered(place, place)
        assert not check.holds
    check.answered(probes[-1][1], probes[-1][1])
    assert check.holds and check.order == list(range(16))
    # A RabbitMQ restart rebuilds the ring from its bindings sorted by queue name: .0, .1, .10, ..., .15, .2, ...
    by_name = sorted(range(16), key=lambda partition: f"warren.routes.{partition}")
    probes = check.probes(16, 20)  # the next connect asks again
    assert not check.holds and check.order is None
    for _key, place in probes:
        check.answered(place, by_name[place])
    assert check.holds and check.order == by_name
    device = "lock-7"
    assert partition_of(device, 16, 20, check.order) == by_name[partition_of(device, 16, 20)]


@pytest.mark.parametrize("landing", ["twins_apart", "a_partition_twice"])
def test_a_ring_that_is_not_ring_py_s_does_not_hold(landing: str, caplog: pytest.LogCaptureFixture) -> None:
    check = RingCheck()
    probes = check.probes(16, 20)
    seen: set[int] = set()
    with caplog.at_level(logging.ERROR):
        for _key, place in probes:
            if landing == "twins_apart":  # a place's two keys in two partitions: not one run of buckets each
                landed = place if place not in seen else (place + 1) % 16
                seen.add(place)
            else:  # partitions 0 and 1 swallow each other's place: weights that differ
                landed = 0 if place == 1 else place
            check.answered(place, landed)
    assert not check.holds and check.order is None and "does not hash" in caplog.text
    probes = check.probes(16, 20)  # asked again at the next connect, and this time it holds
    for _key, place in probes:
        check.answered(place, place)
    assert check.holds


def test_after_a_connect_claims_go_one_by_one_until_the_ring_is_checked_again() -> None:
    link_, wire = consumer()[0], RecordingWire()
    ring_held(link_)
    link_._probes = link_.ring.probes(16, 20)  # as `setup` at a reconnect leaves them
    link_.claim("lock-1", 1.0, "s-1")
    link_.write(wire)
    assert sent_updates(wire) == [] and [c[2] for c in wire.calls if c[1] is not RING_PROBE] == ["lock-1"]


def test_probes_go_through_the_hash_exchange_and_their_owner_says_where_they_landed() -> None:
    link_, wire = consumer()[0], RecordingWire()
    link_._probes = link_.ring.probes(16, 20)[:1]  # as `setup` leaves them (one of them, here)
    [(probe_key, expect)] = link_._probes
    link_.write(wire)
    [(kind, key, body)] = [(c[1], c[2], c[3]) for c in wire.calls if c[0] == "publish"]
    assert (kind, key, decode_ring(body, "holder", "expect")) == (RING_PROBE, probe_key, (link_.queue_name, expect))
    elsewhere = (expect + 1) % 16
    owner_link, owner_wire = consumer()[0], RecordingWire()
    owner_link.owner.delivered(elsewhere, 3, False, "warren.routes", key, {"type": "warren.ring"}, body)
    owner_link.write(owner_wire)
    [answer] = [c for c in owner_wire.calls if c[0] == "publish"]
    assert (answer[1], answer[2], decode_ring(answer[3], "expect", "landed")) == (
        RING_ANSWER, link_.queue_name, (expect, elsewhere))
    assert ("ack", 3) in owner_wire.calls
    link_._dispatch(1, False, "", link_.queue_name, {"type": "warren.ring"}, answer[3])
    assert link_.ring._landed == {expect: [elsewhere]}  # heard: one place of 16, not enough to hold yet


def deliver_updates(link_: CommandConsumer, tag: int, updates: list[tuple], redelivered: bool = False) -> None:
    link_.owner.delivered(2, tag, redelivered, "", partition_queue(2), {"type": UPDATES_TYPE},
                          updates_body("holder.q", 1, updates))


def acks(wire: RecordingWire) -> list[int]:
    return [call[1] for call in wire.calls if call[0] == "ack"]


def test_the_owner_acks_a_message_of_claims_once_its_last_session_ended() -> None:
    link_, wire = consumer()[0], RecordingWire()
    deliver_updates(link_, 5, [(CLAIMED, d, f"s-{d}", 1.0, True) for d in ("a", "b", "c")])
    link_.write(wire)
    assert acks(wire) == [] and {d: e.tag for d, e in link_.owner.directory.entries.items()} == {
        "a": receipt(2, 5), "b": receipt(2, 5), "c": receipt(2, 5)}
    deliver_updates(link_, 6, [(RELEASED, "a", "s-a", 0.0, False), (RELEASED, "b", "s-b", 0.0, False)])
    link_.write(wire)
    assert acks(wire) == [6]  # the releases are done with; "c" still holds the claims' message
    deliver_updates(link_, 7, [(CLAIMED, "c", "s-c2", 2.0, True)])  # a new session of "c" replaces it
    link_.write(wire)
    assert acks(wire) == [6, 5] and link_.owner.directory.entries["c"].tag == receipt(2, 7)


def test_the_owner_tells_a_holder_that_sent_updates_routed_for_all_of_them_in_one_message() -> None:
    """A holder that sends updates reads `routed` for many sessions; the older holder a claim replaced
    hears `replaced` on its own, as any holder would."""
    owner_link, wire = consumer()[0], RecordingWire()
    owner_link.owner.directory.claim(1, "c", "s-old", 0.5, "older.q", fresh=True, partition=2, now=time.monotonic())
    deliver_updates(owner_link, 5, [(CLAIMED, d, f"s-{d}", 1.0, True) for d in ("a", "b", "c")])
    owner_link.write(wire)
    published = [(c[1], c[2], c[3]) for c in wire.calls if c[0] == "publish"]
    assert published == [(REPLACED_NOTICE, "older.q", notice_body("c", "s-old")),
                         (ROUTED_MANY, "holder.q", routed_many_body([("a", "s-a"), ("b", "s-b"), ("c", "s-c")]))]
    holder, heard = consumer()
    holder._dispatch(1, False, "", holder.queue_name, {"type": ROUTED_MANY_TYPE}, published[1][2])
    assert heard.calls == [("routed", "a", "s-a"), ("routed", "b", "s-b"), ("routed", "c", "s-c")]


@pytest.mark.parametrize("body", [b"nope", b'{"a": 1}', b'[["a"]]', b'[["a", 1]]', b'[["a", "s", "x"]]'])
def test_routed_notices_that_cannot_be_read_are_logged_and_ignored(body: bytes,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    holder, heard = consumer()
    with caplog.at_level(logging.WARNING):
        holder._dispatch(1, False, "", holder.queue_name, {"type": ROUTED_MANY_TYPE}, body)
    assert heard.calls == [] and "routing notices" in caplog.text


def test_a_redelivered_message_of_claims_restates_every_session() -> None:
    link_, wire = consumer()[0], RecordingWire()
    deliver_updates(link_, 9, [(CLAIMED, d, f"s-{d}", 1.0, True) for d in ("a", "b")], redelivered=True)
    link_.write(wire)
    assert all(entry.restored for entry in link_.owner.directory.entries.values())
    assert len(link_.owner.directory) == 2 and acks(wire) == []


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'{"holder": "q", "epoch": 1, "updates": []}',
    b'{"holder": "q", "epoch": 1, "updates": [["x", "d", "s", 1.0, true]]}',
    b'{"holder": "q", "epoch": 1, "updates": [["c", "d", "s", "1.0", true]]}',
    b'{"holder": "q", "epoch": 1, "updates": [["c", "d", "s", 1.0]]}',
    b'{"holder": "q", "epoch": true, "updates": [["c", "d", "s", 1.0, true]]}',
    b'{"holder": "q", "epoch": 1, "updates": [["c", "d", "s", 1.0, true], ["r", "d", "s", 0, false]]}',
])
def test_updates_that_are_not_ours_to_read_are_acked_and_change_nothing(body: bytes) -> None:
    assert decode_updates(body) is None
    link_, wire = consumer()[0], RecordingWire()
    link_.owner.delivered(2, 4, False, "", partition_queue(2), {"type": UPDATES_TYPE}, body)
    link_.write(wire)
    assert acks(wire) == [4] and len(link_.owner.directory) == 0


def test_a_ring_answer_that_cannot_be_read_changes_nothing() -> None:
    link_ = consumer()[0]
    link_.ring.probes(16, 20)
    link_._dispatch(1, False, "", link_.queue_name, {"type": "warren.ring"}, ring_answer_body(1, 1)[:-3])
    assert not link_.ring.holds and link_.ring._landed == {}


def test_claims_are_copied_one_message_a_partition_soon_and_again_after_the_refresh_age(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Claims held by their own deliveries are copied together after COMPACT_AFTER (so that the partition's
    channel holds one delivery, not one a claim: claim_ages.py); the copy is copied again after
    CLAIM_REFRESH, with a ping to the holder. Each message of claims or copies is acked once it is done."""
    link_, wire = consumer()[0], RecordingWire()
    deliver_updates(link_, 5, [(CLAIMED, d, f"s-{d}", 1.0, True) for d in ("a", "b", "c")])
    link_.write(wire)
    clock = [time.monotonic() + COMPACT_AFTER + 0.5]
    monkeypatch.setattr("app.broker.partitions.time.monotonic", lambda: clock[0])
    link_.tick(clock[0])
    link_.write(wire)
    [copies] = [call for call in wire.calls if call[0] == "publish" and call[1] is CLAIM_COPIES]
    assert copies[2] == partition_queue(2)
    assert decode_copies(copies[3]) == [(d, f"s-{d}", 1.0, "holder.q", 1) for d in ("a", "b", "c")]
    assert [c for c in wire.calls if c[0] == "publish" and c[1] is PING] == []  # compaction pings nobody
    link_.methods[frames.BASIC_ACK](ack(5, multiple=True))  # the `routed` notices and the copies: confirmed
    link_.write(wire)
    assert acks(wire) == [5]  # the claims' message: acked once, for its three claims
    link_.owner.delivered(2, 8, False, "", partition_queue(2), {"type": COPIES_TYPE}, copies[3])
    assert {e.tag for e in link_.owner.directory.entries.values()} == {receipt(2, 8)}  # the copies hold them now
    link_.tick(clock[0] + 10)
    link_.write(wire)
    assert len([c for c in wire.calls if c[0] == "publish" and c[1] is CLAIM_COPIES]) == 1  # not copied again yet
    clock[0] += CLAIM_REFRESH + 1
    link_.tick(clock[0])
    link_.write(wire)
    again = [call for call in wire.calls if call[0] == "publish" and call[1] is CLAIM_COPIES][1]
    assert decode_copies(again[3]) == decode_copies(copies[3])
    assert [c[2] for c in wire.calls if c[0] == "publish" and c[1] is PING] == ["holder.q"]
    link_.methods[frames.BASIC_ACK](ack(7, multiple=True))
    link_.write(wire)
    assert acks(wire) == [5, 8]
    link_.owner.delivered(2, 9, False, "", partition_queue(2), {"type": COPIES_TYPE}, again[3])
    deliver_updates(link_, 10, [(RELEASED, d, f"s-{d}", 0.0, False) for d in ("a", "b", "c")])
    link_.write(wire)
    assert acks(wire) == [5, 8, 9, 10]


def test_copies_refused_by_rabbitmq_are_made_again_at_the_next_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy nacked (its partition between leaders) would leave its claims held by their first delivery
    for good, past RabbitMQ's consumer timeout: they are copied again."""
    link_, wire = consumer()[0], RecordingWire()
    deliver_updates(link_, 5, [(CLAIMED, "a", "s-a", 1.0, True)])
    link_.write(wire)
    clock = time.monotonic() + COMPACT_AFTER + 0.5
    monkeypatch.setattr("app.broker.partitions.time.monotonic", lambda: clock)
    link_.tick(clock)
    link_.write(wire)
    link_.methods[frames.BASIC_NACK](nack(2))  # the copies
    link_.methods[frames.BASIC_ACK](ack(1))  # the `routed` notice (an ack: no streak of nacks)
    link_.tick(clock + 1)
    link_.write(wire)
    copies = [call for call in wire.calls if call[0] == "publish" and call[1] is CLAIM_COPIES]
    assert len(copies) == 2 and decode_copies(copies[1][3]) == decode_copies(copies[0][3])
    link_.methods[frames.BASIC_ACK](ack(3))
    link_.write(wire)
    assert acks(wire) == [5]


def test_copies_a_dead_owner_took_restore_their_sessions_for_the_next_owner() -> None:
    link_, wire = consumer()[0], RecordingWire()
    body = copies_body([("a", "s-a", 1.0, "holder.q", 3), ("b", "s-b", 2.0, "other.q", 1)])
    link_.owner.delivered(2, 4, True, "", partition_queue(2), {"type": COPIES_TYPE}, body)
    link_.write(wire)
    entries = link_.owner.directory.entries
    assert {d: (e.session, e.holder, e.epoch, e.restored) for d, e in entries.items()} == {
        "a": ("s-a", "holder.q", 3, True), "b": ("s-b", "other.q", 1, True)}
    assert acks(wire) == []


@pytest.mark.parametrize("body", [
    b"{}", b'{"claims": []}', b'{"claims": [["a", "s", 1.0, "q"]]}', b'{"claims": [["a", "s", 1.0, "q", "1"]]}',
    b'{"claims": [["a", "s", 1.0, "q", 1], ["a", "s2", 1.0, "q", 1]]}', b'{"claims": "a"}', b"\xff"])
def test_copies_that_are_not_ours_to_read_are_acked_and_change_nothing(body: bytes) -> None:
    assert decode_copies(body) is None
    link_, wire = consumer()[0], RecordingWire()
    link_.owner.delivered(2, 4, True, "", partition_queue(2), {"type": COPIES_TYPE}, body)
    link_.write(wire)
    assert acks(wire) == [4] and len(link_.owner.directory) == 0


def test_shares_count_down_and_forget_what_a_lost_connection_took() -> None:
    shares = Shares()
    shares.expect(1, 3)
    shares.expect(2, 1)  # one update: acked at its first
    assert [shares.done(1), shares.done(1), shares.done(2), shares.done(1)] == [False, False, True, True]
    shares.expect(3, 2)
    shares.clear()
    assert shares.done(3) and len(shares) == 0


UPDATE = st.tuples(st.sampled_from((CLAIMED, RELEASED)), st.sampled_from(("a", "b", "c", "d")),
                   st.sampled_from(("s1", "s2", "s3")), st.booleans())
STEP = st.one_of(st.lists(UPDATE, min_size=1, max_size=4, unique_by=lambda u: u[1]).map(lambda u: ("updates", u)),
                 st.sampled_from(("H1", "H2")).map(lambda h: ("gone", h)),
                 st.sampled_from(("copy", "copy delivered", "copy confirmed", "copy refused")).map(lambda k: (k,)))


@settings(max_examples=500, deadline=None)
@given(st.lists(STEP, max_size=40))
def test_every_delivery_is_acked_exactly_once_and_only_when_none_of_its_entries_stands(steps: list[tuple]) -> None:
    """Owner-side, directory and shares together, as partitions.py wires them: claims and releases in
    messages of several, holders found gone, claims and copies published again (`due_compaction`,
    `due_refresh`), each copy delivered back, confirmed or refused in any order, and any of the rest
    between (a session released, replaced or its holder gone while its copy is on its way)."""
    directory, shares, tags, clock = Directory(), Shares(), itertools.count(1), itertools.count(1)
    delivered: set[int] = set()
    acked: list[int] = []
    in_flight: list[tuple[list, bool, bool]] = []  # a copy published: (its REFRESH actions, delivered, confirmed)

    def carry_out(actions: list[tuple]) -> None:
        for action in actions:
            if action[0] is ACK and shares.done(action[1]):
                assert action[1] in delivered and action[1] not in acked, "acked twice, or never delivered"
                # Held, unless its copy, confirmed, is on its way back (the copy is the entry's record now).
                assert all(entry.tag != action[1] or entry.copying == action[1]
                           for entry in directory.entries.values()), "acked while held"
                acked.append(action[1])

    def deliver_copy(due: list, now: float) -> None:
        copy = next(tags)
        delivered.add(copy)
        shares.expect(copy, len(due))
        copies = [(device, e.session, e.started, e.holder, e.epoch) for _, _, _, device, e in due]
        carry_out(directory.copied(copy, copies, partition=0, now=now))

    for step in steps:
        now = float(next(clock))
        if step[0] == "updates":
            tag = next(tags)
            delivered.add(tag)
            holder = "H1" if tag % 2 else "H2"
            shares.expect(tag, len(step[1]))
            updates = [(kind, device, session, now, fresh) for kind, device, session, fresh in step[1]]
            carry_out(directory.updated(tag, holder, 1, updates, partition=0, now=now))
        elif step[0] == "gone":
            carry_out(directory.holder_gone(step[1], now))
        elif step[0] == "copy":  # as partitions.py's `tick`: every claim due, in one message of copies
            due = directory.due_compaction(now + 1, 100) + directory.due_refresh(now + 1, 100)
            if due:
                in_flight.append((due, False, False))
        elif in_flight:
            due, was_delivered, was_confirmed = in_flight.pop(0)
            if step[0] == "copy delivered" and not was_delivered:
                deliver_copy(due, now)
                was_delivered = True
            elif step[0] == "copy confirmed" and not was_confirmed:  # the claims it copies are done with
                carry_out([(ACK, tag) for _, tag, _, _, _ in due])
                was_confirmed = True
            elif step[0] == "copy refused" and not was_delivered and not was_confirmed:
                carry_out(directory.copy_again([(device, tag) for _, tag, _, device, _ in due]))
                continue
            if not (was_delivered and was_confirmed):
                in_flight.append((due, was_delivered, was_confirmed))
    for due, was_delivered, was_confirmed in in_flight:  # every copy on its way arrives and is confirmed
        if not was_delivered:
            deliver_copy(due, float(next(clock)))
        if not was_confirmed:
            carry_out([(ACK, tag) for _, tag, _, _, _ in due])
    for device, entry in list(directory.entries.items()):  # every session ends: then all is acked
        release = next(tags)
        delivered.add(release)
        carry_out(directory.release(release, device, entry.session))
    assert sorted(acked) == sorted(delivered) and len(shares) == 0


JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(
                        st.sampled_from(("holder", "epoch", "updates", "claims", "expect", "landed", "x")), inner,
                        max_size=4), max_leaves=30)


@settings(max_examples=500, deadline=None)
@given(st.one_of(JSON.map(orjson.dumps), st.binary(max_size=64)))
def test_the_routing_parsers_take_any_bytes_and_return_what_they_say_or_none(body: bytes) -> None:
    """Fuzzed: whatever reaches a partition or a holder's queue, each parser answers None or well-typed values."""
    updates = decode_updates(body)
    if updates is not None:
        holder, epoch, items = updates
        assert type(holder) is str and type(epoch) is int and items
        assert all(kind in (CLAIMED, RELEASED) and type(device) is str and type(session) is str
                   and type(when) is float and type(fresh) is bool for kind, device, session, when, fresh in items)
        assert len({item[1] for item in items}) == len(items)
    copies = decode_copies(body)
    if copies is not None:
        assert copies and all(type(d) is str and type(s) is str and type(t) is float and type(h) is str
                              and type(e) is int for d, s, t, h, e in copies)
    for fields in (("holder", "expect"), ("expect", "landed")):
        ring = decode_ring(body, *fields)
        assert ring is None or (type(ring[0]) in (str, int) and type(ring[1]) is int)
    routed = decode_routed_many(body)
    assert routed is None or all(type(d) is str and type(s) is str for d, s in routed)
