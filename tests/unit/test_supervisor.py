"""The generic supervisor (app/supervisor.py): strategies, restart types, the budget, shutdown, its API.

No test sleeps to let a supervisor catch up: `settle` waits for the children's
exits and then makes a call, which the supervisor answers only after handling
every exit it was told of before it.
"""

from gevent import monkey

monkey.patch_all()

import logging
import time
from collections import Counter

import gevent
import pytest
from gevent import GreenletExit
from gevent.event import AsyncResult, Event
from hypothesis import given, settings
from hypothesis import strategies as st

from app.child_shutdown import ShutdownKill
from app.supervisor import ChildSpec, Reporter, Supervisor, SupervisorGaveUp, set_reporter

STATIC_STRATEGIES = ["one_for_one", "one_for_all", "rest_for_one"]
RESTART_TYPES = ["permanent", "transient", "temporary"]


class Boom(Exception):
    """The crash test children raise when told to."""


class Probe:
    """Start functions for test children, and a record of what happened to them.

    Each child blocks until the test tells it to finish (exit normally) or to
    crash; a child stopped by its supervisor records its id in `stopped`.
    """

    def __init__(self) -> None:
        self.starts: Counter[str] = Counter()
        self.current: dict[str, gevent.Greenlet] = {}  # child id -> its latest greenlet
        self.stopped: list[str] = []  # ids of children that got GreenletExit, in order

    def spec(self, child_id: str, **options: object) -> ChildSpec:
        return ChildSpec(child_id, self.start, args=(child_id,), **options)

    def start(self, child_id: str) -> gevent.Greenlet:
        self.starts[child_id] += 1
        child = gevent.spawn(self._run, child_id)
        child.outcome = AsyncResult()
        self.current[child_id] = child
        return child

    def _run(self, child_id: str) -> None:
        outcome = gevent.getcurrent().outcome
        try:
            error = outcome.get()
        except GreenletExit:
            self.stopped.append(child_id)
            raise
        if error is not None:
            raise error

    def finish(self, child_id: str) -> None:
        self.current[child_id].outcome.set(None)

    def crash(self, child_id: str) -> None:
        self.current[child_id].outcome.set(Boom(child_id))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class RecordingReporter(Reporter):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def crash(self, supervisor: str, child_id: str, exc: BaseException) -> None:
        self.events.append(("crash", supervisor, child_id, type(exc).__name__))

    def restart(self, supervisor: str, child_id: str) -> None:
        self.events.append(("restart", supervisor, child_id))

    def gave_up(self, supervisor: str, exc: SupervisorGaveUp) -> None:
        self.events.append(("gave_up", supervisor, exc.child_id))


def settle(sup: Supervisor, *exited: gevent.Greenlet) -> None:
    """Wait until these children have exited and the supervisor has handled their exits (and all it did then)."""
    gevent.joinall(exited)
    sup.count_children()  # a call: queued behind the exits, which the hub queued as the children died


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for condition"
        gevent.sleep(0.002)


def should_restart(restart: str, crash: bool) -> bool:
    return restart == "permanent" or (restart == "transient" and crash)


@pytest.fixture
def supervise():
    """Start supervisors through this, so each test stops what it started even when it fails."""
    started: list[Supervisor] = []

    def start(*args: object, **kwargs: object) -> Supervisor:
        sup = Supervisor(*args, **kwargs).start()
        started.append(sup)
        return sup

    yield start
    for sup in reversed(started):
        sup.stop()


@pytest.fixture(autouse=True)
def default_reporter():
    yield
    set_reporter(None)


# ----- strategies x restart types -------------------------------------------------

# When child b of [a, b, c] is restarted: which children start again, and which
# the supervisor stops first (in that order).
RESTART_EFFECTS = {
    "one_for_one": (["b"], []),
    "one_for_all": (["a", "b", "c"], ["c", "a"]),
    "rest_for_one": (["b", "c"], ["c"]),
}


@pytest.mark.parametrize("crash", [False, True], ids=["normal_exit", "crash"])
@pytest.mark.parametrize("restart", RESTART_TYPES)
@pytest.mark.parametrize("strategy", STATIC_STRATEGIES)
def test_static_strategy_restarts_exactly_the_right_children(supervise, strategy, restart, crash):
    probe = Probe()
    sup = supervise("s", strategy, [probe.spec("a"), probe.spec("b", restart=restart), probe.spec("c")])
    first = dict(probe.current)

    (probe.crash if crash else probe.finish)("b")
    settle(sup, first["b"])

    restarted, stopped = RESTART_EFFECTS[strategy] if should_restart(restart, crash) else ([], [])
    assert probe.starts == Counter("abc") + Counter(restarted)
    assert probe.stopped == stopped
    assert sup.restarts_total == (1 if restarted else 0)
    for child_id in "ac":
        assert (probe.current[child_id] is first[child_id]) == (child_id not in restarted)
    running = {child_id: child for child_id, child, _ in sup.which_children()}
    if restart == "temporary":
        assert list(running) == ["a", "c"]  # a temporary child's spec goes when it exits
    else:
        assert list(running) == ["a", "b", "c"]
        assert running["b"] is (probe.current["b"] if restarted else None)
    assert all(running[child_id] is probe.current[child_id] for child_id in "ac")


