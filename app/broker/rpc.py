"""The HTTP API's side of commands: publish one, and resolve its result from whatever answers first.

This is the backend's role played inside the gateway (any worker serves the command
API for any device, PROTOCOL.md section 6), kept apart from the device side. A
command goes out mandatory with `reply_to` this worker's own queue; the device's
reply comes back there (the consumer hands it here by correlation id). A command no
worker holds is returned by RabbitMQ at once: `offline`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import AsyncResult

from app.broker.messages import COMMAND, command_body, decode_reply
from app.broker.publisher import Publisher

log = logging.getLogger("warren.broker")

# A result nobody answered is resolved this long after its timeout, so that the caller's own
# wait of `timeout` ends first and the waiting entry is never left behind.
ABANDON_GRACE = 1.0


class RpcClient:
    """Commands sent through `publisher`, their replies expected on the queue `reply_to()` names."""

    def __init__(self, publisher: Publisher, reply_to: Callable[[], str]) -> None:
        self._publisher = publisher
        self._reply_to = reply_to
        self._waiting: dict[str, AsyncResult] = {}

    def send_command(self, device: str, name: str, data: Any, timeout: float) -> AsyncResult:
        """Publish a command; the result gets the device's reply as {"ok", "data", "error"}.

        Without a reply it resolves as `offline` (no worker holds the device),
        `broker_unavailable` (RabbitMQ did not take it), or `timeout` shortly after
        `timeout` seconds (the command's expiration too).
        """
        result = AsyncResult()
        command_id = uuid.uuid4().hex
        self._waiting[command_id] = result
        abandon = gevent.get_hub().loop.timer(timeout + ABANDON_GRACE)
        abandon.start(_fail, result, "timeout")

        def settled(_result: AsyncResult) -> None:
            abandon.close()
            self._waiting.pop(command_id, None)

        result.rawlink(settled)

        def published(outcome: str | None) -> None:
            if outcome is not None:
                _fail(result, "offline" if outcome == "unroutable" else outcome)

        expiration = str(max(1, int(timeout * 1000)))
        self._publisher.publish(COMMAND, device, command_body(name, data),
                                (command_id, self._reply_to(), expiration, command_id, int(time.time())),
                                done=published)
        return result

    def reply_received(self, correlation_id: str | None, body: bytes) -> None:
        """A message from the default exchange on our queue: the reply to one of our commands."""
        waiting = self._waiting.get(correlation_id or "")
        if waiting is None or waiting.ready():
            return
        reply = decode_reply(body)
        if reply is None:
            log.warning("ignoring a reply that is not a JSON object (correlation_id=%s)", correlation_id)
            return
        waiting.set(reply)


def _fail(result: AsyncResult, error: str) -> None:
    if not result.ready():
        result.set({"ok": False, "error": error, "data": None})
