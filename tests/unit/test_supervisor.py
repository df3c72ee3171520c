"""The generic supervisor's shutdown and API: stop order, grace periods, calls, reports, validation."""

from gevent import monkey

monkey.patch_all()

import logging
import time
from collections.abc import Callable, Iterator

import gevent
import pytest
from gevent import GreenletExit
from gevent.event import AsyncResult, Event
from supervisor_probe import Boom, Probe, RecordingReporter, settle, started_supervisors, wait_until

from app.supervision import ChildSpec, Reporter, ShutdownKill, Supervisor, set_reporter


@pytest.fixture
def supervise() -> Iterator[Callable[..., Supervisor]]:
    """Start supervisors through this, so each test stops what it started even when it fails."""
    yield from started_supervisors()


@pytest.fixture(autouse=True)
def default_reporter() -> Iterator[None]:
    yield
    set_reporter(None)


# ----- shutdown ---------------------------------------------------------------------


def test_stop_stops_children_in_reverse_start_order(supervise):
    probe = Probe()
    sup = supervise("s", children=[probe.spec(child_id) for child_id in "abcd"])
    exited = Event()
    sup.rawlink(lambda exiting: exiting is sup and exited.set())

    sup.stop("test")

    assert probe.stopped == ["d", "c", "b", "a"]
    assert sup.wait(timeout=5) is True and sup.exception is None
    assert exited.wait(timeout=5)
    assert [child for _, child, _ in sup.which_children()] == [None] * 4
    assert sup.restarts_total == 0


def ignore_greenlet_exit(asked: Event) -> None:
    while True:
        try:
            Event().wait()
        except GreenletExit:
            asked.set()


def test_child_ignoring_shutdown_is_killed_after_its_timeout(supervise, caplog):
    asked = Event()
    sup = supervise("s", children=[ChildSpec("stubborn", gevent.spawn, (ignore_greenlet_exit, asked), shutdown=0.2)])
    [(_, child, _)] = sup.which_children()

    began = time.monotonic()
    sup.stop()
    waited = time.monotonic() - began

    assert asked.is_set()  # it was asked first, and carried on
    assert waited >= 0.15  # then given its grace period (a timer fires no sooner)
    child.join()
    assert isinstance(child.exception, ShutdownKill)  # not a GreenletExit, which it would have caught
    assert "still running" in caplog.text


def block_then_clean_up(release: Event, cleaned_up: list[str], name: str) -> None:
    """A child whose cleanup, once it is asked to exit, takes until the test releases it."""
    try:
        Event().wait()
    finally:
        release.wait()
        cleaned_up.append(name)


def test_brutal_kill_does_not_wait_for_cleanup(supervise):
    release, cleaned_up = Event(), []
    probe = Probe()
    slow_spec = ChildSpec("slow", gevent.spawn, (block_then_clean_up, release, cleaned_up, "slow"))
    sup = supervise("s", children=[probe.spec("polite", shutdown="brutal_kill"), slow_spec])
    slow = sup.which_children()[1][1]
    sup.terminate_child("polite")
    assert probe.stopped == ["polite"]

    sup.delete_child("polite")
    brutal_args = (block_then_clean_up, release, cleaned_up, "brutal")
    brutal = sup.start_child(ChildSpec("slow-brutal", gevent.spawn, brutal_args, shutdown="brutal_kill"))
    with gevent.Timeout(5):  # waiting for the cleanup would wait for ever: release is not set
        sup.terminate_child("slow-brutal")
    brutal.join()
    assert isinstance(brutal.exception, ShutdownKill)  # killed in its cleanup, after one turn of the loop
    release.set()
    assert not slow.dead  # the other child was left alone
    sup.stop()
    assert cleaned_up == ["slow"]


def test_infinity_waits_for_a_child_supervisor_to_stop_its_children(supervise):
    cleaned_up = Event()

    def slow_cleanup() -> None:
        try:
            Event().wait()
        finally:
            gevent.sleep(0.05)  # cleanup that takes a while (a child's work, not the test waiting)
            cleaned_up.set()

    def start_branch() -> Supervisor:
        return Supervisor("branch", children=[ChildSpec("w", gevent.spawn, (slow_cleanup,), shutdown=3)]).start()

    root = supervise("root", children=[ChildSpec("branch", start_branch, type="supervisor", shutdown="infinity")])
    [(_, branch, _)] = root.which_children()

    root.stop()

    assert cleaned_up.is_set()
    assert branch.wait(timeout=0) is True


