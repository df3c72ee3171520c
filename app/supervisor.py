"""Erlang/OTP-style supervision trees for gevent greenlets.

A Supervisor starts its children (greenlets, or other Supervisors) from
ChildSpecs, watches them, and restarts them according to its strategy when
they exit. If restarts come too fast (more than `max_restarts` within
`max_seconds`) restarting is evidently not helping: the supervisor stops all
its children and exits with SupervisorGaveUp, which its own parent sees as a
crash of that child. Semantics follow Erlang's `supervisor` module.

How it runs: every Supervisor owns one greenlet that does all of its work
(child exits, API calls, shutdown) one queued job at a time, so its state
never changes under a running job and no locks are needed. Exit callbacks run
in the gevent hub, where nothing may block, so they only queue a job. The one
exception is a temporary simple_one_for_one child: it is never restarted, so
start_child starts it in the caller (even a hub callback, such as gevent's
accept) and its exit callback drops it from the children dict directly (both
O(1)), which keeps tens of thousands of short-lived session greenlets cheap.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TypeAlias

import gevent
from gevent.event import AsyncResult
from gevent.queue import Queue

log = logging.getLogger("warren.supervisor")

Child: TypeAlias = "gevent.Greenlet | Supervisor"

RESTART_TYPES = ("permanent", "transient", "temporary")
CHILD_TYPES = ("worker", "supervisor")
STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one", "simple_one_for_one")

_STOP = object()  # queued by stop(): the supervisor greenlet's signal to wind down


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


class _ShutdownKill(BaseException):
    """Thrown into a child that outlived its shutdown grace period.

    Deliberately not a GreenletExit, so that the `except GreenletExit` handler
    which made the child ignore its first shutdown request does not catch it.
    """


class Reporter:
    """The process-wide hook for crash metrics and error tracking.

    Subclass it and override what you need. Every method is a no-op here,
    because the supervisor already logs each of these events.
    """

    def crash(self, supervisor: str, child_id: str, exc: BaseException) -> None:
        """A child exited abnormally, or its start function raised during a restart."""

    def restart(self, supervisor: str, child_id: str) -> None:
        """A restart was charged to the budget and is being performed."""

    def gave_up(self, supervisor: str, exc: SupervisorGaveUp) -> None:
        """The supervisor exhausted its restart budget and is exiting."""


_reporter = Reporter()


def set_reporter(reporter: Reporter | None) -> None:
    """Install the process-wide reporter; None restores the silent default."""
    global _reporter
    _reporter = reporter if reporter is not None else Reporter()


def _notify(hook: Callable[..., None], *args: object) -> None:
    """Call a reporter hook: a broken reporter must never break supervision."""
    try:
        hook(*args)
    except Exception:
        log.exception("supervisor reporter hook %s failed", getattr(hook, "__name__", hook))


@dataclass(frozen=True)
class ChildSpec:
    """How to start one child and what to do when it exits (Erlang's child spec).

    `start(*args)` must return an already-started greenlet or a started
    Supervisor, and should return quickly: it runs in the supervisor's
    greenlet, which handles nothing else meanwhile.
    """

    id: str
    start: Callable[..., Child]
    args: tuple = ()
    restart: str = "permanent"
    shutdown: float | str = 5.0
    type: str = "worker"

    def __post_init__(self) -> None:
        _require(isinstance(self.id, str) and self.id != "", "id", "a non-empty string", self.id)
        _require(callable(self.start), "start", "callable", self.start)
        _require(isinstance(self.args, tuple), "args", "a tuple", self.args)
        _require(self.restart in RESTART_TYPES, "restart", f"one of {RESTART_TYPES}", self.restart)
        _require(
            _is_valid_shutdown(self.shutdown),
            "shutdown",
            "'brutal_kill', 'infinity' or a number of seconds >= 0",
            self.shutdown,
        )
        _require(self.type in CHILD_TYPES, "type", f"one of {CHILD_TYPES}", self.type)


def _require(ok: bool, field: str, expected: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{field} must be {expected}, got {value!r}")


def _is_valid_shutdown(shutdown: object) -> bool:
    if shutdown in ("brutal_kill", "infinity"):
        return True
    is_number = isinstance(shutdown, (int, float)) and not isinstance(shutdown, bool)
    return is_number and 0 <= shutdown < math.inf


def _should_restart(restart: str, reason: BaseException | None) -> bool:
    """permanent: always; transient: only after a crash; temporary: never."""
    return restart == "permanent" or (restart == "transient" and reason is not None)


class Supervisor:
    """Starts children, restarts them per its strategy, and gives up when restarts come too fast.

    `clock` exists so tests can drive the restart budget with a fake clock.
    """

    def __init__(
        self,
        name: str,
        strategy: str = "one_for_one",
        children: Sequence[ChildSpec] = (),
        max_restarts: int = 5,
        max_seconds: float = 5.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_supervisor_args(strategy, children, max_restarts, max_seconds)
        self.name = name
        self.strategy = strategy
        self.exception: SupervisorGaveUp | None = None
        self.restarts_total = 0
        self._max_restarts = max_restarts
        self._max_seconds = max_seconds
        self._clock = clock
        self._restart_times: deque[float] = deque()
        dynamic = strategy == "simple_one_for_one"
        # simple_one_for_one: one template, no static specs; otherwise specs in start order.
        self._template: ChildSpec | None = children[0] if dynamic else None
        self._specs: dict[str, ChildSpec] = {} if dynamic else {spec.id: spec for spec in children}
        # Every running child -> the spec it was started from. A child is removed
        # from here *before* the supervisor stops it, so that exit is not a crash.
        self._running: dict[Child, ChildSpec] = {}
        self._forget_in_hub = dynamic and children[0].restart == "temporary"
        self._inbox: Queue = Queue()
        self._greenlet = gevent.Greenlet(self._serve)

    # ----- public API -------------------------------------------------------

    def start(self) -> Supervisor:
        """Start the static children in order; if one fails, stop the others and raise its error."""
        if self._greenlet or self._greenlet.dead:
            raise RuntimeError(f"supervisor {self.name!r} was already started")
        self._greenlet.start()
        try:
            self._call(self._start_initial_children)
        except Exception:
            self.stop("a child failed to start")
            raise
        return self

    def start_child(self, *spec_or_args: object) -> Child:
        """Add and start a child: a ChildSpec, or for simple_one_for_one the extra start args."""
        if self._forget_in_hub:
            # Temporary dynamic children never involve the supervisor's loop again, so
            # start them right here: O(1), no switch, and callable from a hub callback
            # (gevent's accept callback starts one per connection).
            if not self._greenlet:
                raise RuntimeError(f"supervisor {self.name!r} is not running")
            return self._launch(self._template, spec_or_args)
        if self._template is not None:
            return self._call(self._start_dynamic_child, spec_or_args)
        if len(spec_or_args) != 1 or not isinstance(spec_or_args[0], ChildSpec):
            raise TypeError(f"{self.strategy} supervisors take exactly one ChildSpec")
        return self._call(self._add_child, spec_or_args[0])

    def terminate_child(self, id_or_child: str | Child) -> None:
        """Stop a child per its shutdown spec; its spec is kept (unless temporary) for restart_child."""
        self._call(self._terminate_child, id_or_child)

    def restart_child(self, child_id: str) -> Child:
        """Start again a child that was terminated and whose spec was kept."""
        self._refuse_if_dynamic("restart_child")
        return self._call(self._restart_child, child_id)

    def delete_child(self, child_id: str) -> None:
        """Forget the spec of a terminated child."""
        self._refuse_if_dynamic("delete_child")
        self._call(self._delete_child, child_id)

    def which_children(self) -> list[tuple[str, Child | None, str]]:
        """(id, child or None if not running, type) for every child, in start order."""
        if self._template is not None:
            return [(self._child_name(child, spec), child, spec.type) for child, spec in self._running.items()]
        running = self._running_by_id()
        return [(spec.id, running.get(spec.id), spec.type) for spec in self._specs.values()]

    def count_children(self) -> dict[str, int]:
        """Erlang's count_children; for simple_one_for_one each running child counts as a spec."""
        if self._template is not None:
            total = len(self._running)
            supervisors = total if self._template.type == "supervisor" else 0
            return _counts(specs=total, active=total, supervisors=supervisors)
        supervisors = sum(spec.type == "supervisor" for spec in self._specs.values())
        return _counts(specs=len(self._specs), active=len(self._running), supervisors=supervisors)

    def stop(self, reason: object = None) -> None:
        """Stop children in reverse start order, then exit normally. Returns once all is down."""
        self._refuse_own_greenlet()
        if not self._greenlet:  # never started, or already exited
            self._greenlet.kill()  # an unstarted supervisor must never start later
            return
        log.info("supervisor %s stopping (reason: %s)", self.name, reason)
        self._inbox.put(_STOP)
        self._greenlet.join()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the supervisor exits; raise SupervisorGaveUp if it gave up.

        Returns True once it has exited normally, False if the timeout expired first.
        """
        self._greenlet.join(timeout)
        if not self._greenlet.dead:
            return False
        if self.exception is not None:
            raise self.exception
        return True

    def rawlink(self, callback: Callable[[Supervisor], object]) -> None:
        """Call callback(self) in the hub once the supervisor has exited, like Greenlet.rawlink."""
        self._greenlet.rawlink(lambda _greenlet: callback(self))

    # ----- the supervisor's greenlet ----------------------------------------

    def _serve(self) -> None:
        """Body of the supervisor greenlet: handle jobs until stopped or over budget, then stop children."""
        try:
            self._handle_jobs()
        except SupervisorGaveUp as exc:
            self.exception = exc
            log.error("supervisor %s gave up: %s", self.name, exc)
            _notify(_reporter.gave_up, self.name, exc)
        finally:
            self._terminate_all()
        log.info("supervisor %s exited", self.name)

    def _handle_jobs(self) -> None:
        while (job := self._inbox.get()) is not _STOP:
            job()

    def _call(self, function: Callable[..., object], *args: object) -> object:
        """Run function(*args) as a job in the supervisor greenlet and return (or raise) its result."""
        self._refuse_own_greenlet()
        if not self._greenlet:
            raise RuntimeError(f"supervisor {self.name!r} is not running")
        reply = AsyncResult()
        self._inbox.put(partial(_run_for_caller, reply, function, args))
        gevent.wait([reply, self._greenlet], count=1)
        if not reply.ready():
            raise RuntimeError(f"supervisor {self.name!r} exited before handling the call")
        return reply.get()

    def _refuse_own_greenlet(self) -> None:
        """The supervisor greenlet would wait for itself forever (e.g. a start function calling stop)."""
        if gevent.getcurrent() is self._greenlet:
            raise RuntimeError(f"calling supervisor {self.name!r} from its own greenlet would deadlock")

    def _refuse_if_dynamic(self, operation: str) -> None:
        if self._template is not None:
            raise ValueError(f"{operation} is not supported by simple_one_for_one supervisors")

    # ----- starting ---------------------------------------------------------

    def _start_initial_children(self) -> None:
        failure = self._start_in_order(list(self._specs.values()))
        if failure is not None:
            spec, exc = failure
            log.error("supervisor %s: child %s failed to start: %r", self.name, spec.id, exc)
            raise exc

    def _start_in_order(self, specs: list[ChildSpec]) -> tuple[ChildSpec, Exception] | None:
        """Start specs in order; stop at the first start function that raises and return it."""
        for spec in specs:
            try:
                self._launch(spec)
            except Exception as exc:  # noqa: BLE001 - whatever a start function raises is a failed start
                return spec, exc
        return None

    def _launch(self, spec: ChildSpec, extra_args: tuple = ()) -> Child:
        """Call the start function and begin watching the child it returned."""
        child = spec.start(*spec.args, *extra_args)
        _check_started(child, spec.id)
        self._running[child] = spec
        child.rawlink(self._on_child_exit)
        return child

    def _add_child(self, spec: ChildSpec) -> Child:
        if spec.id in self._specs:
            raise ValueError(f"supervisor {self.name!r} already has a child with id {spec.id!r}")
        child = self._launch(spec)
        self._specs[spec.id] = spec
        return child

    def _start_dynamic_child(self, extra_args: tuple) -> Child:
        template = self._template
        if template.restart == "temporary":
            return self._launch(template, extra_args)  # never restarted: no need to keep its args
        return self._launch(replace(template, args=template.args + extra_args))

    def _restart_child(self, child_id: str) -> Child:
        spec = self._spec(child_id)
        if child_id in self._running_by_id():
            raise ValueError(f"child {child_id!r} of supervisor {self.name!r} is running")
        return self._launch(spec)

    # ----- exits and restarts -----------------------------------------------

    def _on_child_exit(self, child: Child) -> None:
        """Runs in the hub, where nothing may block: record the exit for the supervisor greenlet."""
        if self._forget_in_hub:
            self._forget_temporary(child)
        else:
            self._inbox.put(partial(self._handle_exit, child))

    def _forget_temporary(self, child: Child) -> None:
        """Drop an exited temporary dynamic child in O(1); only a crash report needs a job."""
        spec = self._running.pop(child, None)
        if spec is not None and child.exception is not None:
            name = self._child_name(child, spec)
            self._inbox.put(partial(self._report_crash, name, child.exception))

    def _handle_exit(self, child: Child) -> None:
        spec = self._running.pop(child, None)
        if spec is None:
            return  # we stopped it ourselves, or it was already replaced by a restart
        reason, name = child.exception, self._child_name(child, spec)
        if reason is not None:
            self._report_crash(name, reason)
        if not _should_restart(spec.restart, reason):
            if spec.restart == "temporary":
                self._specs.pop(spec.id, None)
            return
        self._charge_restart(name, reason)
        self._recover(spec)

    def _report_crash(self, child_name: str, exc: BaseException) -> None:
        log.error("supervisor %s: child %s crashed: %r", self.name, child_name, exc, exc_info=exc)
        _notify(_reporter.crash, self.name, child_name, exc)

    def _charge_restart(self, child_name: str, reason: BaseException | None) -> None:
        """Record a restart in the sliding window; more than max_restarts in it means giving up."""
        now = self._clock()
        window = self._restart_times
        window.append(now)
        while now - window[0] > self._max_seconds:
            window.popleft()
        if len(window) > self._max_restarts:
            raise SupervisorGaveUp(self.name, child_name, reason) from reason
        self.restarts_total += 1
        log.warning("supervisor %s: restarting child %s", self.name, child_name)
        _notify(_reporter.restart, self.name, child_name)

    def _recover(self, failed: ChildSpec) -> None:
        """Restart per strategy; a start function that raises is one more crash, charged like any other."""
        while True:
            failure = self._start_in_order(self._take_down_for_restart(failed))
            if failure is None:
                return
            failed, exc = failure
            self._report_crash(failed.id, exc)
            self._charge_restart(failed.id, exc)

    def _take_down_for_restart(self, failed: ChildSpec) -> list[ChildSpec]:
        """Stop the siblings the strategy restarts along with `failed`; return the specs to start.

        one_for_all takes every child, rest_for_one those started after `failed`.
        Siblings stop last-started first. Temporary siblings are never restarted,
        so their specs go (as in Erlang).
        """
        if self.strategy in ("one_for_one", "simple_one_for_one"):
            return [failed]
        ids = list(self._specs)
        first = 0 if self.strategy == "one_for_all" else ids.index(failed.id)
        group = [self._specs[child_id] for child_id in ids[first:]]
        running = self._running_by_id()
        for spec in reversed(group):
            if spec.id in running:
                self._terminate(running[spec.id])
            if spec.restart == "temporary":
                del self._specs[spec.id]
        return [spec for spec in group if spec.restart != "temporary"]

    # ----- stopping ---------------------------------------------------------

    def _terminate_child(self, id_or_child: str | Child) -> None:
        if self._template is not None:
            if id_or_child not in self._running:
                raise KeyError(f"{id_or_child!r} is not a running child of supervisor {self.name!r}")
            self._terminate(id_or_child)
            return
        spec = self._spec(id_or_child)
        child = self._running_by_id().get(spec.id)
        if child is not None:
            self._terminate(child)
        if spec.restart == "temporary":
            del self._specs[spec.id]

    def _delete_child(self, child_id: str) -> None:
        self._spec(child_id)
        if child_id in self._running_by_id():
            raise ValueError(f"child {child_id!r} of supervisor {self.name!r} is running")
        del self._specs[child_id]

    def _terminate(self, child: Child) -> None:
        """Forget the child first, so its exit is not taken for a crash, then stop it."""
        spec = self._running.pop(child)
        _shut_down([child], spec.shutdown, self.name)

    def _terminate_all(self) -> None:
        """Stop every child, last started first.

        Dynamic children are independent of each other, so (as in Erlang) they
        all get one shared grace period instead of one each in turn.
        """
        children = self._children_in_start_order()[::-1]
        if self._template is None:
            for child in children:
                self._terminate(child)
            return
        self._running.clear()
        _shut_down(children, self._template.shutdown, self.name)

    # ----- lookups ----------------------------------------------------------

    def _spec(self, child_id: str) -> ChildSpec:
        try:
            return self._specs[child_id]
        except KeyError:
            raise KeyError(f"supervisor {self.name!r} has no child {child_id!r}") from None

    def _running_by_id(self) -> dict[str, Child]:
        """Static children only: a dynamic supervisor's children would share the template's id."""
        return {spec.id: child for child, spec in self._running.items()}

    def _children_in_start_order(self) -> list[Child]:
        if self._template is not None:
            return list(self._running)
        running = self._running_by_id()
        return [running[child_id] for child_id in self._specs if child_id in running]

    def _child_name(self, child: Child, spec: ChildSpec) -> str:
        """Dynamic children may name themselves (child.child_id = "session:lock-1"); static ones use their spec id."""
        if self._template is None:
            return spec.id
        return getattr(child, "child_id", None) or spec.id


# ----- helpers ----------------------------------------------------------------


def _check_supervisor_args(strategy: str, children: Sequence[ChildSpec], max_restarts: int, max_seconds: float) -> None:
    _require(strategy in STRATEGIES, "strategy", f"one of {STRATEGIES}", strategy)
    _require(all(isinstance(spec, ChildSpec) for spec in children), "children", "ChildSpecs", children)
    if strategy == "simple_one_for_one":
        _require(len(children) == 1, "children", "exactly one template spec", children)
    ids = [spec.id for spec in children]
    _require(len(set(ids)) == len(ids), "children", "specs with unique ids", ids)
    _require(isinstance(max_restarts, int) and max_restarts >= 0, "max_restarts", "an int >= 0", max_restarts)
    _require(isinstance(max_seconds, (int, float)) and max_seconds > 0, "max_seconds", "a number > 0", max_seconds)


def _counts(specs: int, active: int, supervisors: int) -> dict[str, int]:
    return {"specs": specs, "active": active, "supervisors": supervisors, "workers": specs - supervisors}


def _run_for_caller(reply: AsyncResult, function: Callable[..., object], args: tuple) -> None:
    """A job: run function in the supervisor greenlet, hand result or error back to the caller."""
    try:
        reply.set(function(*args))
    except Exception as exc:  # noqa: BLE001 - handed to the caller, who re-raises it
        reply.set_exception(exc)


def _greenlet_of(child: Child) -> gevent.Greenlet:
    return child._greenlet if isinstance(child, Supervisor) else child


def _check_started(child: object, child_id: str) -> None:
    """An unstarted greenlet would never exit and the supervisor would wait on it forever."""
    greenlet = _greenlet_of(child) if isinstance(child, (gevent.Greenlet, Supervisor)) else None
    if greenlet is None or not (greenlet or greenlet.dead):
        raise TypeError(
            f"start function of child {child_id!r} must return a started greenlet or Supervisor, got {child!r}"
        )


def _ask_to_exit(child: Child) -> None:
    if isinstance(child, Supervisor):
        child._inbox.put(_STOP)
    else:
        child.kill(block=False)


def _grace_seconds(shutdown: float | str) -> float | None:
    """brutal_kill gets one turn of the event loop; infinity waits forever (None)."""
    if shutdown == "brutal_kill":
        return 0
    if shutdown == "infinity":
        return None
    return float(shutdown)


def _shut_down(children: list[Child], shutdown: float | str, supervisor: str) -> None:
    """Ask children to exit, wait out one shared grace period, then kill the stragglers and abandon them.

    Stragglers are greenlets that caught GreenletExit and carried on (or, for
    brutal_kill, were still cleaning up after one turn of the event loop).
    """
    for child in children:
        _ask_to_exit(child)
    with gevent.Timeout(_grace_seconds(shutdown), False):
        for child in children:
            _greenlet_of(child).join()
    stragglers = [child for child in children if not _greenlet_of(child).dead]
    if not stragglers:
        return
    if shutdown != "brutal_kill":
        log.warning(
            "supervisor %s: %d child(ren) still running %ss after shutdown request; killing and abandoning: %r",
            supervisor,
            len(stragglers),
            shutdown,
            stragglers[:5],
        )
    for child in stragglers:
        # A supervisor is left to finish stopping its own children in the background.
        if not isinstance(child, Supervisor):
            child.kill(_ShutdownKill, block=False)
    gevent.sleep(0)  # one turn of the loop, so the kills land before we go on
