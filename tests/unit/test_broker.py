"""app/broker/ as sessions and the HTTP API see it: the facade on kombu's `memory://` transport, node
rotation and failover, the HTTP API's requests, and (when one answers) the real RabbitMQ."""

from __future__ import annotations

import gc
import itertools
import socket
import time
import types
import uuid
from typing import Any

import gevent
import orjson
import pytest
from gevent.event import Event
from kombu import Connection, Exchange, Queue

from app.broker import Broker, link, rpc
from app.broker.link import node_order
from app.broker.messages import ASK, ASK_TYPE, COMMAND, Command, decode_ask
from app.broker.publisher import Publisher

RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"


def wait_for(predicate: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        gevent.sleep(0.005)


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
            return types.SimpleNamespace(
                ensure_connection=lambda **_: (_ for _ in ()).throw(ConnectionRefusedError(url)))
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


def test_a_link_is_starting_until_its_first_connect_succeeds_or_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Routing waits for a starting link (a hello's route comes soon), not for one known to be away."""
    gate, attempts = Event(), []

    def connect(url: str, **_kwargs: Any) -> Any:
        attempts.append(url)
        gate.wait()
        if len(attempts) == 1:
            return types.SimpleNamespace(
                ensure_connection=lambda **_: (_ for _ in ()).throw(ConnectionRefusedError(url)))
        return Connection("memory://")

    monkeypatch.setattr(link, "Connection", connect)
    monkeypatch.setattr(link, "backoff_delays", lambda: itertools.repeat(0.3))
    publisher = Publisher("memory://")
    runner = gevent.spawn(publisher.run)
    try:
        gevent.sleep(0.05)
        assert attempts and publisher.starting and not publisher.connected
        gate.set()  # the first connect fails: RabbitMQ is away
        wait_for(lambda: not publisher.starting)
        assert not publisher.connected
        wait_for(lambda: publisher.connected)
        assert not publisher.starting
    finally:
        runner.kill()


def test_sessions_wait_for_their_route_while_the_consumer_starts_not_once_rabbitmq_is_away() -> None:
    broker = Broker("memory://", max_command_bytes=200)
    consumer = broker.links[1]
    assert not consumer.connected and broker.routing  # starting: a hello waits for its route
    consumer.starting = False  # its first connect failed
    assert not broker.routing  # away: hellos are welcomed without one, and claimed once it is back


@pytest.mark.parametrize(("error", "second"), [(ConnectionResetError("reset"), "memory://b"),
                                               (link.StuckChannel("nacked"), "memory://a")])
def test_a_stuck_channel_reconnects_to_its_node_and_a_lost_one_moves_on(
        monkeypatch: pytest.MonkeyPatch, error: Exception, second: str) -> None:
    attempts: list[str] = []

    def connect(url: str, **_kwargs: Any) -> Any:
        attempts.append(url)
        return Connection("memory://")

    monkeypatch.setattr(link, "Connection", connect)
    monkeypatch.setattr(link, "backoff_delays", lambda: itertools.repeat(0.0))
    monkeypatch.setattr(link, "TICK", 0.01)
    publisher = Publisher("memory://a;memory://b")
    raised: list[Exception] = []

    def tick(_now: float) -> None:  # the first tick finds the link broken, as the publisher's checks do
        if not raised:
            raised.append(error)
            raise error

    monkeypatch.setattr(publisher, "tick", tick)
    runner = gevent.spawn(publisher.run)
    try:
        wait_for(lambda: len(attempts) == 2 and publisher.connected)
        assert attempts == ["memory://a", second]
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


# -- the facade on the in-process broker -----------------------------------------------------------------
@pytest.fixture
def memory_broker() -> Any:
    seen: dict[str, list] = {"commands": [], "routed": [], "replaced": [], "bans": []}

    def answer(device: str, kind: str) -> dict[str, Any] | None:
        return {"device": device, "online": True, "asked": kind} if (device, "s-1") in seen["routed"] else None

    broker = Broker("memory://", max_command_bytes=200)
    broker.attach(types.SimpleNamespace(  # an `Inbound` of callables
        deliver=lambda command, again=False: seen["commands"].append((command, again)),
        routed=lambda *notice: seen["routed"].append(notice),
        replaced=lambda *notice: seen["replaced"].append(notice),
        ban_changed=seen["bans"].append, live_sessions=list, answer=answer))
    runners = [gevent.spawn(each.run) for each in broker.links]
    wait_for(lambda: broker.ready)
    yield broker, seen
    gevent.killall(runners)


def test_in_process_broker_publishes_events_as_rabbitmq_would(memory_broker: Any) -> None:
    broker, _seen = memory_broker
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
    assert broker.backlog == 0 and broker.accepting


def test_in_process_broker_decides_claims_in_its_partition_owner(memory_broker: Any) -> None:
    """Claims and releases go to the (one, in-process) partition, whose owner answers `routed` and
    `replaced` through our queue and keeps the directory the commands are routed by."""
    broker, seen = memory_broker
    device = f"mem-{uuid.uuid4().hex[:8]}"
    directory = broker._consumer.owner.directory
    assert broker.routing
    broker.claim(device, 3.0, "s-1")
    wait_for(lambda: seen["routed"] == [(device, "s-1")])
    assert directory.holder_of(device) == broker._consumer.queue_name
    broker.claim(device, 4.0, "s-2")  # a newer session of the device: the older one is told
    wait_for(lambda: seen["replaced"] == [(device, "s-1")] and seen["routed"][-1] == (device, "s-2"))
    broker.release(device, "s-1")  # the replaced session's release changes nothing
    gevent.sleep(0.05)
    assert directory.entries[device].session == "s-2"
    broker.release(device, "s-2")
    wait_for(lambda: directory.holder_of(device) is None)
    assert seen["commands"] == [] and len(seen["routed"]) == 2


def test_in_process_broker_keeps_bans_in_memory_through_the_same_code(memory_broker: Any) -> None:
    """`make run`: a plain queue stands in for the stream; a ban is stored (confirmed), read back by the
    worker, reaches the sessions side, and a lift ends it."""
    broker, seen = memory_broker
    device = f"mem-{uuid.uuid4().hex[:8]}"
    assert broker.lift(device) is None  # nothing to lift
    stored = broker.ban(device, 60.0, "stolen").get(timeout=2)
    assert stored.device == device and stored.reason == "stolen" and stored.by == "operator"
    wait_for(lambda: broker.banned(device) == stored)
    assert seen["bans"] == [stored] and broker.bans() == [stored]
    lifted = broker.lift(device).get(timeout=2)
    assert lifted.lifted and lifted.issued > stored.issued
    wait_for(lambda: broker.banned(device) is None)
    assert seen["bans"] == [stored, lifted]


def test_in_process_broker_carries_commands_and_questions_to_the_holder(memory_broker: Any) -> None:
    broker, seen = memory_broker
    device, stranger = f"mem-{uuid.uuid4().hex[:8]}", f"mem-{uuid.uuid4().hex[:8]}"
    broker.claim(device, 3.0, "s-1")
    wait_for(lambda: seen["routed"] == [(device, "s-1")])
    result = broker.send_command(device, "unlock", {"door": 2}, timeout=5)
    wait_for(lambda: seen["commands"])
    command, again = seen["commands"][0]
    assert (command.device, command.name, command.data, again) == (device, "unlock", {"door": 2}, False)
    broker.reply(command, ok=True, data="opened")
    assert result.get(timeout=2) == {"device": device, "id": command.id, "ok": True, "data": "opened",
                                     "error": None}
    assert broker.send_command(stranger, "unlock", None, timeout=5).get(timeout=2)["error"] == "offline"
    too_large = broker.send_command(device, "unlock", "x" * 300, timeout=5).get(timeout=2)
    assert (too_large["ok"], too_large["error"]) == (False, "too_large")
    assert broker.ask(device, "info", 5).get(timeout=2) == {"device": device, "online": True, "asked": "info"}
    assert broker.ask(stranger, "info", 5).get(timeout=2) == {"device": stranger, "online": False}
    broker.release(device, "s-1")
    gevent.sleep(0.05)
    assert broker.send_command(device, "unlock", None, timeout=5).get(timeout=2)["error"] == "offline"
    assert len(seen["commands"]) == 1


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

    def on_routed(dev: str, session_id: str) -> None:
        if (dev, session_id) == (device, session):
            routed.set()

    def replaced(dev: str, session_id: str) -> None:
        raise AssertionError(f"no newer session of {dev} exists: {session_id} cannot be replaced")

    broker = Broker(RABBITMQ, max_command_bytes=1000)
    broker.attach(types.SimpleNamespace(deliver=lambda command, again=False: commands.append(command),
                                        routed=on_routed, replaced=replaced,
                                        live_sessions=lambda: [(device, 1.0, session)], answer=lambda *_: None,
                                        ban_changed=lambda _ban: None))
    runners = [gevent.spawn(each.run) for each in broker.links]
    try:
        wait_for(lambda: broker.ready, timeout=10)
        assert routed.wait(5)  # live at the connect: claimed by the consumer's setup
        routed.clear()
        broker.claim(device, 1.0, session)  # claimed again, as the registry would: the same session stands
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
        assert routed.wait(15)  # reconnected, and the live session claimed again
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
