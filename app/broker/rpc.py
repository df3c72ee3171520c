"""The HTTP API's side: requests to whichever worker holds a device, resolved by whatever answers first.

This is the backend's role played inside the gateway (any worker serves the HTTP
API for any device, PROTOCOL.md section 6), kept apart from the device side. A
request goes out mandatory with `reply_to` this worker's own queue; the answer
comes back there (the consumer hands it here by correlation id). The device's
partition owner passes it on to the one worker holding the device, or answers
itself that none does (`offline`; `online` false). Two kinds: a command for the
device itself, and an operator's question (`ask`: `info`, `kick`) for the worker
holding it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import AsyncResult

from app.broker.messages import ASK, ASK_TYPE, COMMAND, ask_body, command_body, decode_reply
from app.broker.publisher import Publisher

log = logging.getLogger("warren.broker")

# A command nobody answered resolves this long after its timeout, so that the caller's own wait
# ends first (its 504 is worded for that); either way the waiting entry is never left behind.
ABANDON_GRACE = 1.0


class RpcClient:
    """Requests sent through `publisher`, their answers expected on the queue `reply_to()` names."""

    def __init__(self, publisher: Publisher, reply_to: Callable[[], str]) -> None:
        self._publisher = publisher
        self._reply_to = reply_to
        self._waiting: dict[str, AsyncResult] = {}

    def send_command(self, device: str, name: str, data: Any, timeout: float) -> AsyncResult:
        """Publish a command; the result gets the device's reply as {"ok", "data", "error"}.

        Without a reply it resolves as `offline` (no worker holds the device),
        `broker_unavailable` (RabbitMQ did not take it), or `timeout` ABANDON_GRACE
        after `timeout` seconds (the command's expiration too).
        """
        request_id, result = self._open(timeout + ABANDON_GRACE, _failure("timeout"))

        def published(outcome: str | None) -> None:
            if outcome is not None:
                _settle(result, _failure("offline" if outcome == "unroutable" else outcome))

        self._publisher.publish(COMMAND, device, command_body(name, data),
                                (request_id, self._reply_to(), _expiration(timeout), request_id, int(time.time())),
                                done=published)
        return result

    def ask(self, device: str, kind: str, timeout: float) -> AsyncResult:
        """Ask the worker holding `device`; the result gets its answer (a dict with `online` true),
        or {"device", "online": False} when none holds it, or {"error": "timeout" / "broker_unavailable"}."""
        request_id, result = self._open(timeout, {"error": "timeout"})

        def published(outcome: str | None) -> None:
            if outcome == "unroutable":
                _settle(result, {"device": device, "online": False})
            elif outcome is not None:
                _settle(result, {"error": outcome})

        self._publisher.publish(ASK, device, ask_body(kind),
                                (request_id, self._reply_to(), _expiration(timeout), request_id, ASK_TYPE),
                                done=published)
        return result

    def reply_received(self, correlation_id: str | None, body: bytes) -> None:
        """A message from the default exchange on our queue: the answer to one of our requests."""
        waiting = self._waiting.get(correlation_id or "")
        if waiting is None or waiting.ready():
            return
        reply = decode_reply(body)
        if reply is None:
            log.warning("ignoring a reply that is not a JSON object (correlation_id=%s)", correlation_id)
            return
        waiting.set(reply)

    def _open(self, abandon_after: float, abandoned: dict[str, Any]) -> tuple[str, AsyncResult]:
        """A new request id and its result, which resolves as `abandoned` after `abandon_after` seconds."""
        request_id, result = uuid.uuid4().hex, AsyncResult()
        self._waiting[request_id] = result
        timer = gevent.get_hub().loop.timer(abandon_after)
        timer.start(_settle, result, abandoned)

        def settled(_result: AsyncResult) -> None:
            timer.close()
            self._waiting.pop(request_id, None)

        result.rawlink(settled)
        return request_id, result


def _expiration(timeout: float) -> str:
    return str(max(1, int(timeout * 1000)))


def _failure(error: str) -> dict[str, Any]:
    return {"ok": False, "error": error, "data": None}


def _settle(result: AsyncResult, value: dict[str, Any]) -> None:
    if not result.ready():
        result.set(value)
