"""One sweep per worker for every session's deadline, instead of a timer per read.

Why: a held session reads forever; with a socket timeout, every frame it
receives arms and cancels a gevent timer, and at 200,000 devices heartbeating
that is most of what a quiet gateway does. Instead each session stamps its own
`deadline` (a float: time.monotonic() plus its allowance) when a frame arrives,
and this one greenlet per worker sweeps the stamps on a coarse tick and expires
whoever is past theirs. Precision is the tick, a tenth of the shortest
allowance: an idle cut due after 60 s comes within 61 s, a hello timeout of
10 s within 11 s.
"""

from __future__ import annotations

import time
from typing import Protocol

import gevent


class Watched(Protocol):
    deadline: float

    def expire(self) -> None: ...


MIN_TICK, MAX_TICK = 0.05, 1.0


class Watchdog:
    """The deadlines of this worker's sessions; `run` is its greenlet's body."""

    def __init__(self, shortest_allowance: float) -> None:
        self.tick = min(MAX_TICK, max(MIN_TICK, shortest_allowance / 10))
        self._watched: dict[Watched, None] = {}  # a dict, not a set: O(1) and insertion-ordered

    def __len__(self) -> int:
        return len(self._watched)

    def watch(self, session: Watched) -> None:
        self._watched[session] = None

    def forget(self, session: Watched) -> None:
        self._watched.pop(session, None)

    def sweep(self, now: float) -> int:
        """Expire every session past its deadline; returns how many."""
        late = [session for session in self._watched if session.deadline <= now]
        for session in late:
            self._watched.pop(session, None)  # expired once; it ends by itself from here
            session.expire()
        return len(late)

    def run(self) -> None:
        while True:
            gevent.sleep(self.tick)
            self.sweep(time.monotonic())
