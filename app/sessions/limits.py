"""The token bucket behind every rate limit (events per session, hellos per worker)."""

from __future__ import annotations

import time


class TokenBucket:
    """At most `rate` takes a second on average, `burst` at once."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def wait_time(self) -> float:
        """Seconds until the next take succeeds."""
        return max(0.0, (1 - self.tokens) / self.rate)
