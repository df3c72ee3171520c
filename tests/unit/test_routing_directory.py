"""The partition owner's rules (app/broker/directory.py), one message at a time."""

from __future__ import annotations

from app.broker.directory import (
    ACK,
    FLAPPING,
    FORWARD,
    GONE_MEMORY,
    HOLDER_GRACE,
    OFFLINE,
    PARK,
    REFRESH,
    REPLACED,
    ROUTED,
    UNPARKED,
    Directory,
    Starts,
)


def claim(directory: Directory, tag: int, device: str, session: str, holder: str, *, started: float = 0.0,
          fresh: bool = True, now: float = 0.0, epoch: int = 1, redelivered: bool = False) -> list[tuple]:
    return directory.claim(tag, device, session, started, holder, fresh=fresh, partition=3, now=now, epoch=epoch,
                           redelivered=redelivered)


def test_a_first_claim_is_routed_and_kept_unacked() -> None:
    directory = Directory()
    assert claim(directory, 1, "lock-1", "s1", "q-a") == [(ROUTED, "q-a", "lock-1", "s1")]
    assert directory.holder_of("lock-1") == "q-a" and len(directory) == 1
    assert directory.command(2, "lock-1") == (FORWARD, 2, "q-a")


def test_a_command_for_a_device_nobody_claimed_is_answered_offline() -> None:
    assert Directory().command(7, "lock-9") == (OFFLINE, 7)


def test_a_redelivered_command_for_a_device_nobody_claims_is_dropped_not_answered_again() -> None:
    """The owner before may have passed it on, or answered it: a second answer is worse than none."""
    directory = Directory()
    assert directory.command(7, "lock-9", redelivered=True) == (ACK, 7)
    directory.claim(8, "lock-9", "s1", 0.0, "q-a", fresh=False, partition=3, now=0.0, redelivered=True)
    assert directory.command(9, "lock-9", redelivered=True) == (FORWARD, 9, "q-a")  # its holder drops a copy


def test_a_redelivered_command_overtaken_by_a_newer_claim_is_dropped_not_delivered_twice() -> None:
    """The owner before passed the command on to s1 on A, and died before its ack; B's claim of s3,
    never read by that owner, reaches us before the redelivery. Forwarding the command to B would
    deliver it to the device a second time (A's copy cannot be seen from B): it is dropped, and expires
    unanswered (section 2.4: at most one; published before s3's welcome, it may have reached s1)."""
    directory = Directory()
    claim(directory, 1, "lock-1", "s3", "q-b", started=200.0)
    assert directory.claim(2, "lock-1", "s1", 100.0, "q-a", fresh=False, partition=3, now=0.0,
                           redelivered=True) == [(ACK, 2), (REPLACED, "q-a", "lock-1", "s1")]
    assert directory.command(3, "lock-1", redelivered=True) == (ACK, 3)
    assert directory.command(4, "lock-1") == (FORWARD, 4, "q-b")  # what follows goes to s3
    # A holder that reconnects re-states a restored session: redelivered commands still reach it.
    claim(directory, 5, "lock-2", "s5", "q-a", fresh=False, redelivered=True)
    claim(directory, 6, "lock-2", "s5", "q-a2", fresh=False, epoch=2)
    assert directory.command(7, "lock-2", redelivered=True) == (FORWARD, 7, "q-a2")


def test_a_fresh_claim_replaces_the_older_session_whatever_its_hello_time() -> None:
    directory = Directory()
    claim(directory, 1, "lock-1", "s1", "q-a", started=200.0)
    # The later claim at the owner is the later hello, even if its host's clock is behind.
    actions = claim(directory, 2, "lock-1", "s2", "q-b", started=100.0)
    assert actions == [(ACK, 1), (REPLACED, "q-a", "lock-1", "s1"), (ROUTED, "q-b", "lock-1", "s2")]
    assert directory.command(3, "lock-1") == (FORWARD, 3, "q-b")


