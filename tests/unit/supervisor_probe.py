"""Test children, clocks and reporters for the supervisor tests, and `settle`.

No test sleeps to let a supervisor catch up: `settle` waits for the children's
exits and then makes a call, which the supervisor answers only after handling
every exit it was told of before it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator

import gevent
from gevent import GreenletExit
from gevent.event import AsyncResult

from app.supervision import ChildSpec, Reporter, Supervisor, SupervisorGaveUp

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


def crash_and_wait_for_restart(probe: Probe, sup: Supervisor, child_id: str) -> None:
    starts = probe.starts.total()
    probe.crash(child_id)
    wait_until(lambda: probe.starts.total() > starts or sup.exception is not None)


def started_supervisors() -> Iterator[Callable[..., Supervisor]]:
    """The body of each test module's `supervise` fixture: start supervisors, and stop them all afterwards."""
    started: list[Supervisor] = []

    def start(*args: object, **kwargs: object) -> Supervisor:
        sup = Supervisor(*args, **kwargs).start()
        started.append(sup)
        return sup

    try:
        yield start
    finally:
        for sup in reversed(started):
            sup.stop()
