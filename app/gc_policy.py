"""The worker's garbage-collection policy: held sessions out of the cyclic GC's walk.

Python's cyclic GC walks every tracked object of a generation, and held sessions
are long-lived objects: at 20,000 sessions a worker paused 10-70 ms for the
middle generation and 325 ms for the oldest, every few seconds, and found
nothing (sessions make no reference cycles; reference counting frees them). So
every second the objects that survived are frozen out of the GC's walk
(gc.freeze: O(1), and frozen objects are still freed by reference counting), and
once an hour everything is collected, in case some rare cycle (an exception's
traceback) was frozen.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("warren.gc")

FULL_EVERY = 3600.0


class GcPolicy:
    """Call `tick()` about once a second from the worker's main loop."""

    def __init__(self, full_every: float = FULL_EVERY) -> None:
        self.full_every = full_every
        self.next_full = time.monotonic() + full_every

    def tick(self) -> None:
        gc.freeze()
        if time.monotonic() >= self.next_full:
            self.full_collection()
            self.next_full = time.monotonic() + self.full_every

    @staticmethod
    def full_collection() -> None:
        started = time.monotonic()
        gc.unfreeze()
        found = gc.collect()
        log.info("full garbage collection: %d objects in cycles, %.0f ms", found,
                 (time.monotonic() - started) * 1000)
