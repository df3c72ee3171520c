"""How supervisors tell of crashes, restarts and give-ups: a log line, and one process-wide Reporter.

Every supervisor (app.supervision.supervisor.Supervisor, app.supervision.connections.ConnectionSupervisor)
reports through these functions, so app.sentry's one Reporter sees all of
them. A reporter hook runs in the supervisor's own greenlet, never in the hub,
since error tracking may do I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from app.supervision.childspec import SupervisorGaveUp

log = logging.getLogger("warren.supervisor")


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


def report_crash(supervisor: str, child_name: str, exc: BaseException) -> None:
    """A child crashed: log it with its traceback and tell the reporter."""
    log.error("supervisor %s: child %s crashed: %r", supervisor, child_name, exc, exc_info=exc)
    _notify(_reporter.crash, supervisor, child_name, exc)


def report_restart(supervisor: str, child_name: str) -> None:
    log.warning("supervisor %s: restarting child %s", supervisor, child_name)
    _notify(_reporter.restart, supervisor, child_name)


def report_gave_up(supervisor: str, exc: SupervisorGaveUp) -> None:
    log.error("supervisor %s gave up: %s", supervisor, exc)
    _notify(_reporter.gave_up, supervisor, exc)


def _notify(hook: Callable[..., None], *args: object) -> None:
    """Call a reporter hook: a broken reporter must never break supervision."""
    try:
        hook(*args)
    except Exception:
        log.exception("supervisor reporter hook %s failed", getattr(hook, "__name__", hook))
