"""Which partition RabbitMQ's `x-consistent-hash` exchange routes a device id to, computed here.

Warren groups device claims per partition itself, so it must hash device ids exactly as the broker's
rabbitmq_consistent_hash_exchange plugin does (RabbitMQ 3.10, Erlang/OTP 25). The plugin routes a message by

    jump_consistent_hash(erlang:phash2(RoutingKey), Buckets)

seeding Erlang's `rand` with `rand:seed_s(exs1024, {H, H, H})` (H the phash2 value) and drawing floats with
`rand:uniform_s/1` until the jump passes the bucket count. Bucket numbers are handed out in binding order:
a queue bound with routing key "20" (its weight) takes the next 20 buckets, so with every queue bound with
the same weight, bucket b belongs to the b // weight-th queue bound.

This module reproduces, bit for bit: `erlang:phash2/1` of a binary (erts utils.c, make_hash2: Bob Jenkins'
block_hash seeded with HCONST_13, masked to 27 bits; documented as stable across ERTS versions), rand.erl's
exs1024 (xorshift1024*, seeded from the triple through xorshift64*, `uniform_s/1` = V / 2^64 in IEEE
doubles) and the plugin's jump loop. tests/unit/test_ring.py checks it against `erl` and a real broker.
As in Erlang, only phash2's low 21 bits seed the generator, and a draw of exactly 0 (odds 2^-64) fails the
division (badarith there, ZeroDivisionError here). Pure Python, caching nothing: it runs once per device
session start, in about 10-15 µs for a 20-byte id.
"""

from __future__ import annotations

import logging
import secrets
from struct import Struct

__all__ = ["PROBES_PER_PARTITION", "RingCheck", "bucket_of", "partition_of", "phash2"]

log = logging.getLogger("warren.routing")

_M27 = (1 << 27) - 1
_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B9  # HCONST in utils.c: block_hash's initial a and b
_HCONST_13 = 0x08D12E65  # make_hash2's initial value for a binary at the top of the term (hash == 0)
_WORDS = Struct("<3I")  # block_hash reads each 12-byte block as three little-endian 32-bit words
_EXS64_MUL = 2685821657736338717  # xorshift64* multiplier (rand.erl exs64_next)
_EXS1024_MUL = 1181783497276652981  # xorshift1024* multiplier (rand.erl exs1024_calc)
_TWO_POW_MINUS_64 = 2.0**-64  # uniform_s for exs1024 (`max` = 2^64 - 1): V / (Max + 1)


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    """Bob Jenkins' MIX(a, b, c) on 32-bit unsigned words (utils.c), every step reduced mod 2^32."""
    a = (a - b - c ^ c >> 13) & _M32
    b = (b - c - a ^ a << 8) & _M32
    c = (c - a - b ^ b >> 13) & _M32
    a = (a - b - c ^ c >> 12) & _M32
    b = (b - c - a ^ a << 16) & _M32
    c = (c - a - b ^ b >> 5) & _M32
    a = (a - b - c ^ c >> 3) & _M32
    b = (b - c - a ^ a << 10) & _M32
    c = (c - a - b ^ b >> 15) & _M32
    return a, b, c


def phash2(data: bytes) -> int:
    """`erlang:phash2(Data)` for a binary `Data`: in 0..2^27-1, as any ERTS computes it.

    make_hash2 on a binary is block_hash(bytes, length, HCONST_13) (just HCONST_13 when empty), and
    phash2/1 keeps its low 27 bits.
    """
    length = len(data)
    c = _HCONST_13
    if not length:
        return c & _M27
    a = b = _GOLDEN
    full = length - length % 12
    unpack = _WORDS.unpack_from
    for offset in range(0, full, 12):
        wa, wb, wc = unpack(data, offset)
        a, b, c = _mix((a + wa) & _M32, (b + wb) & _M32, (c + wc) & _M32)
    wa, wb, wc = _WORDS.unpack(data[full:].ljust(12, b"\0"))  # the tail, at most 11 bytes
    # the low byte of c is the length's: the tail's bytes 8..10 go one byte higher
    return _mix((a + wa) & _M32, (b + wb) & _M32, (c + length + (wc << 8)) & _M32)[2] & _M27


