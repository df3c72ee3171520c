"""The connection supervisor (app/supervision/connections.py): counting, the accept cap, crashes, stopping, its place in a tree.

Listeners are real gevent StreamServers on ports the kernel picks. To show that
a paused listener accepts nothing without sleeping on it, a test connects to
a capped listener and then to an uncapped `control` one: once the control
listener has accepted, the capped one had its chance too (libev reports every
listener that is ready in the same turn of the loop).
"""

from gevent import monkey

monkey.patch_all()

import socket
from collections.abc import Iterator

import gevent
import pytest
from gevent import GreenletExit
from gevent.event import AsyncResult, Event
from gevent.server import StreamServer
from prometheus_client import REGISTRY

from app.supervision import ChildSpec, ConnectionSupervisor, Reporter, ShutdownKill, Supervisor, set_reporter
from support.waiting import wait_until


class Boom(Exception):
    """What a crashing connection raises."""


class CrashLog(Reporter):
    def __init__(self) -> None:
        self.crashes: list[tuple[str, str, str]] = []
        self.restarts: list[str] = []

    def crash(self, supervisor: str, child_id: str, exc: BaseException) -> None:
        self.crashes.append((supervisor, child_id, type(exc).__name__))

    def restart(self, supervisor: str, child_id: str) -> None:
        self.restarts.append(child_id)


@pytest.fixture
def reporter() -> Iterator[CrashLog]:
    log = CrashLog()
    set_reporter(log)
    yield log
    set_reporter(None)


@pytest.fixture
def supervise() -> Iterator:
    """Start ConnectionSupervisors through this, so each test stops what it started even when it fails."""
    started: list[ConnectionSupervisor] = []

    def start(max_open: int = 100, **options: object) -> ConnectionSupervisor:
        conns = ConnectionSupervisor("connections", max_open, **options).start()
        started.append(conns)
        return conns

    yield start
    for conns in started:
        conns.stop()


