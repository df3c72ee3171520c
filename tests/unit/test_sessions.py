"""Sessions, the registry and the watchdog in-process, against fakes of the transport and the broker.

No sockets, no RabbitMQ, no gunicorn: each test drives one or two sessions
frame by frame and checks what they send, publish and reply.
"""

from __future__ import annotations

import time
from dataclasses import replace

import gevent
import pytest
from fakes import CONFIG, Command, FakeConn, hello, make_registry, wait_for
from prometheus_client import REGISTRY

from app.protocol import ProtocolError
from app.sessions.bans import Ban, now_ms
from app.sessions.ports import COMMANDS_MAY_FLOW
from app.sessions.registry import Registry
from app.sessions.session import Session, State


@pytest.fixture
def registry() -> Registry:
    return make_registry()


def start(registry: Registry, device: str = "lock-1") -> tuple[Session, FakeConn, gevent.Greenlet]:
    conn = FakeConn()
    session = Session(conn, registry, registry.broker)
    runner = gevent.spawn(session.run)
    conn.push(hello(device))
    wait_for(lambda: "welcome" in conn.types() or conn.closed)
    return session, conn, runner


def test_welcome_waits_for_the_route_then_presence_follows(registry: Registry) -> None:
    session, conn, _ = start(registry)
    assert conn.sent[0]["type"] == "welcome" and conn.sent[0]["heartbeat"] == 30
    assert session.state == State.OPEN
    assert registry.broker.claims == [("lock-1", session.started, session.id)]
    assert registry.broker.presence == [("lock-1", "connected", {"transport": "tcp"})]


def test_the_welcome_waits_for_the_owners_routed_answer(registry: Registry) -> None:
    session, conn = routing(registry)
    gevent.sleep(0.2)
    assert session.state == State.ROUTING and conn.sent == [] and registry.broker.presence == []
    registry.broker.route("lock-1", session.id)  # the owner says the claim stands
    wait_for(lambda: conn.types() == ["welcome"])
    assert session.state == State.OPEN


def hello_failures(code: str) -> float:
    return REGISTRY.get_sample_value("warren_hello_failures_total", {"code": code}) or 0.0


def test_no_routed_answer_within_route_wait_refuses_the_hello_overloaded() -> None:
    registry = make_registry(replace(CONFIG, route_wait=0.3))
    before = hello_failures("overloaded")
    session, conn = routing(registry)
    gevent.sleep(0.15)
    assert conn.sent == [] and session.state == State.ROUTING  # still within ROUTE_WAIT
    wait_for(lambda: conn.sent)
    assert conn.types() == ["error"] and conn.sent[0]["code"] == "overloaded"
    assert conn.sent[0]["retry_after"] > 0 and conn.finished
    assert hello_failures("overloaded") == before + 1
    wait_for(lambda: conn.closed)  # the session's greenlet ended: it left the registry before
    assert registry.sessions == {} and registry.broker.releases == [("lock-1", session.id)]
    assert registry.broker.claimed == {}


def test_with_rabbitmq_away_the_hello_is_welcomed_at_once(registry: Registry) -> None:
    """No consumer link, no owner to ask: welcomed now (the claim follows once RabbitMQ is back)."""
    registry.broker.routing = False
    registry.broker.answers = False
    conn = FakeConn()
    session = Session(conn, registry, registry.broker)
    gevent.spawn(session.run)
    started = time.monotonic()
    conn.push(hello())
    wait_for(lambda: conn.types() == ["welcome"], timeout=CONFIG.route_wait / 2)
    assert time.monotonic() - started < CONFIG.route_wait / 2 and session.state == State.OPEN
    assert registry.live_sessions() == [("lock-1", session.started, session.id)]


def test_ping_pong_and_close_cleans_the_registry(registry: Registry) -> None:
    _session, conn, runner = start(registry)
    conn.push({"type": "ping"})
    wait_for(lambda: conn.types()[-1:] == ["pong"])
    conn.push(None)  # the peer went away
    runner.join(1)
    assert registry.sessions == {} and registry.broker.claimed == {} and len(registry.watchdog) == 0
    assert registry.broker.releases == [("lock-1", _session.id)]
    assert registry.broker.presence[-1] == ("lock-1", "closed", {"reason": "closed"})
    assert conn.closed


