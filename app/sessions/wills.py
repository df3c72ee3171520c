"""Wills: the event a session publishes for its device when it ends without the device's goodbye.

A will goes out at once, before the `session.closed` presence event (PROTOCOL.md
section 8), unless its transport asks for a delay (MQTT 5's Will Delay Interval,
section 9): then it is held for that many seconds, at most HEARTBEAT x 2, after
`session.closed`, and dropped if a new session of the device starts meanwhile.
Anywhere: here the registry sees a new session of the device open; on another
worker or host the device's partition owner sees its claim, and because the
release of the ended session said how long its will is held, the owner tells us
`replaced` for that ended session (app/broker/directory.py), which drops the will.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, NamedTuple

import gevent

from app import metrics

if TYPE_CHECKING:
    from app.sessions.ports import Backend, EventProperties


class Will(NamedTuple):
    """A session's will: the event it publishes, with what its transport adds to the AMQP message (MQTT 5's
    Message Expiry Interval and User Properties, as an event's, PROTOCOL.md section 9)."""

    name: str
    data: Any
    properties: EventProperties | None = None


def publish_will(backend: Backend, device: str, session_id: str, will: Will) -> None:
    """The will as the device's event; its id names the session, so that a backend sees one per session."""
    backend.publish_event(device, session_id, will.name, f"will-{session_id}", will.data, _count_will,
                          will.properties)


def _count_will(outcome: str | None) -> None:
    metrics.EVENTS.labels(outcome="acked" if outcome is None else outcome).inc()


class DelayedWills:
    """Wills held back by their delay, by device and ended session; each a timer greenlet of its own."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._held: dict[str, dict[str, gevent.Greenlet]] = {}  # device -> session id -> its timer

    def __len__(self) -> int:
        return sum(len(by_session) for by_session in self._held.values())

    def hold(self, device: str, session_id: str, will: Will, delay: float) -> float:
        """Publish `will` in `delay` seconds unless cancelled; returns when (wall clock), for the release."""
        timer = gevent.spawn_later(delay, self._due, device, session_id, will)
        self._held.setdefault(device, {})[session_id] = timer
        return time.time() + delay

    def cancel(self, device: str, session_id: str) -> bool:
        """A new session of `device` started somewhere: the ended session's will is not published."""
        by_session = self._held.get(device)
        timer = by_session.pop(session_id, None) if by_session else None
        if by_session is not None and not by_session:
            del self._held[device]
        if timer is None:
            return False
        timer.kill(block=False)
        metrics.EVENTS.labels(outcome="will_cancelled").inc()
        return True

    def cancel_device(self, device: str) -> None:
        """A new session of `device` opened here: every will held for it goes."""
        for session_id in list(self._held.get(device, ())):
            self.cancel(device, session_id)

    def _due(self, device: str, session_id: str, will: Will) -> None:
        by_session = self._held.get(device)
        if by_session is None or by_session.pop(session_id, None) is None:
            return
        if not by_session:
            del self._held[device]
        publish_will(self.backend, device, session_id, will)
