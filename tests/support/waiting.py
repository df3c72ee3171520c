"""How long the tests wait, and how they wait: generously (the machine is shared), polling, never asserting a duration."""

from __future__ import annotations

import time

import pytest

WAIT = 15.0  # generous: the machine is shared


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll until predicate() is truthy; return its value, or fail the test naming the predicate."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"condition not met within {timeout}s: {getattr(predicate, '__name__', predicate)}")
