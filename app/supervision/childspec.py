"""The vocabulary of supervision: child specs, restart types, shutdown values, the restart budget.

These are Erlang's terms (see the `supervisor` manual): a child spec says how
to start a child (`start`), whether to start it again after it exits
(`restart`: permanent, transient or temporary), how to stop it (`shutdown`:
seconds of grace, "brutal_kill" or "infinity") and what it is (`type`: a
worker, or a supervisor of its own children). A supervisor gives up once its
children exit faster than its restart budget allows.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, runtime_checkable

import gevent

RESTART_TYPES = ("permanent", "transient", "temporary")
CHILD_TYPES = ("worker", "supervisor")


@runtime_checkable
class ChildSupervisor(Protocol):
    """What a Supervisor needs of a child that supervises children of its own.

    A Supervisor provides it, and so does app.supervision.connections.ConnectionSupervisor:
    anything with these members can be returned by the start function of a
    `type="supervisor"` spec. Stopping it must stop all of its own children.
    """

    @property
    def exception(self) -> BaseException | None:
        """Why it exited: None after a normal stop, else the error its parent takes for a crash."""

    @property
    def started(self) -> bool:
        """start() has been called (it may have exited since)."""

    @property
    def dead(self) -> bool:
        """It has exited, and every child of its own is down."""

    def rawlink(self, callback: Callable[[Any], object]) -> None:
        """Call callback(self) in the hub once it has exited."""

    def request_stop(self) -> None:
        """Begin stopping its children and exiting; return at once."""

    def join(self, timeout: float | None = None) -> None:
        """Wait until it has exited or the timeout expired; never raises."""


Child: TypeAlias = "gevent.Greenlet | ChildSupervisor"


@dataclass(frozen=True)
class ChildSpec:
    """How to start one child and what to do when it exits (Erlang's child spec).

    `start(*args)` must return an already-started greenlet or a started
    ChildSupervisor, and should return quickly: it runs in the supervisor's
    greenlet, which handles nothing else meanwhile.
    """

    id: str
    start: Callable[..., Child]
    args: tuple = ()
    restart: str = "permanent"
    shutdown: float | str = 5.0
    type: str = "worker"

    def __post_init__(self) -> None:
        require(isinstance(self.id, str) and self.id != "", "id", "a non-empty string", self.id)
        require(callable(self.start), "start", "callable", self.start)
        require(isinstance(self.args, tuple), "args", "a tuple", self.args)
        require(self.restart in RESTART_TYPES, "restart", f"one of {RESTART_TYPES}", self.restart)
        require(
            is_valid_shutdown(self.shutdown),
            "shutdown",
            "'brutal_kill', 'infinity' or a number of seconds >= 0",
            self.shutdown,
        )
        require(self.type in CHILD_TYPES, "type", f"one of {CHILD_TYPES}", self.type)


def require(ok: bool, field: str, expected: str, value: object) -> None:
    """Refuse a bad argument with an error that starts with the field's name."""
    if not ok:
        raise ValueError(f"{field} must be {expected}, got {value!r}")


def is_valid_shutdown(shutdown: object) -> bool:
    if shutdown in ("brutal_kill", "infinity"):
        return True
    is_number = isinstance(shutdown, (int, float)) and not isinstance(shutdown, bool)
    return is_number and 0 <= shutdown < math.inf


def should_restart(restart: str, reason: BaseException | None) -> bool:
    """permanent: always; transient: only after a crash; temporary: never."""
    return restart == "permanent" or (restart == "transient" and reason is not None)


def check_started(child: object, child_id: str) -> None:
    """An unstarted child would never exit and its supervisor would wait on it forever."""
    if isinstance(child, gevent.Greenlet):
        started = bool(child) or child.dead
    else:
        started = isinstance(child, ChildSupervisor) and child.started
    if not started:
        raise TypeError(
            f"start function of child {child_id!r} must return a started greenlet or supervisor, got {child!r}"
        )


class SupervisorGaveUp(Exception):
    """Restarts exceeded the budget; the parent treats this as a crash of the supervisor."""

    def __init__(self, supervisor: str, child_id: str, reason: BaseException | None) -> None:
        super().__init__(
            f"supervisor {supervisor!r} gave up: restart budget exhausted "
            f"(last exit: child {child_id!r}, reason {reason!r})"
        )
        self.supervisor = supervisor
        self.child_id = child_id
        self.reason = reason


class RestartBudget:
    """Erlang's restart intensity: at most `max_restarts` restarts within any `max_seconds`.

    `clock` exists so tests can drive the window with a fake clock.
    """

    def __init__(self, max_restarts: int, max_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        require(isinstance(max_restarts, int) and max_restarts >= 0, "max_restarts", "an int >= 0", max_restarts)
        require(isinstance(max_seconds, (int, float)) and max_seconds > 0, "max_seconds", "a number > 0", max_seconds)
        self._max_restarts = max_restarts
        self._max_seconds = max_seconds
        self._clock = clock
        self._times: deque[float] = deque()

    def charge(self) -> bool:
        """Record one restart now in the sliding window; False if that is one more than the budget allows."""
        now = self._clock()
        window = self._times
        window.append(now)
        while now - window[0] > self._max_seconds:
            window.popleft()
        return len(window) <= self._max_restarts