@pytest.mark.parametrize("crash", [False, True], ids=["normal_exit", "crash"])
@pytest.mark.parametrize("restart", RESTART_TYPES)
def test_simple_one_for_one_restarts_only_the_exited_child(supervise, restart, crash):
    probe = Probe()
    sup = supervise("s", "simple_one_for_one", [ChildSpec("session", probe.start, restart=restart)])
    children = {child_id: sup.start_child(child_id) for child_id in "abc"}

    (probe.crash if crash else probe.finish)("b")
    settle(sup, children["b"])

    restarted = should_restart(restart, crash)
    assert probe.starts == Counter("abc") + Counter("b" if restarted else "")  # same args again
    assert probe.stopped == []
    assert sup.restarts_total == int(restarted)
    assert probe.current["a"] is children["a"] and probe.current["c"] is children["c"]
    expected = [children["a"], children["c"]] + ([probe.current["b"]] if restarted else [])
    assert [child for _, child, _ in sup.which_children()] == expected
    assert sup.count_children()["active"] == len(expected)


def test_one_for_all_does_not_restart_temporary_siblings(supervise):
    probe = Probe()
    sup = supervise(
        "s",
        "one_for_all",
        [probe.spec("a", restart="temporary"), probe.spec("b"), probe.spec("c", restart="transient")],
    )
    crashed = probe.current["b"]
    probe.crash("b")
    settle(sup, crashed)
    assert probe.stopped == ["c", "a"]
    assert probe.starts == Counter(a=1, b=2, c=2)
    assert [child_id for child_id, _, _ in sup.which_children()] == ["b", "c"]


def test_rest_for_one_keeps_children_started_before(supervise):
    probe = Probe()
    sup = supervise("s", "rest_for_one", [probe.spec(child_id) for child_id in "abcd"])
    crashed = probe.current["b"]
    probe.crash("b")
    settle(sup, crashed)
    assert probe.stopped == ["d", "c"]
    assert probe.starts == Counter(a=1, b=2, c=2, d=2)
    assert [child for _, child, _ in sup.which_children()] == [probe.current[i] for i in "abcd"]


# ----- the restart budget ---------------------------------------------------------


def crash_and_wait_for_restart(probe: Probe, sup: Supervisor, child_id: str) -> None:
    starts = probe.starts.total()
    probe.crash(child_id)
    wait_until(lambda: probe.starts.total() > starts or sup.exception is not None)


def test_restart_beyond_max_restarts_within_window_gives_up(supervise):
    clock, probe = FakeClock(), Probe()
    sup = supervise("s", children=[probe.spec("a")], max_restarts=3, max_seconds=5, clock=clock)
    for _ in range(3):
        clock.now += 1
        crash_and_wait_for_restart(probe, sup, "a")
    assert sup.restarts_total == 3 and sup.exception is None

    clock.now += 1
    probe.crash("a")
    with pytest.raises(SupervisorGaveUp):
        sup.wait(timeout=5)
    assert isinstance(sup.exception, SupervisorGaveUp)
    assert sup.restarts_total == 3
    assert probe.starts["a"] == 4


def test_restarts_spread_over_time_never_give_up(supervise):
    clock, probe = FakeClock(), Probe()
    sup = supervise("s", children=[probe.spec("a")], max_restarts=3, max_seconds=5, clock=clock)
    for _ in range(10):
        clock.now += 2  # at most 3 restarts in any 5 seconds
        crash_and_wait_for_restart(probe, sup, "a")
    assert sup.exception is None
    assert sup.restarts_total == 10


def test_temporary_exits_never_count(supervise):
    static_probe, dynamic_probe = Probe(), Probe()
    static = supervise("static", children=[static_probe.spec("t", restart="temporary")], max_restarts=0)
    dynamic = supervise(
        "dynamic",
        "simple_one_for_one",
        [ChildSpec("t", dynamic_probe.start, restart="temporary")],
        max_restarts=0,
    )
    static_probe.crash("t")
    children = [dynamic.start_child(f"t{index}") for index in range(10)]
    for index in range(10):
        dynamic_probe.crash(f"t{index}")
    settle(static, static_probe.current["t"])
    settle(dynamic, *children)
    for sup in (static, dynamic):
        assert sup.exception is None and sup.restarts_total == 0
        assert sup.count_children()["active"] == 0
    assert static.which_children() == []


def test_normal_exits_of_transient_children_never_count(supervise):
    probe = Probe()
    static = supervise("static", children=[probe.spec("t", restart="transient")], max_restarts=0)
    dynamic = supervise(
        "dynamic", "simple_one_for_one", [ChildSpec("t", probe.start, restart="transient")], max_restarts=0
    )
    static_child = probe.current["t"]
    probe.finish("t")
    children = [dynamic.start_child(f"t{index}") for index in range(10)]
    for index in range(10):
        probe.finish(f"t{index}")
    settle(static, static_child)
    settle(dynamic, *children)
    for sup in (static, dynamic):
        assert sup.exception is None and sup.restarts_total == 0
    assert static.which_children() == [("t", None, "worker")]


