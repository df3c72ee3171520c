"""What a partition's routing messages say, read into its directory: claims, releases and copies.

Four kinds reach a partition besides commands (partitions.py reads them, directory.py
decides): a holder's claim or release one by one (`warren.claim`, `warren.release`,
through the hash exchange, as holders send them until their ring check holds and as
Warren before it always did), a holder's claims and releases of one partition in one
message (`warren.updates`, by name), and an owner's copies of its old claims
(`warren.copies`, or one `warren.claim` by name from an owner before it). A message of
several is acked once each update in it is done (receipts.py's `Shares`).
"""

from __future__ import annotations

from app.broker.directory import ACK, Action, Directory
from app.broker.messages import (
    CLAIM_TYPE,
    COPIES_TYPE,
    RELEASE_TYPE,
    UPDATES_TYPE,
    decode_claim,
    decode_copies,
    decode_release,
    decode_updates,
)
from app.broker.receipts import Shares

KINDS = frozenset((CLAIM_TYPE, RELEASE_TYPE, UPDATES_TYPE, COPIES_TYPE))


def read(directory: Directory, shares: Shares, kind: str, tag: int, body: bytes, *, by_name: bool, partition: int,
         now: float, redelivered: bool) -> tuple[list[Action], str | None]:
    """The directory's actions for a routing message of `kind` (one of KINDS) held as receipt `tag`, and the
    holder that sent it as updates (it reads `routed` for many sessions at once), or None;
    `by_name`: it came through the default exchange (an owner's copy), not the hash exchange."""
    if kind == UPDATES_TYPE:
        updates = decode_updates(body)
        if updates is None:
            return [(ACK, tag)], None
        shares.expect(tag, len(updates[2]))
        return directory.updated(tag, *updates, partition=partition, now=now, redelivered=redelivered), updates[0]
    return _read_one(directory, shares, kind, tag, body, by_name=by_name, partition=partition, now=now,
                     redelivered=redelivered), None


def _read_one(directory: Directory, shares: Shares, kind: str, tag: int, body: bytes, *, by_name: bool,
              partition: int, now: float, redelivered: bool) -> list[Action]:
    if kind == COPIES_TYPE:
        copies = decode_copies(body)
        if copies is None:
            return [(ACK, tag)]
        shares.expect(tag, len(copies))
        return directory.copied(tag, copies, partition=partition, now=now, redelivered=redelivered)
    if kind == RELEASE_TYPE:
        release = decode_release(body)
        return [(ACK, tag)] if release is None else directory.release(tag, release[0], release[1],
                                                                      will_until=release[2])
    claim = decode_claim(body)
    if claim is None:
        return [(ACK, tag)]
    device, session, started, holder, fresh, epoch = claim
    if by_name:  # a copy from an owner before `warren.copies`
        return directory.copied(tag, [(device, session, started, holder, epoch)], partition=partition, now=now,
                                redelivered=redelivered)
    # Redelivered, its place in the order is no news: weighed by hello time, not arrival.
    return directory.claim(tag, device, session, started, holder, fresh=fresh and not redelivered,
                           partition=partition, now=now, epoch=epoch, redelivered=redelivered)
