"""What a partition owner holds of a delivery (a receipt), and how many acks a shared one waits for.

Each partition is consumed on a channel of its own. RabbitMQ (3.x) keeps a channel's
unacked deliveries oldest first, and an ack that is not the oldest's walks every older
one: a partition's live claims stay unacked and are older than its commands, so on one
channel every command's ack walked all the owner's claims (10,000 per worker with 20,000
devices on two: the channel process saturated, BENCHMARKS.md "Issue 19"). So a receipt
names a delivery by its partition (its channel) and that channel's delivery tag, as one
int, which the directory holds as an entry's tag. One delivery may carry many claims and releases (a holder's `updates`
of one partition, consumer.py): the directory acks each of them on its own, as it would
a message of its own, and the delivery is acked at RabbitMQ once all of them are done
(`Shares`). A batch of claims stays unacked until its last session ends: RabbitMQ holds
one message where it held one per session.
"""

from __future__ import annotations

RECEIPT_SHIFT = 48  # a receipt's low bits are its delivery tag: 2**48 deliveries a channel is centuries of them


def receipt(partition: int, tag: int) -> int:
    """What the owner holds of a delivery: its partition (its channel) and delivery tag, as one int."""
    return partition << RECEIPT_SHIFT | tag


def split_receipt(held: int) -> tuple[int, int]:
    """(partition, delivery tag) of a receipt."""
    return held >> RECEIPT_SHIFT, held & ((1 << RECEIPT_SHIFT) - 1)


class Shares:
    """Receipts of deliveries that carried more than one update, with the acks each still waits for."""

    def __init__(self) -> None:
        self._waiting: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def expect(self, held: int, acks: int) -> None:
        """`held` is done once it has been acked `acks` times (one per update it carried)."""
        if acks > 1:
            self._waiting[held] = acks

    def done(self, held: int) -> bool:
        """One ack of `held`: True when that was its last (ack it at RabbitMQ now)."""
        waiting = self._waiting.get(held)
        if waiting is None:
            return True
        if waiting > 1:
            self._waiting[held] = waiting - 1
            return False
        del self._waiting[held]
        return True

    def clear(self) -> None:
        """Our connection is gone, and every delivery we held with it."""
        self._waiting.clear()