def test_event_acked_only_after_the_confirm(registry: Registry) -> None:
    _, conn, _ = start(registry)
    conn.push({"type": "event", "id": "e-1", "name": "door.opened", "data": {"by": "app"}})
    wait_for(lambda: registry.broker.events)
    name, event_id, done = registry.broker.events[0]
    assert (name, event_id) == ("door.opened", "e-1") and "ack" not in conn.types()
    done(None)
    assert conn.sent[-1] == {"type": "ack", "id": "e-1"}


def test_unroutable_event_is_nacked_not_acked(registry: Registry) -> None:
    _, conn, _ = start(registry)
    conn.push({"type": "event", "id": "e-2", "name": "door.opened"})
    wait_for(lambda: registry.broker.events)
    registry.broker.events[0][2]("unroutable")
    assert conn.sent[-1]["type"] == "nack" and conn.sent[-1]["reason"] == "unroutable"


def test_event_while_the_broker_is_down_is_nacked_at_once(registry: Registry) -> None:
    _, conn, _ = start(registry)
    registry.broker.accepting = False
    conn.push({"type": "event", "id": "e-3", "name": "door.opened"})
    wait_for(lambda: conn.types()[-1:] == ["nack"])
    assert conn.sent[-1]["reason"] == "broker_unavailable" and registry.broker.events == []


def test_command_round_trip_and_unknown_reply(registry: Registry) -> None:
    _, conn, _ = start(registry)
    registry.deliver(Command("lock-1", "c-1", data={"for": 5}))
    assert conn.sent[-1] == {"type": "command", "id": "c-1", "name": "unlock", "data": {"for": 5}}
    conn.push({"type": "reply", "id": "c-1", "ok": True, "data": {"done": 1}})
    wait_for(lambda: registry.broker.replies)
    assert registry.broker.replies == [("c-1", True, {"done": 1}, None)]
    conn.push({"type": "reply", "id": "c-1", "ok": True})
    wait_for(lambda: conn.sent[-1].get("code") == "unknown_command")


def test_commands_for_nobody_or_expired_are_answered(registry: Registry) -> None:
    registry.deliver(Command("nobody", "c-2"))
    registry.deliver(Command("nobody", "c-3", deadline=time.monotonic() - 1))
    assert registry.broker.replies == [("c-2", False, None, "offline"), ("c-3", False, None, "expired")]


def test_a_command_during_routing_is_held_until_the_owner_routes_the_session(registry: Registry) -> None:
    """A command passed on while the session waits for its route may be one its owner meant for an older
    session of the device in this worker (it had not read that one's release, nor our claim, yet). Were it
    taken as the route's proof, the device would be welcomed while its next command still finds no claim
    at the owner, and is answered `offline` while connected (section 2.4): only `routed` welcomes."""
    session, conn = routing(registry)
    registry.deliver(Command("lock-1", "c-4"))
    gevent.sleep(0.05)
    assert session.state == State.ROUTING and conn.types() == []
    registry.broker.route("lock-1", session.id)
    wait_for(lambda: conn.types() == ["welcome", "command"])
    assert conn.sent[-1]["id"] == "c-4"


def expired_commands() -> float:
    return REGISTRY.get_sample_value("warren_commands_total", {"outcome": "expired"}) or 0.0


def routing(registry: Registry) -> tuple[Session, FakeConn]:
    """A session registered and waiting for its route (the owner does not answer its claim)."""
    registry.broker.answers = False
    conn = FakeConn()
    session = Session(conn, registry, registry.broker)
    gevent.spawn(session.run)
    conn.push(hello())
    wait_for(lambda: session.state == State.ROUTING)
    return session, conn


def test_a_command_held_past_its_deadline_is_never_written_and_counted_expired(registry: Registry) -> None:
    conn = FakeConn()
    conn.commands_flow = False  # as MQTT before a SUBSCRIBE to commands/#
    session = Session(conn, registry, registry.broker)
    gevent.spawn(session.run)
    conn.push(hello())
    wait_for(lambda: "welcome" in conn.types())
    before = expired_commands()
    registry.deliver(Command("lock-1", "c-old", deadline=time.monotonic() + 0.05))
    registry.deliver(Command("lock-1", "c-new"))
    gevent.sleep(0.1)  # the first one's deadline passes while it is held
    conn.commands_flow = True
    conn.push(COMMANDS_MAY_FLOW)
    wait_for(lambda: "command" in conn.types())
    assert [frame.get("id") for frame in conn.sent[1:]] == ["c-new"]
    assert expired_commands() == before + 1 and list(session.pending) == ["c-new"]