def gauge(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def held(until: Event) -> None:
    until.wait()


def crash() -> None:
    raise Boom("bug in a session")


# ----- counting ---------------------------------------------------------------------


def test_counts_what_it_holds_and_drops_each_in_its_exit(supervise):
    conns = supervise()
    before = gauge("warren_connections")
    releases = [Event() for _ in range(10)]
    children = [conns.spawn(held, release) for release in releases]
    assert conns.open == 10 and gauge("warren_connections") == before + 10

    for release in releases[:4]:
        release.set()
    gevent.joinall(children[:4])

    assert conns.open == 6  # exact: the exit callback runs before the children's waiters wake
    assert gauge("warren_connections") == before + 6
    assert all(not child.dead for child in children[4:])


def test_spawn_works_in_the_hub(supervise):
    """gevent's accept callback runs in the hub, where spawn must neither block nor switch."""
    conns = supervise()
    spawned, ran = AsyncResult(), Event()

    def in_the_hub() -> None:
        try:
            spawned.set(conns.spawn(ran.set))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            spawned.set_exception(exc)

    gevent.get_hub().loop.run_callback(in_the_hub)
    child = spawned.get(timeout=5)
    assert ran.wait(timeout=5)
    wait_until(lambda: child.dead and conns.open == 0, interval=0.002)


# ----- the accept cap on real listeners ----------------------------------------------


class Listener:
    """A StreamServer whose connections each send their name, then hold until the client closes."""

    def __init__(self, served: list[str], spawn: object) -> None:
        self.served = served
        self.server = StreamServer(("127.0.0.1", 0), self._handle, spawn=spawn)  # port 0: the kernel picks

    def _handle(self, sock: socket.socket, _address: object) -> None:
        self.served.append(sock.recv(64).decode())
        while sock.recv(64):
            pass


class Loopback:
    """Listeners and the clients connected to them, all closed when the test ends."""

    def __init__(self) -> None:
        self.listeners: list[Listener] = []
        self.clients: dict[str, socket.socket] = {}
        self.control = self.listener([])  # uncapped: see let_listeners_run
        self.control.server.start()

    def listener(self, served: list[str], spawn: object = "default") -> Listener:
        listener = Listener(served, spawn)
        self.listeners.append(listener)
        return listener

    def connect(self, listener: Listener, name: str) -> None:
        client = socket.create_connection(("127.0.0.1", listener.server.server_port))
        client.sendall(name.encode())
        self.clients[name] = client

    def let_listeners_run(self) -> None:
        """Return once the control listener accepted a connection made after every earlier one."""
        name = f"control-{len(self.control.served)}"
        self.connect(self.control, name)
        wait_until(lambda: name in self.control.served, interval=0.002)

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        for listener in self.listeners:
            listener.server.close()


@pytest.fixture
def loopback() -> Iterator[Loopback]:
    net = Loopback()
    yield net
    net.close()


def test_full_pauses_every_listener_and_room_resumes_them(supervise, loopback):
    conns = supervise(max_open=3)
    served: list[str] = []
    first, second = loopback.listener(served), loopback.listener(served, spawn=conns.spawn)
    conns.add_listener(first.server)  # before start: add_listener sets its spawn
    first.server.start()
    second.server.start()
    conns.add_listener(second.server)
    for name in ("a1", "a2", "a3", "a4", "a5"):
        loopback.connect(first, name)

    wait_until(lambda: len(served) == 3, interval=0.002)
    loopback.connect(second, "b1")
    loopback.let_listeners_run()

    assert conns.open == 3 and conns.full  # the first listener stopped at the cap, and so did the second
    assert sorted(served) == ["a1", "a2", "a3"]
    assert gauge("warren_accept_paused") == 1

    loopback.clients[served[0]].close()  # one ends: room for exactly one more
    wait_until(lambda: len(served) == 4, interval=0.002)
    loopback.let_listeners_run()
    assert conns.open == 3 and len(served) == 4
    assert gauge("warren_accept_paused") == 1

    for name in served:  # closing never yields, so nothing is served meanwhile
        loopback.clients[name].close()
    wait_until(lambda: len(served) == 6, interval=0.002)  # the last two, once there was room
    assert sorted(served) == ["a1", "a2", "a3", "a4", "a5", "b1"]
    for name in served:
        loopback.clients[name].close()
    wait_until(lambda: conns.open == 0, interval=0.002)
    assert not conns.full and gauge("warren_accept_paused") == 0


def test_stopped_supervisor_leaves_its_listeners_paused(supervise, loopback):
    conns = supervise(max_open=3)
    served: list[str] = []
    listener = loopback.listener(served)
    listener.server.start()
    conns.add_listener(listener.server)
    loopback.connect(listener, "before")
    wait_until(lambda: served == ["before"], interval=0.002)

    conns.stop()
    loopback.connect(listener, "after")
    loopback.let_listeners_run()

    assert served == ["before"] and conns.open == 0 and conns.full
    with pytest.raises(RuntimeError, match="not running"):
        conns.spawn(held, Event())

    successor = supervise(max_open=3)
    successor.add_listener(listener.server)  # a restarted supervisor takes the listener over
    wait_until(lambda: served == ["before", "after"], interval=0.002)
    assert successor.open == 1


# ----- crashes ---------------------------------------------------------------------------


def test_a_crash_is_logged_and_reported_never_restarted(supervise, reporter, caplog):
    conns = supervise()
    calls: list[str] = []

    def crashing() -> None:
        calls.append("run")
        crash()

    bystander_release = Event()
    bystander = conns.spawn(held, bystander_release)
    killed = conns.spawn(held, Event())
    crashed = conns.spawn(crashing)
    killed.kill()  # GreenletExit is a normal end
    gevent.joinall([crashed, killed])

    assert conns.open == 1 and not bystander.dead
    wait_until(lambda: reporter.crashes, interval=0.002)
    bystander_release.set()
    conns.stop()  # makes every report queued before it exits
    assert reporter.crashes == [("connections", "connection", "Boom")]
    assert calls == ["run"] and reporter.restarts == []
    assert "supervisor connections: child connection crashed" in caplog.text
    assert "bug in a session" in caplog.text


def crash_in_cleanup() -> None:
    try:
        Event().wait()
    finally:
        crash()


@pytest.mark.parametrize("order", ["stop_then_crash", "crash_then_stop"])
def test_crashes_around_a_stop_are_still_reported(supervise, reporter, order):
    """A crash the stop request overtakes (one way or the other), and a crash in a connection's cleanup.

    gevent runs callbacks in the order they were scheduled, which fixes each interleaving.
    """
    conns = supervise()

    def stop_then_crash() -> None:  # the stop is handled before this child's exit callback runs
        conns.request_stop()
        crash()

    def crash_then_stop() -> None:  # its exit callback drops it before the stop is handled
        gevent.spawn(conns.request_stop)
        crash()

    cleanup = conns.spawn(crash_in_cleanup)
    child = conns.spawn(stop_then_crash if order == "stop_then_crash" else crash_then_stop)
    conns.join()

    assert isinstance(child.exception, Boom) and isinstance(cleanup.exception, Boom)
    assert reporter.crashes == [("connections", "connection", "Boom")] * 2


# ----- stopping ----------------------------------------------------------------------------


def test_stop_ends_every_connection(supervise):
    conns = supervise()
    before = gauge("warren_connections")
    children = [conns.spawn(held, Event()) for _ in range(100)]

    conns.stop()

    assert all(child.dead for child in children) and conns.open == 0
    assert gauge("warren_connections") == before
    assert conns.dead and conns.exception is None and conns.wait(timeout=0) is True


def ignore_greenlet_exit(running: Event, asked: Event) -> None:
    running.set()
    while True:
        try:
            Event().wait()
        except GreenletExit:
            asked.set()


def test_stop_gives_a_grace_then_kills(supervise):
    conns = supervise(shutdown=0.2)
    running, cleaned_up = [Event(), Event()], Event()

    def cleans_up() -> None:
        running[0].set()
        try:
            Event().wait()
        finally:
            gevent.sleep(0)  # cleanup that yields, as a goodbye frame's write would
            cleaned_up.set()

    polite = conns.spawn(cleans_up)
    asked = Event()
    stubborn = conns.spawn(ignore_greenlet_exit, running[1], asked)
    gevent.wait(running)  # a greenlet killed before it first runs never runs at all

    conns.stop()

    assert polite.successful() and cleaned_up.is_set()
    assert asked.is_set() and isinstance(stubborn.exception, ShutdownKill)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="^max_open "):
        ConnectionSupervisor("c", max_open=0)
    with pytest.raises(ValueError, match="^shutdown "):
        ConnectionSupervisor("c", max_open=1, shutdown="infinity")  # a worker's shutdown would never end


