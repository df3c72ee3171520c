"""When a worker may stand by for the routing partitions it does not prefer: once its instance's workers took theirs.

RabbitMQ's single active consumer gives a partition to its first subscriber, and to the
next in subscription order when that one goes (app/broker/partitions.py). Each worker
subscribes at once to the partitions it prefers, and to the rest later, as standby. A
worker that stood by before another had subscribed to its own would own them: gunicorn's
workers connect seconds apart on a busy host (twelve on two cores connected over 4 s),
and with a fixed 2 s delay the first to connect owned 9 of the 16 partitions in a
200,000-device run, so that most commands and claims passed through one worker of twelve.

So the workers of one gunicorn instance share a board: an anonymous shared mapping that
the master makes before it forks (gunicorn.conf.py imports this module), one stamp per
worker slot. A worker stamps its slot (`took_own`) once it has subscribed to its own
partitions, clears it when its connection goes (`left`: one back first must wait for it),
and stands by once every slot's stamp is recent and SETTLE old (`all_took_own`),
or STANDBY_MAX after its connect whatever the board says (a worker that never came up, or
a lone worker reconnecting long after the others: waiting costs nothing then, since the
others stand by already). Outside gunicorn (tests, one process) the board is the
process's own, and a single worker finds its own stamp.
"""

from __future__ import annotations

import mmap
import struct
import time

SLOTS = 256  # stamps on the board; a worker's slot is its number modulo this
SETTLE = 1.0  # seconds after the last stamp: RabbitMQ has registered that worker's subscriptions
STANDBY_MAX = 30.0  # seconds after connecting a worker stands by, whatever the board says
_STAMP = struct.Struct("d")


class StandbyBoard:
    """One `time.monotonic()` stamp per slot (the clock is the machine's, the same in every process)."""

    def __init__(self) -> None:
        self._stamps = mmap.mmap(-1, SLOTS * _STAMP.size)  # MAP_SHARED: a fork shares it, not a copy

    def took_own(self, slot: int, now: float | None = None) -> None:
        """The worker of `slot` has subscribed to the partitions it prefers."""
        self._stamp(slot, time.monotonic() if now is None else now)

    def left(self, slot: int) -> None:
        """The worker of `slot` lost its connection: until it takes its own again, others wait for it."""
        self._stamp(slot, 0.0)

    def _stamp(self, slot: int, value: float) -> None:
        _STAMP.pack_into(self._stamps, (slot % SLOTS) * _STAMP.size, value)

    def may_stand_by(self, slots: int, connected_at: float, now: float) -> bool:
        """Whether a worker that connected at `connected_at` may subscribe to the partitions it does not prefer."""
        return now >= connected_at + STANDBY_MAX or self.all_took_own(slots, connected_at - STANDBY_MAX, now)

    def all_took_own(self, slots: int, since: float, now: float | None = None) -> bool:
        """Whether every slot of `slots` stamped at `since` or later, the last of them SETTLE ago or more."""
        now = time.monotonic() if now is None else now
        stamps = [_STAMP.unpack_from(self._stamps, (slot % SLOTS) * _STAMP.size)[0] for slot in range(slots)]
        return all(stamp > 0.0 for stamp in stamps) and min(stamps) >= since and now >= max(stamps) + SETTLE


BOARD = StandbyBoard()
"""This instance's board: made in gunicorn's master, before the fork, by gunicorn.conf.py's import."""