def test_commands_held_for_a_welcome_that_never_came_are_answered_offline(registry: Registry) -> None:
    session, conn = routing(registry)
    registry.deliver(Command("lock-1", "c-1"))
    session.end("kicked")  # in the same turn: the route wait wakes to a closing session
    wait_for(lambda: registry.broker.replies)
    assert registry.broker.replies == [("c-1", False, None, "offline")] and "command" not in conn.types()


def test_commands_wait_while_the_transport_holds_them_then_flow_in_order(registry: Registry) -> None:
    conn = FakeConn()
    conn.commands_flow = False  # as MQTT before a SUBSCRIBE to commands/#
    gevent.spawn(Session(conn, registry, registry.broker).run)
    conn.push(hello())
    wait_for(lambda: "welcome" in conn.types())
    for n in range(3):
        registry.deliver(Command("lock-1", f"c-{n}"))
    assert conn.types() == ["welcome"]
    conn.commands_flow = True
    conn.push(COMMANDS_MAY_FLOW)
    wait_for(lambda: len(conn.sent) == 4)
    assert [frame["id"] for frame in conn.sent[1:]] == ["c-0", "c-1", "c-2"]
    conn.commands_flow = False  # held again (MQTT UNSUBSCRIBE)
    registry.deliver(Command("lock-1", "c-3"))
    assert len(conn.sent) == 4


def test_held_commands_are_bounded_like_pending_and_dropped_ones_are_never_written() -> None:
    """A device that never subscribes (MQTT) cannot grow its session: what is held stays within
    MAX_PENDING_COMMANDS, and a command pushed out of `pending` (counted `dropped`) is not written later."""
    registry = make_registry(replace(CONFIG, max_pending_commands=3))
    conn = FakeConn()
    conn.commands_flow = False
    session = Session(conn, registry, registry.broker)
    gevent.spawn(session.run)
    conn.push(hello())
    wait_for(lambda: "welcome" in conn.types())
    for n in range(50):
        registry.deliver(Command("lock-1", f"c-{n}"))
    assert len(session.held) <= 2 * 3 and list(session.pending) == ["c-47", "c-48", "c-49"]
    conn.commands_flow = True
    conn.push(COMMANDS_MAY_FLOW)
    wait_for(lambda: len(conn.sent) == 4)
    gevent.sleep(0.01)
    assert [frame["id"] for frame in conn.sent[1:]] == ["c-47", "c-48", "c-49"]


def test_a_ping_over_the_limit_is_answered_once_with_rate_limited() -> None:
    registry = make_registry(replace(CONFIG, event_rate=0.001, event_burst=1))
    _, conn, _ = start(registry)
    conn.push({"type": "ping", "id": "p-1"})
    conn.push({"type": "ping", "id": "p-2"})
    conn.push({"type": "ping", "id": "p-3"})
    wait_for(lambda: len(conn.sent) == 4)
    gevent.sleep(0.01)
    assert conn.types() == ["welcome", "pong", "error", "error"]
    assert [(frame["code"], frame["id"]) for frame in conn.sent[2:]] == [("rate_limited", "p-2"), ("rate_limited", "p-3")]


def test_the_owners_replaced_ends_the_current_session(registry: Registry) -> None:
    session, conn, runner = start(registry)
    registry.broker.replace("lock-1", session.id)  # a newer session claimed the device elsewhere
    assert conn.sent[-1]["code"] == "replaced" and conn.finished
    runner.join(1)
    assert registry.sessions == {} and registry.broker.presence[-1] == ("lock-1", "closed", {"reason": "replaced"})


def test_routed_or_replaced_for_another_session_id_changes_nothing(registry: Registry) -> None:
    """Notices about a session that is not the current one (an older one here, already gone) are stale."""
    waiting, conn = routing(registry)
    registry.broker.route("lock-1", "0" * 16)
    registry.broker.replace("lock-1", "0" * 16)
    gevent.sleep(0.05)
    assert waiting.state == State.ROUTING and conn.sent == [] and not conn.finished
    registry.broker.route("lock-1", waiting.id)
    wait_for(lambda: conn.types() == ["welcome"])
    registry.broker.replace("lock-1", "f" * 16)
    registry.broker.route("lock-1", "f" * 16)
    registry.broker.replace("nobody", waiting.id)  # another device's notice, with our session's id
    assert conn.types() == ["welcome"] and not conn.finished and registry.sessions["lock-1"] is waiting


