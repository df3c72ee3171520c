"""Erlang/OTP-style supervision trees for gevent greenlets.

A Supervisor starts its children (greenlets, or child supervisors) from
ChildSpecs, watches them, and restarts them according to its strategy when
they exit. If restarts come too fast (more than `max_restarts` within
`max_seconds`) restarting is evidently not helping: the supervisor stops all
its children and exits with SupervisorGaveUp, which its own parent sees as a
crash of that child. Semantics follow Erlang's `supervisor` module.

How it runs: every Supervisor is an app.supervision.actor.Actor, whose one greenlet does
all of its work (child exits, API calls, shutdown) one queued job at a time,
so its state never changes under a running job and no locks are needed. Exit
callbacks run in the gevent hub, where nothing may block, so they only queue a
job; and every API call waits for the supervisor's greenlet, so none may come
from the hub. The children that gevent's accept callback starts, one per
connection, belong to app.supervision.connections.ConnectionSupervisor instead, which
starts and drops them in O(1) wherever it is called.

Child specs, restart types, shutdown values and the restart budget are in
app.supervision.childspec, how children are stopped in app.supervision.shutdown, and how
crashes are reported (Reporter, set_reporter) in app.supervision.reports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial

from app.supervision.actor import Actor
from app.supervision.childspec import (
    Child,
    ChildSpec,
    RestartBudget,
    SupervisorGaveUp,
    check_started,
    require,
    should_restart,
)
from app.supervision.reports import report_crash, report_gave_up, report_restart
from app.supervision.shutdown import shut_down

log = logging.getLogger("warren.supervisor")

STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one", "simple_one_for_one")


class Supervisor(Actor):
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
        _check_children(strategy, children)
        super().__init__(name)
        self.strategy = strategy
        self.restarts_total = 0
        self._budget = RestartBudget(max_restarts, max_seconds, clock)
        self._gave_up: SupervisorGaveUp | None = None
        dynamic = strategy == "simple_one_for_one"
        # simple_one_for_one: one template, no static specs; otherwise specs in start order.
        self._template: ChildSpec | None = children[0] if dynamic else None
        self._specs: dict[str, ChildSpec] = {} if dynamic else {spec.id: spec for spec in children}
        # Every running child -> the spec it was started from. A child is removed
        # from here *before* the supervisor stops it, so that exit is not a crash.
        self._running: dict[Child, ChildSpec] = {}

    # ----- public API -------------------------------------------------------

    def start(self) -> Supervisor:
        """Start the static children in order; if one fails, stop the others and raise its error."""
        self._start_greenlet()
        try:
            self._call(self._start_initial_children)
        except Exception:
            self.stop("a child failed to start")
            raise
        return self

    def start_child(self, *spec_or_args: object) -> Child:
        """Add and start a child: a ChildSpec, or for simple_one_for_one the extra start args."""
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
        """(id, child or None if not running, type) for every child, in start order.

        As in Erlang it is a call: answered in turn, after every exit the supervisor was told of before it.
        """
        return self._read(self._which_children)

    def count_children(self) -> dict[str, int]:
        """Erlang's count_children (a call, like which_children); for simple_one_for_one each running child is a spec."""
        return self._read(self._count_children)

    def stop(self, reason: object = None) -> None:
        """Stop children in reverse start order, then exit normally. Returns once all is down."""
        if self._greenlet:
            log.info("supervisor %s stopping (reason: %s)", self.name, reason)
        super().stop()

    @property
    def exception(self) -> BaseException | None:
        """SupervisorGaveUp once it gave up (or the error of a bug in the supervisor itself); else None."""
        return self._gave_up or super().exception

    # ----- the supervisor's greenlet ----------------------------------------

    def _handle_jobs(self) -> None:
        """Handle jobs until stopped or over budget; then Actor._serve has _wind_down stop the children."""
        try:
            super()._handle_jobs()
        except SupervisorGaveUp as exc:
            self._gave_up = exc
            report_gave_up(self.name, exc)

    def _wind_down(self) -> None:
        self._terminate_all()
        log.info("supervisor %s exited", self.name)

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
        check_started(child, spec.id)
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
        self._post(partial(self._handle_exit, child))

    def _handle_exit(self, child: Child) -> None:
        spec = self._running.pop(child, None)
        if spec is None:
            return  # we stopped it ourselves, or it was already replaced by a restart
        reason, name = child.exception, spec.id
        if reason is not None:
            report_crash(self.name, name, reason)
        if not should_restart(spec.restart, reason):
            if spec.restart == "temporary":
                self._specs.pop(spec.id, None)
            return
        self._charge_restart(name, reason)
        self._recover(spec)

    def _charge_restart(self, child_name: str, reason: BaseException | None) -> None:
        """Charge a restart to the budget; one more than it allows means giving up."""
        if not self._budget.charge():
            raise SupervisorGaveUp(self.name, child_name, reason) from reason
        self.restarts_total += 1
        report_restart(self.name, child_name)

    def _recover(self, failed: ChildSpec) -> None:
        """Restart per strategy; a start function that raises is one more crash, charged like any other."""
        while True:
            failure = self._start_in_order(self._take_down_for_restart(failed))
            if failure is None:
                return
            failed, exc = failure
            report_crash(self.name, failed.id, exc)
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
        shut_down([child], spec.shutdown, self.name)

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
        shut_down(children, self._template.shutdown, self.name)

    # ----- lookups ----------------------------------------------------------

    def _which_children(self) -> list[tuple[str, Child | None, str]]:
        if self._template is not None:
            return [(spec.id, child, spec.type) for child, spec in self._running.items()]
        running = self._running_by_id()
        return [(spec.id, running.get(spec.id), spec.type) for spec in self._specs.values()]

    def _count_children(self) -> dict[str, int]:
        if self._template is not None:
            total = len(self._running)
            supervisors = total if self._template.type == "supervisor" else 0
            return _counts(specs=total, active=total, supervisors=supervisors)
        supervisors = sum(spec.type == "supervisor" for spec in self._specs.values())
        return _counts(specs=len(self._specs), active=len(self._running), supervisors=supervisors)

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



# ----- helpers ----------------------------------------------------------------


def _check_children(strategy: str, children: Sequence[ChildSpec]) -> None:
    require(strategy in STRATEGIES, "strategy", f"one of {STRATEGIES}", strategy)
    require(all(isinstance(spec, ChildSpec) for spec in children), "children", "ChildSpecs", children)
    if strategy == "simple_one_for_one":
        require(len(children) == 1, "children", "exactly one template spec", children)
    ids = [spec.id for spec in children]
    require(len(set(ids)) == len(ids), "children", "specs with unique ids", ids)


def _counts(specs: int, active: int, supervisors: int) -> dict[str, int]:
    return {"specs": specs, "active": active, "supervisors": supervisors, "workers": specs - supervisors}