def _jump(key: int, buckets: int) -> int:
    """The plugin's jump_consistent_hash(Key, Buckets) for an integer Key, Buckets >= 2."""
    # exs1024_seed({A, A, A}): three 21-bit words folded into one 64-bit xorshift64* seed
    a = key & 0x1FFFFF
    r = ((((a + 1) * 2097131) & 0x1FFFFF) << 43 | (((a + 1) * 2097133) & 0x1FFFFF) << 22
         | (((a + 1) * 2097143) & 0x1FFFFF) << 1 | 1)
    # exs1024_gen1024: the ring is 16 successive xorshift64* states, last first; their outputs
    # (state * multiplier) are taken only for the words the jump reads before overwriting them
    ring = [0] * 16
    for i in range(15, -1, -1):
        r ^= r >> 12
        r ^= r << 25 & _M64
        r ^= r >> 27
        ring[i] = r
    # jump_consistent_hash_value(-1, 0, N, S): B = J; J = trunc((B + 1) / R) while J < N
    bucket, j, t, s0 = -1, 0, 0, ring[0] * _EXS64_MUL & _M64
    while j < buckets:
        bucket = j
        t += 1
        s1 = ring[t & 15]
        if t <= 16:  # still the seed's state, not yet an exs1024 word
            s1 = s1 * _EXS64_MUL & _M64
        s1 ^= s1 << 31 & _M64
        s0 = s0 ^ s0 >> 30 ^ s1 ^ s1 >> 11  # exs1024_calc's NS1: the new ring word, and the next S0
        ring[t & 15] = s0
        # uniform_s: float(V) / 2^64 (exact scaling of the correctly rounded V), then Erlang's `/` and trunc
        j = int((bucket + 1) / ((s0 * _EXS1024_MUL & _M64) * _TWO_POW_MINUS_64))
    return bucket


def bucket_of(key: bytes, buckets: int) -> int:
    """The bucket (0..buckets-1) an `x-consistent-hash` exchange with `buckets` buckets picks for routing key
    `key`: RabbitMQ's jump_consistent_hash(erlang:phash2(key), buckets)."""
    if buckets < 1:
        raise ValueError(f"buckets must be at least 1, not {buckets}")
    if buckets == 1:
        return 0
    return _jump(phash2(key), buckets)


def partition_of(device: str, partitions: int, weight: int, order: list[int] | None = None) -> int:
    """The partition (0..partitions-1) RabbitMQ routes `device`'s messages to when `partitions` queues are
    bound to the consistent-hash exchange, each with routing key str(weight): the `order[k]`-th partition
    is the k-th one bound (None: bound in order, 0 first)."""
    bound = bucket_of(device.encode(), partitions * weight) // weight
    return bound if order is None else order[bound]


PROBES_PER_PARTITION = 2  # keys sent for each place on the ring: a key that disagrees with its twin shows up


class RingCheck:
    """Which partition holds each place on `warren.routes`' ring, asked of RabbitMQ itself.

    A holder that sends a partition's claims straight to its queue must hash as the exchange does
    (a claim in one partition and its device's commands in another would answer `offline` for a
    connected device). The hash is RabbitMQ's (`bucket_of`); which queue holds each run of
    `weight` buckets is the order the partitions' bindings were made in, which is not fixed: a
    RabbitMQ restart rebuilds the ring from its stored bindings, sorted by queue name (`.0`, `.1`,
    `.10`, ...). So at each connect, until it holds again, the holder sends keys through the
    exchange, two for each place, and their owners answer where each landed (partitions.py). Every
    place answered, twice alike, by all the partitions: it holds, with that order (`order`), until the
    next connect. Two keys of one place landing apart, or a partition twice (the bindings' weights
    differ, or a RabbitMQ hashes otherwise): it does not hold, claims keep going one by one through
    the exchange, and the log says why. Unanswered (an owner of an older Warren, which drops what it
    does not read, in a rolling upgrade): claims go one by one until the next connect asks again.
    """

    def __init__(self) -> None:
        self.holds = False
        self.order: list[int] | None = None  # the partition at each place, once it holds
        self._landed: dict[int, list[int]] = {}  # place -> the partitions its keys landed in so far
        self._places = 0

    def probes(self, partitions: int, weight: int) -> list[tuple[str, int]]:
        """A connect: forget what held, and the keys to send through the exchange now, each with its place."""
        self.holds, self.order, self._landed, self._places = False, None, {}, partitions
        wanted = {place: PROBES_PER_PARTITION for place in range(partitions)}
        keys: list[tuple[str, int]] = []
        while wanted:
            key = f"warren.ring.{secrets.token_hex(8)}"  # a dot: no device id has one
            place = partition_of(key, partitions, weight)
            if place in wanted:
                keys.append((key, place))
                wanted[place] -= 1
                if not wanted[place]:
                    del wanted[place]
        return keys

    def answered(self, place: int, landed: int) -> None:
        """An owner says a key for place `place` on the ring landed in partition `landed`."""
        if self.holds or not 0 <= place < self._places:
            return
        every = self._landed
        every.setdefault(place, []).append(landed)
        if len(every) < self._places or any(len(keys) < PROBES_PER_PARTITION for keys in every.values()):
            return
        self._landed = {}
        order = [keys[0] for _place, keys in sorted(every.items())]
        if any(len(set(keys)) > 1 for keys in every.values()) or sorted(order) != list(range(self._places)):
            log.error("warren.routes does not hash device ids as app/broker/ring.py does (its partitions bound "
                      "with different weights?): claims and releases go one message each, as RabbitMQ routes them")
            return
        self.holds, self.order = True, order
        log.info("warren.routes checked: claims and releases travel per partition (the partitions bound %s)",
                 "in order" if order == sorted(order) else f"in the order {order}")