def test_second_local_hello_replaces_the_first(registry: Registry) -> None:
    _first, first_conn, _ = start(registry)
    second, _, _ = start(registry)
    assert first_conn.sent[-1]["code"] == "replaced"
    assert registry.sessions["lock-1"] is second


def test_watchdog_expires_idle_sessions_and_slow_hellos(registry: Registry) -> None:
    _session, conn, runner = start(registry)
    silent = FakeConn()
    greeting = Session(silent, registry, registry.broker)
    gevent.spawn(greeting.run)
    gevent.sleep(0)
    now = time.monotonic()
    assert registry.watchdog.sweep(now) == 0
    assert registry.watchdog.sweep(now + CONFIG.hello_timeout + 0.1) == 1  # the silent hello only
    assert silent.sent[-1]["code"] == "hello_timeout" and silent.finished
    assert registry.watchdog.sweep(now + 2 * CONFIG.heartbeat + 0.1) == 1
    assert conn.sent[-1]["code"] == "idle_timeout"
    runner.join(1)
    assert registry.broker.presence[-1] == ("lock-1", "closed", {"reason": "idle_timeout"})


def test_every_frame_pushes_the_idle_deadline(registry: Registry) -> None:
    session, conn, _ = start(registry)
    before = session.deadline
    gevent.sleep(0.01)
    conn.push({"type": "ping"})
    wait_for(lambda: conn.types()[-1:] == ["pong"])
    assert session.deadline > before


def test_bad_hellos_are_refused(registry: Registry) -> None:
    for frame, code in [({"type": "ping"}, "unauthorized"),
                        ({**hello(), "token": "00"}, "unauthorized"),
                        ({**hello(), "v": 2}, "unsupported_version")]:
        conn = FakeConn()
        session = Session(conn, registry, registry.broker)
        runner = gevent.spawn(session.run)
        conn.push(frame)
        runner.join(1)
        assert conn.sent[-1]["code"] == code and registry.sessions == {}


def test_bad_frames_keep_the_session_and_too_large_closes_it(registry: Registry) -> None:
    _, conn, runner = start(registry)
    conn.push({"type": "dance"})
    wait_for(lambda: conn.sent[-1].get("code") == "bad_frame")
    assert not runner.dead
    conn.push(ProtocolError("frame_too_large", "too big"))
    runner.join(1)
    assert conn.sent[-1]["code"] == "frame_too_large" and runner.dead


def test_full_worker_answers_overloaded() -> None:
    registry = make_registry(replace(CONFIG, max_connections=1))
    start(registry, "lock-1")
    _, conn, _ = start(registry, "lock-2")
    assert conn.sent[-1]["code"] == "overloaded" and "retry_after" in conn.sent[-1]


def test_rate_limited_events_are_nacked() -> None:
    registry = make_registry(replace(CONFIG, event_rate=0.001, event_burst=1))
    _, conn, _ = start(registry)
    conn.push({"type": "event", "id": "e-1", "name": "a"})
    conn.push({"type": "event", "id": "e-2", "name": "a"})
    wait_for(lambda: conn.types()[-1:] == ["nack"])
    assert conn.sent[-1]["reason"] == "rate_limited" and len(registry.broker.events) == 1


def test_drain_waits_for_in_flight_events(registry: Registry) -> None:
    _, conn, runner = start(registry)
    conn.push({"type": "event", "id": "e-1", "name": "a"})
    wait_for(lambda: registry.broker.events)
    registry.drain(5.0)
    assert not conn.finished  # one event still waits for its confirm
    registry.broker.events[0][2](None)
    assert conn.types()[-2:] == ["ack", "error"] and conn.sent[-1]["code"] == "shutting_down"
    runner.join(1)
    assert registry.admit()[0] == "shutting_down"


def test_a_command_the_transport_cannot_carry_is_answered_bad_command(registry: Registry) -> None:
    _, conn, _ = start(registry)
    registry.deliver(Command("lock-1", "c-5", name="a/b"))
    assert registry.broker.replies == [("c-5", False, None, "bad_command")]
    assert "command" not in conn.types()