def test_a_restated_older_session_loses_to_the_one_started_meanwhile() -> None:
    directory = Directory()
    claim(directory, 1, "lock-1", "s2", "q-b", started=200.0)
    actions = claim(directory, 2, "lock-1", "s1", "q-a2", started=100.0, fresh=False)
    assert actions == [(ACK, 2), (REPLACED, "q-a2", "lock-1", "s1")]
    assert directory.holder_of("lock-1") == "q-b"


def test_a_restated_newer_session_wins() -> None:
    directory = Directory()
    claim(directory, 1, "lock-1", "s1", "q-a", started=100.0)
    actions = claim(directory, 2, "lock-1", "s2", "q-b2", started=200.0, fresh=False)
    assert actions == [(ACK, 1), (REPLACED, "q-a", "lock-1", "s1"), (ROUTED, "q-b2", "lock-1", "s2")]


def test_a_holder_restating_its_own_session_moves_it_to_its_new_queue() -> None:
    directory = Directory()
    claim(directory, 1, "lock-1", "s1", "q-a", started=100.0)
    actions = claim(directory, 5, "lock-1", "s1", "q-a-new", started=100.0, fresh=False)
    assert actions == [(ACK, 1), (ROUTED, "q-a-new", "lock-1", "s1")]
    assert directory.command(6, "lock-1") == (FORWARD, 6, "q-a-new")


def test_of_two_claims_of_one_session_the_later_connections_stands_whichever_comes_first() -> None:
    """A holder reconnected (epoch 2) and re-stated its session before the owner got its first claim back
    from a redelivery (epoch 1): the stale one must not point the device at the dead queue."""
    directory = Directory()
    claim(directory, 1, "lock-1", "s1", "q-a-new", started=100.0, fresh=False, epoch=2)
    assert claim(directory, 2, "lock-1", "s1", "q-a-old", started=100.0, epoch=1) == [(ACK, 2)]
    assert directory.holder_of("lock-1") == "q-a-new"


def test_a_release_of_the_current_session_acks_its_claim() -> None:
    directory = Directory()
    claim(directory, 1, "lock-1", "s1", "q-a")
    assert directory.release(2, "lock-1", "s1") == [(ACK, 1), (ACK, 2)]
    assert directory.command(3, "lock-1") == (OFFLINE, 3)


def test_a_release_of_a_replaced_session_changes_nothing() -> None:
    directory = Directory()
    claim(directory, 1, "lock-1", "s1", "q-a")
    claim(directory, 2, "lock-1", "s2", "q-b")
    assert directory.release(3, "lock-1", "s1") == [(ACK, 3)]
    assert directory.holder_of("lock-1") == "q-b"


def test_a_holder_gone_takes_all_its_sessions_and_only_its_own() -> None:
    directory = Directory()
    claim(directory, 1, "lock-1", "s1", "q-a")
    claim(directory, 2, "lock-2", "s2", "q-a")
    claim(directory, 3, "lock-3", "s3", "q-b")
    assert sorted(directory.holder_gone("q-a")) == [(ACK, 1), (ACK, 2)]
    assert directory.command(4, "lock-1") == (PARK, 4)  # its holder may be back: see the parking tests
    assert directory.command(5, "lock-3") == (FORWARD, 5, "q-b")
    assert directory.holder_gone("q-a") == []
    assert directory.command(6, "lock-1", now=HOLDER_GRACE) == (OFFLINE, 6)  # nobody claimed it in time


def test_commands_of_a_gone_holders_devices_wait_for_its_claim_again_and_go_to_it() -> None:
    """A node's loss: the holder's link comes back with a new queue and claims its live sessions again."""
    directory = Directory()
    claim(directory, 1, "lock-1", "s1", "q-a")
    claim(directory, 2, "lock-2", "s2", "q-a")
    directory.holder_gone("q-a", now=100.0)
    assert directory.command(3, "lock-1", now=101.0) == (PARK, 3)
    directory.park("lock-1", "first")
    assert directory.command(4, "lock-1", now=102.0) == (PARK, 4)
    directory.park("lock-1", "second")
    assert directory.command(5, "lock-9", now=102.0) == (OFFLINE, 5)  # never held: answered at once
    assert directory.command(6, "lock-2", redelivered=True, now=102.0) == (ACK, 6)  # as with no holder
    assert claim(directory, 7, "lock-1", "s1", "q-a2", fresh=False, epoch=2) == [
        (ROUTED, "q-a2", "lock-1", "s1"), (UNPARKED, "first", "q-a2"), (UNPARKED, "second", "q-a2")]
    assert directory.command(8, "lock-1", now=103.0) == (FORWARD, 8, "q-a2")
    assert directory.expire_orphans(now=200.0) == []  # lock-2 had nothing parked; lock-1 was claimed


