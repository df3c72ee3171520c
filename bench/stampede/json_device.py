"""A device that speaks Warren's JSON frames (PROTOCOL.md sections 2-4), over TCP lines or WebSocket text.

Against the floor (an echo server) the hello comes back as-is and counts as the
welcome, and every echoed ping as a heartbeat answered.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from app.protocol import CLOSING_ERRORS
from bench.stampede.device import Device, Failure, Inbox, World

PING = orjson.dumps({"type": "ping"})


class JsonDevice(Device):
    __slots__ = ()

    def greet(self, inbox: Inbox, world: World) -> float:
        inbox.send(orjson.dumps({"type": "hello", "device": self.name, "token": self.token, "v": 1}))
        frame = orjson.loads(inbox.next())
        check_welcome(frame, world.floor)
        return world.heartbeat or float(frame.get("heartbeat") or 30)

    def ping(self) -> bool:
        return self.send(PING)

    def send_event(self, event_id: str, seq: int, world: World) -> bool:
        self.pending[event_id] = time.monotonic()  # before the write: the ack may come before it returns
        if self.send(orjson.dumps({"type": "event", "id": event_id, "name": "bench.tick", "data": {"seq": seq}})):
            return True
        self.pending.pop(event_id, None)
        return False

    def handle(self, message: bytes, world: World) -> tuple[str, float | None] | None:
        frame = orjson.loads(message)
        kind = frame.get("type")
        stats = world.stats
        if kind == "command":
            self.send(orjson.dumps({"type": "reply", "id": frame.get("id"), "ok": True, "data": {}}))
            stats.commands += 1
        elif kind == "pong" or (kind == "ping" and world.floor):
            # Heartbeats answered are counted, not derived from the interval: the per-heartbeat
            # CPU figure divides by what the server actually did (the floor echoes the ping itself).
            stats.pongs += 1
        elif kind == "ack":
            sent = self.pending.pop(frame.get("id"), None)
            if sent is not None:
                stats.acked += 1
                stats.acked_ids.append(frame["id"])
                stats.ack_ms.append(round((time.monotonic() - sent) * 1000, 2))
        elif kind == "nack":
            self.pending.pop(frame.get("id"), None)
            stats.nacked[str(frame.get("reason"))] += 1
        elif kind == "error":
            code = str(frame.get("code"))
            stats.errors[code] += 1
            if code in CLOSING_ERRORS:
                return code, frame.get("retry_after")
        return None


def check_welcome(frame: dict[str, Any], floor: bool) -> None:
    """Raise a Failure unless `frame` opens a session (the echoed hello does, on the floor)."""
    kind = frame.get("type")
    if kind == "welcome" or (floor and kind == "hello"):
        return
    if kind == "error":
        raise Failure(f"error:{frame.get('code')}", frame.get("retry_after"))
    raise Failure(f"unexpected:{kind}")