def test_will_is_published_before_presence_unless_the_device_says_bye(registry: Registry) -> None:
    for goodbye, wills in [(None, 1), ({"type": "bye"}, 0)]:
        conn = FakeConn()
        session = Session(conn, registry, registry.broker)
        runner = gevent.spawn(session.run)
        conn.push({**hello(), "will": {"name": "lock.lost", "data": {"why": "gone"}}})
        wait_for(lambda conn=conn: "welcome" in conn.types())
        registry.broker.events.clear()
        conn.push(goodbye)
        runner.join(1)
        assert [name for name, _, _ in registry.broker.events] == ["lock.lost"] * wills
        assert registry.broker.presence[-1] == ("lock-1", "closed", {"reason": "closed"})


def test_invalid_will_is_unauthorized(registry: Registry) -> None:
    conn = FakeConn()
    runner = gevent.spawn(Session(conn, registry, registry.broker).run)
    conn.push({**hello(), "will": {"name": "session.closed"}})
    runner.join(1)
    assert conn.sent[-1]["code"] == "unauthorized" and registry.sessions == {}


def test_backpressure_waits_instead_of_refusing() -> None:
    registry = make_registry(replace(CONFIG, event_rate=50.0, event_burst=1))
    _, conn, _ = start(registry)
    conn.backpressure = True
    for n in range(3):
        conn.push({"type": "event", "id": f"e-{n}", "name": "a"})
    wait_for(lambda: len(registry.broker.events) == 3)
    assert "nack" not in conn.types()


def test_a_closing_protocol_error_from_the_transport_ends_the_session(registry: Registry) -> None:
    _, conn, runner = start(registry)
    conn.push(ProtocolError("bad_frame", "bad packet", close=True))
    runner.join(1)
    assert runner.dead and conn.sent[-1]["code"] == "bad_frame"


def test_a_command_forwarded_after_the_session_was_replaced_is_answered_offline(registry: Registry) -> None:
    """The owner forwards to the holder it knows: one that reaches us after our session ended (it was
    on its way before the newer claim) has no session here, and only we can answer it."""
    session, conn, runner = start(registry)
    registry.broker.replace("lock-1", session.id)
    runner.join(1)
    registry.deliver(Command("lock-1", "c-9"))
    assert registry.broker.replies == [("c-9", False, None, "offline")] and "command" not in conn.types()


def duplicates() -> float:
    return REGISTRY.get_sample_value("warren_commands_total", {"outcome": "duplicate"}) or 0.0


def test_a_second_copy_from_an_owners_failover_is_dropped(registry: Registry) -> None:
    _, conn, _ = start(registry)
    before = duplicates()
    registry.deliver(Command("lock-1", "c-1"))
    registry.deliver(Command("lock-1", "c-1"), again=True)  # the next owner passed it on again
    assert [frame.get("id") for frame in conn.sent[1:]] == ["c-1"] and duplicates() == before + 1
    registry.deliver(Command("lock-1", "c-2"), again=True)  # redelivered, but never taken here: delivered
    assert [frame.get("id") for frame in conn.sent[1:]] == ["c-1", "c-2"] and duplicates() == before + 1
    registry.deliver(Command("lock-2", "c-1"), again=True)  # the same id for another device is another command
    assert registry.broker.replies == [("c-1", False, None, "offline")]


def test_a_command_id_sent_again_by_its_backend_is_delivered_again(registry: Registry) -> None:
    """Only `again` (a redelivery inside RabbitMQ) marks a copy: a backend may send an id twice."""
    _, conn, _ = start(registry)
    before = duplicates()
    registry.deliver(Command("lock-1", "c-1"))
    registry.deliver(Command("lock-1", "c-1"))
    assert [frame.get("id") for frame in conn.sent[1:]] == ["c-1", "c-1"] and duplicates() == before


def test_a_duplicate_of_an_offline_answer_is_not_answered_twice(registry: Registry) -> None:
    registry.deliver(Command("gone", "c-7"))
    registry.deliver(Command("gone", "c-7"), again=True)
    assert registry.broker.replies == [("c-7", False, None, "offline")]


