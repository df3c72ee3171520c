"""The bans in force across the deployment, as this worker knows them (PROTOCOL.md section 6). No I/O.

Bans live on RabbitMQ, in a stream every worker replays at start and then follows
(app/broker/bans.py); this is what a worker builds from it: device -> the latest
record about that device. A record is a ban (with its end, or none) or a lift, and
carries `issued`, the wall-clock milliseconds of the decision it states: the record
with the greatest `issued` is the one in force, whatever order records are read in.
That matters because bans are re-published to outlive the stream's retention: a
re-published copy of an old ban keeps the old ban's `issued`, so a lift issued
after it still wins when the copy lands behind the lift in the stream.

An expired ban needs no record: `until` says when it ends, and every worker reads
the same `until`. Lifts are remembered (as tombstones) only as long as a copy of
the ban they lifted could still be read from the stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# How long a lift is remembered: longer than a ban's copy may sit in the stream (its retention).
TOMBSTONE_AGE_MS = 2 * 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class Ban:
    """One record of the stream: a ban of `device` until `until` (ms since the epoch; None: no end),
    or, with `lifted`, the end of every ban of it issued before `issued`."""

    device: str
    issued: int  # ms since the epoch when the decision was made: the latest decision wins
    until: int | None = None
    reason: str = ""
    by: str = "operator"  # "operator" or "flapping"
    lifted: bool = False

    def in_force(self, now: int) -> bool:
        return not self.lifted and (self.until is None or self.until > now)

    def retry_after(self, now: int | None = None) -> float | None:
        """Seconds until the ban ends, for the `banned` error; None for a ban without end."""
        if self.until is None:
            return None
        return max(0.0, (self.until - (now_ms() if now is None else now)) / 1000)

    def public(self) -> dict[str, object]:
        """What the API says about a ban (PROTOCOL.md section 6)."""
        return {"device": self.device, "until": self.until, "reason": self.reason, "by": self.by}


def now_ms() -> int:
    return int(time.time() * 1000)


class BanList:
    """device -> its latest record; `banned` is the hello's check (a dict lookup: a banned hello must
    cost less than half a session set-up, and a device not banned next to nothing)."""

    def __init__(self) -> None:
        self._latest: dict[str, Ban] = {}
        self._seen: dict[str, float] = {}  # device -> monotonic time its latest record was last read

    def __len__(self) -> int:
        return sum(1 for ban in self._latest.values() if not ban.lifted)

    def apply(self, record: Ban, seen: float | None = None) -> bool:
        """Take a record read from the stream; True when it is now the device's latest (it changes
        what is in force, or re-states it)."""
        current = self._latest.get(record.device)
        if current is not None and (current.issued, current.lifted) > (record.issued, record.lifted):
            return False  # an older decision (a copy of a ban lifted since): the later one stands
        self._latest[record.device] = record
        self._seen[record.device] = time.monotonic() if seen is None else seen
        return True

    def latest(self, device: str) -> Ban | None:
        """The device's latest record, in force or not: a new decision about it is issued after it."""
        return self._latest.get(device)

    def banned(self, device: str, now: int | None = None) -> Ban | None:
        """The ban in force on `device`, if any."""
        ban = self._latest.get(device)
        if ban is None or not ban.in_force(now_ms() if now is None else now):
            return None
        return ban

    def in_force(self, now: int | None = None) -> list[Ban]:
        at = now_ms() if now is None else now
        return sorted((ban for ban in self._latest.values() if ban.in_force(at)), key=lambda ban: ban.device)

    def due_copy(self, read_before: float, lasting_past: int) -> list[Ban]:
        """Bans in force whose latest record was read before `read_before` (monotonic) and that last
        beyond `lasting_past` (ms): to be published again before the stream's retention drops them."""
        return [ban for device, ban in self._latest.items()
                if not ban.lifted and (ban.until is None or ban.until > lasting_past)
                and self._seen.get(device, 0.0) < read_before]

    def forget_old(self, now: int | None = None) -> None:
        """Drop ended bans and old lifts: nothing in the stream can contradict them any more."""
        at = now_ms() if now is None else now
        for device in [d for d, ban in self._latest.items()
                       if (ban.lifted and ban.issued < at - TOMBSTONE_AGE_MS)
                       or (not ban.lifted and ban.until is not None and ban.until < at - TOMBSTONE_AGE_MS)]:
            del self._latest[device]
            self._seen.pop(device, None)
