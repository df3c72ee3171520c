"""When an owner publishes a claim again: the two ages it keeps of the entries of its directory.

An entry of the directory is a delivery held unacked (directory.py). Two things make the owner
publish its claim again, as a copy that takes over from it once confirmed (partitions.py `tick`):

- Compaction. RabbitMQ 3.x walks every older unacked delivery of a channel on each ack that is
  not the oldest's (rabbitmq-server#1511), and claims come one or two to a message when hellos
  trickle in: at 200,000 devices each partition's channel held 12,500 of them, and every
  command's ack walked them (measured on this machine: RabbitMQ's CPU per command 0.57 ms with
  none held, 1.86 ms with 12,500). So an entry still held by its own claim's delivery after a
  moment is copied with the others of its partition, thousands to a message.
- Refresh. RabbitMQ closes a channel whose delivery stays unacked past its consumer timeout
  (30 min by default), so an entry held by a copy is copied again after a while.

Each age list is (since, device, tag) in delivery order; an item whose entry has moved on (ended,
replaced, copied) is skipped when it comes up, and the lists are rebuilt when such items pile up.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

Age = tuple[float, str, int]  # (since, device, tag)


class ClaimAges:
    """The entries held by their own claim (`fresh`) and those held by a copy (`copied`), oldest first."""

    def __init__(self) -> None:
        self.fresh: deque[Age] = deque()
        self.copied: deque[Age] = deque()

    def held(self, entries: Mapping[str, Any], since: float, device: str, tag: int, *, copied: bool) -> None:
        """The entry of `device` is held by delivery `tag` since `since` (its claim's, or a copy's)."""
        ages = self.copied if copied else self.fresh
        ages.append((since, device, tag))
        if len(ages) > 2 * len(entries) + 1024:  # ended or replaced sessions' ages pile up in a stampede
            rebuilt = deque(sorted((e.since, d, e.tag) for d, e in entries.items() if e.copied is copied))
            if copied:
                self.copied = rebuilt
            else:
                self.fresh = rebuilt

    def due(self, entries: Mapping[str, Any], *, copied: bool, older_than: float, limit: int) -> list[Age]:
        """Up to `limit` entries held since before `older_than` by the same delivery as then."""
        ages, found = self.copied if copied else self.fresh, []
        while ages and ages[0][0] < older_than and len(found) < limit:
            age = ages.popleft()
            entry = entries.get(age[1])
            if entry is not None and entry.tag == age[2]:
                found.append(age)
        return found

    def again(self, entries: Mapping[str, Any], held: list[tuple[str, int]]) -> list[int]:
        """Copies RabbitMQ refused: those of their (device, tag) entries that still stand are due at once (and
        no longer being copied); the tags of those that moved on meanwhile are returned, for the owner to ack."""
        moved_on = []
        for device, tag in reversed(held):
            entry = entries.get(device)
            if entry is not None and entry.tag == tag:
                entry.copying = 0
                (self.copied if entry.copied else self.fresh).appendleft((float("-inf"), device, tag))
            else:
                moved_on.append(tag)
        return moved_on[::-1]

    def clear(self) -> None:
        self.fresh.clear()
        self.copied.clear()
