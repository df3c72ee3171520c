"""How a supervisor stops its children: ask, wait out the grace period, then kill.

A child's `shutdown` value (see app.supervision.childspec) is its grace period: a number
of seconds, "brutal_kill" (one turn of the event loop) or "infinity" (as long
as it takes, which is what a child supervisor needs to stop its own children).
"""

from __future__ import annotations

import logging

import gevent

from app.supervision.childspec import Child

log = logging.getLogger("warren.supervisor")


class ShutdownKill(BaseException):
    """Thrown into a child that outlived its shutdown grace period.

    Deliberately not a GreenletExit, so that the `except GreenletExit` handler
    which made the child ignore its first shutdown request does not catch it.
    """


def grace_seconds(shutdown: float | str) -> float | None:
    """brutal_kill gets one turn of the event loop; infinity waits forever (None)."""
    if shutdown == "brutal_kill":
        return 0
    if shutdown == "infinity":
        return None
    return float(shutdown)


def shut_down(children: list[Child], shutdown: float | str, supervisor: str) -> None:
    """Ask children to exit, wait out one shared grace period, then kill the stragglers and abandon them.

    Stragglers are greenlets that caught GreenletExit and carried on (or, for
    brutal_kill, were still cleaning up after one turn of the event loop).
    A child supervisor is never killed: it is left to finish stopping its own
    children in the background.
    """
    for child in children:
        _ask_to_exit(child)
    with gevent.Timeout(grace_seconds(shutdown), False):
        for child in children:
            child.join()
    stragglers = [child for child in children if not child.dead]
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
        if isinstance(child, gevent.Greenlet):
            child.kill(ShutdownKill, block=False)
    gevent.sleep(0)  # one turn of the loop, so the kills land before we go on


def _ask_to_exit(child: Child) -> None:
    if isinstance(child, gevent.Greenlet):
        child.kill(block=False)
    else:
        child.request_stop()