# ----- in a supervision tree ---------------------------------------------------------------


def test_as_a_child_of_one_for_one_its_crashes_never_charge_the_budget(reporter):
    worker_release = Event()

    def start_worker() -> gevent.Greenlet:
        return gevent.spawn(worker_release.wait)

    root = Supervisor("worker", "one_for_one", [
        ChildSpec("connections", lambda: ConnectionSupervisor("connections", 100).start(), type="supervisor",
                  shutdown="infinity"),
        ChildSpec("broker", start_worker),
    ], max_restarts=1, max_seconds=60).start()
    try:
        [(_, conns, kind), (_, broker, _)] = root.which_children()
        assert kind == "supervisor" and root.count_children()["supervisors"] == 1

        crashed = [conns.spawn(crash) for _ in range(50)]
        gevent.joinall(crashed)
        wait_until(lambda: len(reporter.crashes) == 50, interval=0.002)
        assert root.restarts_total == 0 and root.exception is None
        assert root.which_children()[0][1] is conns and conns.open == 0

        broker.kill(Boom("link down"))  # the budget is still there for the children it is for
        wait_until(lambda: root.restarts_total == 1, interval=0.002)
        assert reporter.restarts == ["broker"]

        held_children = [conns.spawn(held, Event()) for _ in range(20)]
    finally:
        root.stop()
    assert conns.dead and all(child.dead for child in held_children)
    assert root.wait(timeout=0) is True


def test_a_stopped_connection_supervisor_is_restarted_by_its_parent():
    root = Supervisor("worker", "one_for_one", [
        ChildSpec("connections", lambda: ConnectionSupervisor("connections", 100).start(), type="supervisor",
                  shutdown="infinity"),
    ], max_restarts=1, max_seconds=60).start()
    try:
        [(_, first, _)] = root.which_children()
        child = first.spawn(held, Event())
        first.stop()  # a permanent child that exits is restarted: a fresh supervisor, charged to the budget
        wait_until(lambda: root.restarts_total == 1, interval=0.002)
        [(_, second, _)] = root.which_children()
        assert second is not first and not second.dead and child.dead
        assert second.spawn(held, Event()) and second.open == 1
    finally:
        root.stop()