def reference_budget(schedule: list[tuple[int, int]], max_restarts: int, max_seconds: int) -> tuple[bool, int]:
    """The sliding window, written the obvious way: (gave up?, restarts performed)."""
    now, restart_times, performed = 0, [], 0
    for delay, _ in schedule:
        now += delay
        restart_times = [t for t in restart_times if now - t <= max_seconds] + [now]
        if len(restart_times) > max_restarts:
            return True, performed
        performed += 1
    return False, performed


@settings(max_examples=60, deadline=None)
@given(
    strategy=st.sampled_from(STATIC_STRATEGIES),
    max_restarts=st.integers(0, 4),
    max_seconds=st.integers(1, 5),
    schedule=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2)), max_size=12),
)
def test_budget_matches_a_sliding_window_model(strategy, max_restarts, max_seconds, schedule):
    clock, probe = FakeClock(), Probe()
    sup = Supervisor(
        "prop",
        strategy,
        [probe.spec(f"c{index}") for index in range(3)],
        max_restarts=max_restarts,
        max_seconds=max_seconds,
        clock=clock,
    ).start()
    for delay, index in schedule:
        clock.now += delay
        crash_and_wait_for_restart(probe, sup, f"c{index}")
        if sup.exception is not None:
            break
    gave_up, restarts = reference_budget(schedule, max_restarts, max_seconds)
    assert (sup.exception is not None) == gave_up
    assert sup.restarts_total == restarts
    if gave_up:
        with pytest.raises(SupervisorGaveUp):
            sup.wait(timeout=5)
    else:
        sup.stop()
        assert sup.wait(timeout=5) is True


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


# ----- escalation inside one process ----------------------------------------------------


def test_child_supervisor_giving_up_is_a_crash_for_its_parent(supervise):
    reporter = RecordingReporter()
    set_reporter(reporter)
    probe = Probe()

    def start_branch() -> Supervisor:
        return Supervisor("branch", children=[probe.spec("w")], max_restarts=0).start()

    root = supervise("root", children=[ChildSpec("branch", start_branch, type="supervisor")], max_restarts=5)
    [(_, first_branch, _)] = root.which_children()
    probe.crash("w")
    with pytest.raises(SupervisorGaveUp):
        first_branch.wait(timeout=5)
    wait_until(lambda: probe.starts["w"] == 2)

    assert root.restarts_total == 1
    assert root.which_children()[0][1] is not first_branch
    assert ("gave_up", "branch", "w") in reporter.events
    assert ("crash", "root", "branch", "SupervisorGaveUp") in reporter.events
    assert ("restart", "root", "branch") in reporter.events


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
    second.child_id = "session:lock-1"
    assert calls == [("cfg", 1, 2), ("cfg", 3)]
    assert sup.which_children() == [("session", first, "worker"), ("session:lock-1", second, "worker")]
    assert sup.count_children() == {"specs": 2, "active": 2, "supervisors": 0, "workers": 2}

    sup.terminate_child(first)
    assert first.dead
    assert sup.which_children() == [("session:lock-1", second, "worker")]
    with pytest.raises(KeyError):
        sup.terminate_child(first)
    with pytest.raises(ValueError, match="simple_one_for_one"):
        sup.restart_child("session")
    with pytest.raises(ValueError, match="simple_one_for_one"):
        sup.delete_child("session")
    with pytest.raises(TypeError):
        Supervisor("s", children=[ChildSpec("a", start)]).start().start_child(1)


def test_crash_reports_name_dynamic_children(supervise):
    reporter = RecordingReporter()
    set_reporter(reporter)
    probe = Probe()
    sup = supervise("sessions", "simple_one_for_one", [ChildSpec("session", probe.start, restart="temporary")])
    x = sup.start_child("x")
    x.child_id = "session:lock-1"
    y = sup.start_child("y")
    probe.crash("x")
    probe.crash("y")
    settle(sup, x, y)
    assert reporter.events == [
        ("crash", "sessions", "session:lock-1", "Boom"),
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


def test_failing_restarts_count_against_the_budget():
    reporter = RecordingReporter()
    set_reporter(reporter)
    attempts = Counter()

    def start_once() -> gevent.Greenlet:
        attempts["w"] += 1
        if attempts["w"] > 1:
            raise Boom("restart failed")
        return gevent.spawn(lambda: 1 / 0)

    sup = Supervisor("s", children=[ChildSpec("w", start_once)], max_restarts=3, max_seconds=60).start()
    with pytest.raises(SupervisorGaveUp):
        sup.wait(timeout=5)
    assert attempts["w"] == 4  # the first start, then 3 restarts that failed
    assert [event[0] for event in reporter.events] == ["crash", "restart"] * 3 + ["crash", "gave_up"]


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