def test_a_new_session_elsewhere_takes_the_parked_commands_and_an_end_answers_them() -> None:
    directory = Directory()
    claim(directory, 1, "lock-1", "s1", "q-a")
    claim(directory, 2, "lock-2", "s2", "q-a")
    claim(directory, 3, "lock-3", "s3", "q-a")
    directory.holder_gone("q-a", now=0.0)
    for device in ("lock-1", "lock-2", "lock-3"):
        assert directory.command(4, device, now=1.0) == (PARK, 4)
        directory.park(device, f"for {device}")
    # lock-1 reconnected to another worker: a fresh session takes what waited (sent before its welcome).
    assert claim(directory, 5, "lock-1", "s9", "q-b") == [(ROUTED, "q-b", "lock-1", "s9"),
                                                          (UNPARKED, "for lock-1", "q-b")]
    # lock-2's session ended on its holder (its release says so): nobody to wait for.
    assert directory.release(6, "lock-2", "s-other") == [(ACK, 6)]  # another session's release: no news
    assert directory.release(7, "lock-2", "s2") == [(ACK, 7), (UNPARKED, "for lock-2", None)]
    # lock-3: nobody within the grace.
    assert directory.expire_orphans(now=HOLDER_GRACE - 0.5) == []
    assert directory.expire_orphans(now=HOLDER_GRACE) == [(UNPARKED, "for lock-3", None)]
    assert directory.orphans == {}


def test_a_claim_naming_a_gone_holder_is_stale_and_its_device_waits_within_the_same_grace() -> None:
    """After an owner's death the next one replays its claims; some name a holder already found gone
    (a worker killed with it). They make no entry (which would be found gone again, with a fresh grace)."""
    directory = Directory()
    claim(directory, 1, "lock-1", "s1", "q-a")
    directory.holder_gone("q-a", now=100.0)
    assert directory.claim(2, "lock-2", "s2", 0.0, "q-a", fresh=False, partition=0, now=101.0,
                           redelivered=True) == [(ACK, 2)]
    assert directory.holder_of("lock-2") is None and directory.orphans["lock-2"].until == 100.0 + HOLDER_GRACE
    assert directory.command(3, "lock-2", now=102.0) == (PARK, 3)
    directory.holder_gone("q-a", now=103.0)  # found gone again (a ping comes back): no fresh grace
    assert directory.command(4, "lock-1", now=100.0 + HOLDER_GRACE) == (OFFLINE, 4)
    assert directory.claim(5, "lock-3", "s3", 0.0, "q-a", fresh=False, partition=0, now=106.0,
                           redelivered=True) == [(ACK, 5)]
    assert directory.command(6, "lock-3", now=106.0) == (OFFLINE, 6)  # its holder's grace is over
    directory.expire_orphans(now=100.0 + HOLDER_GRACE + GONE_MEMORY)  # long after: forgotten
    assert claim(directory, 7, "lock-3", "s3", "q-a") == [(ROUTED, "q-a", "lock-3", "s3")]


def test_an_owner_that_dies_forgets_its_orphans_whose_commands_go_back_unacked() -> None:
    directory = Directory()
    claim(directory, 1, "lock-1", "s1", "q-a")
    directory.holder_gone("q-a")
    assert directory.command(2, "lock-1") == (PARK, 2)
    directory.park("lock-1", "parked")
    directory.reset()
    assert directory.orphans == {} and directory.expire_orphans(now=1e9) == []
    assert directory.command(3, "lock-1", redelivered=True) == (ACK, 3)  # the next owner: as with no holder