# ----- API ----------------------------------------------------------------------------


def test_start_terminate_restart_delete(supervise):
    probe = Probe()
    sup = supervise("s", children=[probe.spec("a")])
    b = sup.start_child(probe.spec("b", restart="transient"))
    assert b is probe.current["b"]
    with pytest.raises(ValueError, match="already has a child"):
        sup.start_child(probe.spec("b"))

    sup.terminate_child("b")
    assert probe.stopped == ["b"]
    assert sup.which_children() == [("a", probe.current["a"], "worker"), ("b", None, "worker")]
    assert sup.count_children() == {"specs": 2, "active": 1, "supervisors": 0, "workers": 2}

    again = sup.restart_child("b")
    assert again is probe.current["b"] and again is not b
    with pytest.raises(ValueError, match="running"):
        sup.restart_child("b")
    with pytest.raises(ValueError, match="running"):
        sup.delete_child("b")

    sup.terminate_child("b")
    sup.delete_child("b")
    assert [child_id for child_id, _, _ in sup.which_children()] == ["a"]
    with pytest.raises(KeyError):
        sup.terminate_child("b")
    with pytest.raises(KeyError):
        sup.restart_child("nope")
    assert sup.restarts_total == 0


def test_terminating_a_temporary_child_removes_its_spec(supervise):
    probe = Probe()
    sup = supervise("s", children=[probe.spec("t", restart="temporary")])
    sup.terminate_child("t")
    assert sup.which_children() == []


def test_count_children_counts_supervisors(supervise):
    probe = Probe()

    def start_branch() -> Supervisor:
        return Supervisor("branch", children=[probe.spec("w")]).start()

    sup = supervise("s", children=[probe.spec("a"), ChildSpec("branch", start_branch, type="supervisor")])
    assert sup.count_children() == {"specs": 2, "active": 2, "supervisors": 1, "workers": 1}
    assert [kind for _, _, kind in sup.which_children()] == ["worker", "supervisor"]


def test_simple_one_for_one_api(supervise):
    calls = []

    def start(*args: object) -> gevent.Greenlet:
        calls.append(args)
        return gevent.spawn(gevent.sleep, 10)

    sup = supervise("sessions", "simple_one_for_one", [ChildSpec("session", start, args=("cfg",), type="worker")])
    first = sup.start_child(1, 2)
    second = sup.start_child(3)
    assert calls == [("cfg", 1, 2), ("cfg", 3)]
    assert sup.which_children() == [("session", first, "worker"), ("session", second, "worker")]
    assert sup.count_children() == {"specs": 2, "active": 2, "supervisors": 0, "workers": 2}

    sup.terminate_child(first)
    assert first.dead
    assert sup.which_children() == [("session", second, "worker")]
    with pytest.raises(KeyError):
        sup.terminate_child(first)
    with pytest.raises(ValueError, match="simple_one_for_one"):
        sup.restart_child("session")
    with pytest.raises(ValueError, match="simple_one_for_one"):
        sup.delete_child("session")
    with pytest.raises(TypeError):
        Supervisor("s", children=[ChildSpec("a", start)]).start().start_child(1)


def test_crash_reports_name_dynamic_children_by_their_template(supervise):
    reporter = RecordingReporter()
    set_reporter(reporter)
    probe = Probe()
    sup = supervise("sessions", "simple_one_for_one", [ChildSpec("session", probe.start, restart="temporary")])
    x = sup.start_child("x")
    y = sup.start_child("y")
    probe.crash("x")
    probe.crash("y")
    settle(sup, x, y)
    assert reporter.events == [
        ("crash", "sessions", "session", "Boom"),
        ("crash", "sessions", "session", "Boom"),
    ]
    assert sup.count_children()["active"] == 0


def test_a_broken_reporter_does_not_break_supervision(supervise, caplog):
    class Broken(Reporter):
        def crash(self, supervisor: str, child_id: str, exc: BaseException) -> None:
            raise RuntimeError("reporter down")

    set_reporter(Broken())
    probe = Probe()
    sup = supervise("s", children=[probe.spec("a")])
    probe.crash("a")
    wait_until(lambda: probe.starts["a"] == 2)
    assert sup.restarts_total == 1
    assert "reporter hook" in caplog.text


