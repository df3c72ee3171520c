"""The generic supervisor's restarts: strategies x restart types, the restart budget, escalation."""

from gevent import monkey

monkey.patch_all()

from collections import Counter
from collections.abc import Callable, Iterator

import gevent
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from supervisor_probe import (
    RESTART_TYPES,
    STATIC_STRATEGIES,
    Boom,
    FakeClock,
    Probe,
    RecordingReporter,
    crash_and_wait_for_restart,
    settle,
    should_restart,
    started_supervisors,
    wait_until,
)

from app.supervision import ChildSpec, Supervisor, SupervisorGaveUp, set_reporter


@pytest.fixture
def supervise() -> Iterator[Callable[..., Supervisor]]:
    """Start supervisors through this, so each test stops what it started even when it fails."""
    yield from started_supervisors()


@pytest.fixture(autouse=True)
def default_reporter() -> Iterator[None]:
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