def test_a_holder_gone_after_its_device_moved_keeps_the_new_session() -> None:
    directory = Directory()
    claim(directory, 1, "lock-1", "s1", "q-a")
    claim(directory, 2, "lock-1", "s2", "q-b")
    assert directory.holder_gone("q-a") == []
    assert directory.holder_of("lock-1") == "q-b"


def test_claims_held_by_their_own_delivery_are_due_for_compaction_then_their_copy_for_refresh() -> None:
    """A claim is copied once soon (compaction: many to a message, so the partition's channel holds few
    deliveries); its copy is copied again only after the long refresh age (RabbitMQ's consumer timeout)."""
    directory = Directory()
    claim(directory, 1, "lock-1", "s1", "q-a", now=10.0)
    claim(directory, 2, "lock-2", "s2", "q-a", now=50.0)
    assert directory.due_refresh(older_than=1e9, limit=10) == []  # no copy yet: nothing to refresh
    due = directory.due_compaction(older_than=20.0, limit=10)
    assert [(kind, tag, partition, device) for kind, tag, partition, device, _ in due] == [(REFRESH, 1, 3, "lock-1")]
    assert directory.due_compaction(older_than=20.0, limit=10) == []  # asked once per delivery
    assert directory.refreshed(9, "lock-1", "s1", now=60.0) == []
    assert directory.due_compaction(older_than=1e9, limit=10) == [(REFRESH, 2, 3, "lock-2", directory.entries["lock-2"])]
    assert directory.due_refresh(older_than=60.0, limit=10) == []
    assert directory.release(10, "lock-2", "s2") == [(ACK, 10)]  # its copy on its way: the copy's confirm acks 2
    assert [action[1] for action in directory.due_refresh(older_than=61.0, limit=10)] == [9]
    assert directory.refreshed(11, "lock-1", "s1", now=62.0) == []
    assert directory.release(12, "lock-1", "s1") == [(ACK, 11), (ACK, 12)]  # the copy is the entry now


def test_a_session_that_ends_while_its_copy_is_on_its_way_leaves_its_delivery_to_the_copy() -> None:
    """Its end must not ack the delivery the copy's confirm will ack (RabbitMQ closes a channel acked twice
    for one tag: seen at 200,000 devices, where every claim is copied a second after it arrives). A copy
    refused meanwhile leaves the ack to the owner; a copy arriving after the session ended is stale."""
    directory = Directory()
    claim(directory, 1, "lock-1", "s1", "q-a", now=1.0)
    claim(directory, 2, "lock-2", "s2", "q-a", now=1.0)
    assert [action[1] for action in directory.due_compaction(older_than=5.0, limit=10)] == [1, 2]
    assert directory.release(3, "lock-1", "s1") == [(ACK, 3)]  # not (ACK, 1): the copy's confirm acks it
    assert directory.holder_gone("q-a") == []  # lock-2's delivery too
    assert directory.refreshed(4, "lock-1", "s1", now=6.0) == [(ACK, 4)]  # stale
    claim(directory, 5, "lock-1", "s1", "q-b", now=7.0, epoch=2)
    assert [action[1] for action in directory.due_compaction(older_than=10.0, limit=10)] == [5]
    claim(directory, 6, "lock-1", "s1", "q-c", now=8.0, epoch=3)  # the session re-stated: a later claim holds it
    assert directory.refreshed(7, "lock-1", "s1", now=9.0) == [(ACK, 7)]  # a copy of the earlier claim: stale
    assert directory.copy_again([("lock-1", 5)]) == [(ACK, 5)]  # refused, and nobody else acks it now


def test_a_refused_copy_is_due_again_at_once_unless_its_entry_moved_on() -> None:
    directory = Directory()
    claim(directory, 1, "lock-1", "s1", "q-a", now=10.0)
    claim(directory, 2, "lock-2", "s2", "q-a", now=11.0)
    claim(directory, 3, "lock-3", "s3", "q-a", now=12.0)
    assert len(directory.due_compaction(older_than=20.0, limit=10)) == 3
    directory.refreshed(7, "lock-3", "s3", now=13.0)  # lock-3's copy came back: held by it now
    claim(directory, 4, "lock-2", "s2-new", "q-b", now=14.0)  # lock-2 moved on
    directory.copy_again([("lock-1", 1), ("lock-2", 2)])
    assert [action[1] for action in directory.due_compaction(older_than=0.0, limit=10)] == [1]
    directory.copy_again([("lock-3", 7)])
    assert [action[1] for action in directory.due_refresh(older_than=0.0, limit=10)] == [7]