def test_routing_and_live_sessions_are_what_the_broker_needs(registry: Registry) -> None:
    assert registry.routing
    registry.broker.routing = False
    assert not registry.routing
    registry.broker.routing = True
    session, _, _ = start(registry)
    other, _, _ = start(registry, "lock-2")
    assert sorted(registry.live_sessions()) == sorted([("lock-1", session.started, session.id),
                                                       ("lock-2", other.started, other.id)])


def test_a_certificate_names_the_device_and_stands_in_for_the_token(registry: Registry) -> None:
    cases = [(("lock-1",), {"type": "hello", "device": "lock-1"}, "welcome"),
             (("lock-1",), hello(), "welcome"),
             (("lock-1",), {**hello(), "token": "0" * 64}, "unauthorized"),  # a token sent must be valid too
             (("lock-2",), hello(), "unauthorized"),  # the certificate names another device
             ((), {"type": "hello", "device": "lock-1"}, "unauthorized")]  # no certificate, no token
    for names, frame, outcome in cases:
        conn = FakeConn()
        conn.certificate_names = names
        session = Session(conn, registry, registry.broker)
        runner = gevent.spawn(session.run)
        conn.push(frame)
        wait_for(lambda conn=conn: conn.sent)
        assert conn.sent[0].get("code", conn.sent[0]["type"]) == outcome, (names, frame)
        conn.push(None)
        runner.join(1)


# -- bans (PROTOCOL.md section 6) ------------------------------------------------------------------------
def banned_record(device: str = "lock-1", seconds: float | None = 60.0) -> Ban:
    issued = now_ms()
    return Ban(device, issued, None if seconds is None else issued + int(seconds * 1000), "stolen")


def test_a_banned_hello_is_refused_after_the_token_and_before_capacity_at_no_cost() -> None:
    registry = make_registry(replace(CONFIG, max_connections=1))
    start(registry, "lock-0")  # the worker is full: a banned device still hears `banned`, not `overloaded`
    registry.broker.ban(banned_record("lock-1"))
    before = hello_failures("banned")
    _, conn, _ = start(registry, "lock-1")
    assert conn.types() == ["error"] and conn.sent[0]["code"] == "banned"
    assert 55 < conn.sent[0]["retry_after"] <= 60 and conn.closed
    assert hello_failures("banned") == before + 1
    # No routing write, no presence event, no broker traffic for it.
    assert [c[0] for c in registry.broker.claims] == ["lock-0"]
    assert [p[0] for p in registry.broker.presence] == ["lock-0"]
    # Without its token nobody learns it is banned.
    conn = FakeConn()
    runner = gevent.spawn(Session(conn, registry, registry.broker).run)
    conn.push({**hello("lock-1"), "token": "00"})
    runner.join(1)
    assert conn.sent[-1]["code"] == "unauthorized"


def test_a_ban_without_end_carries_no_retry_after() -> None:
    registry = make_registry()
    registry.broker.ban(banned_record(seconds=None))
    _, conn, _ = start(registry)
    assert conn.sent[0]["code"] == "banned" and "retry_after" not in conn.sent[0]


def test_a_ban_that_reaches_the_worker_ends_the_devices_session_and_only_it(registry: Registry) -> None:
    _, conn, runner = start(registry, "lock-1")
    _, other, _ = start(registry, "lock-2")
    registry.broker.ban(banned_record("lock-1"))
    runner.join(1)
    assert conn.sent[-1]["code"] == "banned" and conn.sent[-1]["retry_after"] > 0
    assert registry.broker.presence[-1] == ("lock-1", "closed", {"reason": "banned"})
    assert "lock-2" in registry.sessions and not other.closed
    # A lift (a later record) lets it back.
    registry.broker.ban(Ban("lock-1", now_ms() + 1, lifted=True))
    assert start(registry, "lock-1")[1].types() == ["welcome"]


def test_a_ban_read_while_the_hello_waits_for_its_route_refuses_it_without_presence(registry: Registry) -> None:
    _, conn = routing(registry)
    registry.broker.ban(banned_record("lock-1"))
    wait_for(lambda: conn.sent)
    assert conn.sent[0]["code"] == "banned"
    wait_for(lambda: conn.closed)
    assert registry.broker.presence == []  # never welcomed: neither connected nor closed


def test_an_expired_ban_refuses_nothing(registry: Registry) -> None:
    registry.broker.ban(Ban("lock-1", now_ms() - 5000, now_ms() - 1000))
    assert start(registry)[1].types() == ["welcome"]