def test_crashes_are_logged_with_supervisor_and_child(supervise, caplog):
    probe = Probe()
    supervise("conn-sup", children=[probe.spec("link")])
    with caplog.at_level(logging.ERROR, logger="warren.supervisor"):
        probe.crash("link")
        wait_until(lambda: probe.starts["link"] == 2)
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "conn-sup" in record.getMessage() and "link" in record.getMessage()


def test_failed_initial_start_stops_started_children_in_reverse_and_raises():
    probe = Probe()

    def fail() -> gevent.Greenlet:
        raise Boom("cannot start")

    sup = Supervisor("s", children=[probe.spec("a"), probe.spec("b"), ChildSpec("bad", fail), probe.spec("d")])
    with pytest.raises(Boom, match="cannot start"):
        sup.start()
    assert probe.stopped == ["b", "a"]
    assert "d" not in probe.starts
    assert sup.wait(timeout=5) is True


def test_calls_from_the_supervisors_own_greenlet_are_refused():
    sup = Supervisor("s", children=[ChildSpec("selfish", lambda: sup.start_child(ChildSpec("x", gevent.spawn)))])
    with pytest.raises(RuntimeError, match="own greenlet"):
        sup.start()


def test_calls_after_exit_are_refused():
    sup = Supervisor("s").start()
    sup.stop()
    sup.stop()  # idempotent
    with pytest.raises(RuntimeError, match="not running"):
        sup.start_child(ChildSpec("late", gevent.spawn, (gevent.sleep, 1)))


def test_start_function_must_return_a_started_greenlet():
    with pytest.raises(TypeError, match="started greenlet"):
        Supervisor("s", children=[ChildSpec("lazy", gevent.Greenlet, (gevent.sleep, 1))]).start()
    with pytest.raises(TypeError, match="started greenlet"):
        Supervisor("s", children=[ChildSpec("nothing", lambda: None)]).start()
    with pytest.raises(TypeError, match="started greenlet or supervisor"):
        Supervisor("s", children=[ChildSpec("unstarted", lambda: Supervisor("b"), type="supervisor")]).start()


@pytest.mark.parametrize(
    ("field", "options"),
    [
        ("id", {"id": ""}),
        ("start", {"start": "not callable"}),
        ("args", {"args": [1]}),
        ("restart", {"restart": "sometimes"}),
        ("shutdown", {"shutdown": -1}),
        ("shutdown", {"shutdown": "never"}),
        ("type", {"type": "manager"}),
    ],
)
def test_child_spec_validation_names_the_field(field, options):
    with pytest.raises(ValueError, match=f"^{field} "):
        ChildSpec(**{"id": "a", "start": gevent.spawn, **options})


@pytest.mark.parametrize(
    ("field", "args", "kwargs"),
    [
        ("strategy", ("s", "one_for_some"), {}),
        ("children", ("s", "simple_one_for_one"), {}),
        ("children", ("s", "simple_one_for_one", [ChildSpec("a", gevent.spawn)] * 2), {}),
        ("children", ("s", "one_for_one", [ChildSpec("a", gevent.spawn)] * 2), {}),
        ("max_restarts", ("s",), {"max_restarts": -1}),
        ("max_seconds", ("s",), {"max_seconds": 0}),
    ],
)
def test_supervisor_validation_names_the_field(field, args, kwargs):
    with pytest.raises(ValueError, match=f"^{field} "):
        Supervisor(*args, **kwargs)


def test_calls_from_the_hub_are_refused(supervise):
    """The hub may not wait: connection greenlets, started in gevent's accept callback, need ConnectionSupervisor."""
    sup = supervise("s", "simple_one_for_one", [ChildSpec("c", gevent.spawn, restart="temporary")])
    outcome = AsyncResult()

    def in_the_hub() -> None:
        try:
            sup.start_child(gevent.sleep, 1)
        except RuntimeError as exc:
            outcome.set(exc)

    gevent.get_hub().loop.run_callback(in_the_hub)
    assert "from the hub" in str(outcome.get(timeout=5))
    assert sup.count_children()["active"] == 0