def test_a_copy_of_a_claim_replaced_meanwhile_is_just_acked() -> None:
    directory = Directory()
    claim(directory, 1, "lock-1", "s1", "q-a")
    claim(directory, 2, "lock-1", "s2", "q-b")
    assert directory.refreshed(3, "lock-1", "s1", now=1.0) == [(ACK, 3)]


def test_refresh_skips_replaced_claims_and_respects_the_limit() -> None:
    directory = Directory()
    for tag in range(1, 6):
        claim(directory, tag, f"lock-{tag}", "s", "q-a", now=float(tag))
    claim(directory, 6, "lock-1", "s-new", "q-b", now=100.0)
    due = directory.due_compaction(older_than=50.0, limit=2)
    assert [action[1] for action in due] == [2, 3]
    assert [action[1] for action in directory.due_compaction(older_than=50.0, limit=10)] == [4, 5]


def test_the_age_list_stays_bounded_through_a_stampede_of_replacements() -> None:
    directory = Directory()
    for tag in range(1, 20001):
        claim(directory, tag, f"lock-{tag % 10}", f"s{tag}", "q-a", now=float(tag))
    assert len(directory) == 10
    assert len(directory._ages.fresh) <= 2 * 10 + 1024 + 1
    due = directory.due_compaction(older_than=1e9, limit=100)
    assert sorted(action[1] for action in due) == list(range(19991, 20001))
    for tag in range(20001, 40001):  # copies of ten sessions, again and again: their ages stay bounded too
        device = f"lock-{tag % 10}"
        directory.entries[device].copying = directory.entries[device].tag  # as `due_refresh` marks it
        assert directory.refreshed(tag, device, directory.entries[device].session, now=float(tag)) == []
    assert len(directory._ages.copied) <= 2 * 10 + 1024 + 1
    assert sorted(action[1] for action in directory.due_refresh(older_than=1e9, limit=100)) == list(range(39991, 40001))


def test_reset_forgets_everything() -> None:
    directory = Directory()
    claim(directory, 1, "lock-1", "s1", "q-a")
    directory.reset()
    assert len(directory) == 0 and directory.command(2, "lock-1") == (OFFLINE, 2)
    assert directory.due_compaction(older_than=1e9, limit=10) == directory.due_refresh(older_than=1e9, limit=10) == []


# -- flapping (PROTOCOL.md section 6): counted where every start of a device passes -------------------
def start_and_end(directory: Directory, n: int, device: str = "lock-1", now: float = 0.0, holder: str = "q-a") -> list:
    actions = claim(directory, 2 * n, device, f"s{n}", holder, now=now)
    directory.release(2 * n + 1, device, f"s{n}")
    return actions


def test_the_start_past_flap_max_within_the_window_is_refused_and_the_device_banned() -> None:
    directory = Directory(Starts(limit=3, window=60.0))
    for n in range(3):  # takeovers from another holder count as starts too
        assert start_and_end(directory, n, now=float(n), holder=f"q-{n % 2}")[-1][0] == ROUTED
    assert claim(directory, 100, "lock-1", "s-4", "q-a", now=3.0) == [(ACK, 100), (FLAPPING, "lock-1")]
    assert directory.holder_of("lock-1") is None  # not routed: its session is never welcomed
    # Refused, the count starts again (the ban ends it for FLAP_BAN; then it may start afresh).
    assert claim(directory, 101, "lock-1", "s-5", "q-a", now=4.0)[-1] == (ROUTED, "q-a", "lock-1", "s-5")


def test_the_window_slides_and_other_devices_are_counted_apart() -> None:
    directory = Directory(Starts(limit=2, window=10.0))
    start_and_end(directory, 0, now=0.0)
    start_and_end(directory, 1, now=5.0)
    assert start_and_end(directory, 2, "lock-2", now=6.0)[-1][0] == ROUTED
    assert start_and_end(directory, 3, now=11.0)[-1][0] == ROUTED  # the start at 0 left the window
    assert start_and_end(directory, 4, now=12.0) == [(ACK, 8), (FLAPPING, "lock-1")]


def test_restatements_and_redeliveries_are_not_starts() -> None:
    directory = Directory(Starts(limit=1, window=60.0))
    claim(directory, 1, "lock-1", "s1", "q-a", started=1.0)
    for tag in range(2, 6):  # the holder reconnects to RabbitMQ and re-states its one live session
        assert claim(directory, tag, "lock-1", "s1", f"q-a{tag}", started=1.0, fresh=False, epoch=tag)[-1][0] == ROUTED
    assert len(directory.starts) == 1


def test_devices_that_stopped_starting_are_forgotten() -> None:
    starts = Starts(limit=5, window=10.0)
    for n in range(100):
        assert not starts.one_too_many(f"lock-{n}", float(n) / 10)
    starts.forget_before(5.0)
    assert len(starts) == 50
    starts.forget_before(100.0)
    assert len(starts) == 0


# -- delayed wills (PROTOCOL.md section 9: Will Delay Interval) ------------------------------------------------
def test_a_fresh_claim_before_a_held_will_is_due_tells_the_old_holder_replaced_for_the_ended_session() -> None:
    directory = Directory()
    claim(directory, 1, "lock-1", "s1", "q-a", started=100.0)
    assert directory.release(2, "lock-1", "s1", will_until=110.0) == [(ACK, 1), (ACK, 2)]
    actions = claim(directory, 3, "lock-1", "s2", "q-b", started=105.0)
    assert actions == [(REPLACED, "q-a", "lock-1", "s1"), (ROUTED, "q-b", "lock-1", "s2")]
    assert directory.wills == {}  # told once


def test_a_claim_after_the_will_was_due_changes_nothing_for_it() -> None:
    directory = Directory()
    claim(directory, 1, "lock-1", "s1", "q-a", started=100.0)
    directory.release(2, "lock-1", "s1", will_until=110.0)
    assert claim(directory, 3, "lock-1", "s2", "q-b", started=111.0) == [(ROUTED, "q-b", "lock-1", "s2")]


def test_a_restated_claim_is_no_new_session_and_keeps_the_will() -> None:
    directory = Directory()
    claim(directory, 1, "lock-1", "s1", "q-a", started=100.0)
    directory.release(2, "lock-1", "s1", will_until=110.0)
    claim(directory, 3, "lock-2", "s9", "q-b", started=105.0, fresh=False)
    assert claim(directory, 4, "lock-1", "s2", "q-b", started=105.0, fresh=False) == [(ROUTED, "q-b", "lock-1", "s2")]
    assert "lock-1" in directory.wills


def test_a_release_without_a_held_will_is_not_remembered_and_held_wills_are_forgotten_when_due() -> None:
    directory = Directory()
    claim(directory, 1, "lock-1", "s1", "q-a")
    claim(directory, 2, "lock-2", "s2", "q-a")
    directory.release(3, "lock-1", "s1")
    directory.release(4, "lock-2", "s2", will_until=110.0)
    assert set(directory.wills) == {"lock-2"}
    directory.forget_wills(109.0)
    assert set(directory.wills) == {"lock-2"}
    directory.forget_wills(110.0)
    assert directory.wills == {}
    directory.release(5, "lock-2", "s2", will_until=120.0)  # a release of no entry: nothing to remember
    assert directory.wills == {}


def test_a_release_body_carries_will_until_only_when_held() -> None:
    from app.broker.messages import decode_release, release_body
    assert decode_release(release_body("lock-1", "s1", 0.0)) == ("lock-1", "s1", None)
    assert decode_release(release_body("lock-1", "s1", 1234.5)) == ("lock-1", "s1", 1234.5)
    assert decode_release(b"not json") is None
