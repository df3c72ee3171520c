"""app/broker/ring.py against the real thing: `erl` on this machine for phash2 and the jump consistent hash,
and a real RabbitMQ `x-consistent-hash` exchange for partition_of."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import amqp
import pytest
from kombu import Connection

from app.broker.ring import bucket_of, partition_of, phash2
from support.gateways import AMQP_URL

SEED = random.randrange(1 << 32)  # in every failure message: rerun with it to reproduce
BUCKET_COUNTS = [1, 2, 3, 16, 320, 1000, 1 << 16, 1 << 40]  # 2^40: ~28 draws, past exs1024's 16-word ring
NON_ASCII = "éüßøçñ€£¥漢字かなカナ한글абвгдеΩπ∑→✓😀🚀🦀"

# RabbitMQ 3.10's rabbit_exchange_type_consistent_hash, as it is: K is the phash2 of the routing key
ERLANG = r"""
Jump = fun Loop(B, J, N, _) when J >= N -> B;
           Loop(_B0, J0, N, S0) -> B = J0, {R, S} = rand:uniform_s(S0), Loop(B, trunc((B + 1) / R), N, S)
       end,
Bucket = fun(_K, 1) -> 0; (K, N) -> Jump(-1, 0, N, rand:seed_s(exs1024, {K, K, K})) end,
{ok, Data} = file:read_file(os:getenv("RING_KEYS")),
Ns = [list_to_integer(N) || N <- string:lexemes(os:getenv("RING_BUCKETS"), ",")],
Each = fun(<<"x", Hex/binary>>) ->
           H = erlang:phash2(binary:decode_hex(Hex)),
           io:format("~b~s~n", [H, [[$\s, integer_to_list(Bucket(H, N))] || N <- Ns]])
       end,
lists:foreach(Each, [Line || Line <- binary:split(Data, <<"\n">>, [global]), Line =/= <<>>]),
halt().
"""


def device_id(rng: random.Random, length: int) -> str:
    """A device id of `length` characters: plain ASCII, or with non-ASCII characters mixed in."""
    if rng.random() < 0.5:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789-_.:") for _ in range(length))
    return "".join(rng.choice(NON_ASCII) if rng.random() < 0.4 else rng.choice("abcxyz019-") for _ in range(length))


def sample_keys(rng: random.Random) -> list[bytes]:
    """~2,000 keys: every byte length 0..64, then random ids, many around multiples of block_hash's 12 bytes."""
    keys = [bytes(rng.randrange(256) for _ in range(n)) for n in range(65)]
    keys += [b"dev-1", "device-ü".encode(), "😀".encode()]
    near_blocks = [n + d for n in (12, 24, 36, 48, 60) for d in (-1, 0, 1)]
    while len(keys) < 2000:
        text = device_id(rng, rng.choice(near_blocks) if rng.random() < 0.4 else rng.randrange(65))
        data = text.encode()
        keys.append(data[:rng.choice(near_blocks)] if len(data) > 64 else data)  # cut bytes: invalid UTF-8 too
    return keys


def test_phash2_and_bucket_of_match_erlang(tmp_path: Path) -> None:
    erl = shutil.which("erl")
    if erl is None:
        pytest.skip("erl is not on PATH: no Erlang to compare phash2 and the jump consistent hash with")
    keys = sample_keys(random.Random(SEED))
    (tmp_path / "keys").write_text("".join(f"x{key.hex()}\n" for key in keys))
    env = {**os.environ, "RING_KEYS": str(tmp_path / "keys"), "RING_BUCKETS": ",".join(map(str, BUCKET_COUNTS))}
    result = subprocess.run([erl, "-noshell", "-eval", ERLANG], check=False, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(keys), result.stdout[-2000:]
    for key, line in zip(keys, lines, strict=True):
        erlang_hash, *erlang_buckets = map(int, line.split())
        assert phash2(key) == erlang_hash, f"phash2({key!r}) (seed {SEED})"
        ours = [bucket_of(key, n) for n in BUCKET_COUNTS]
        assert ours == erlang_buckets, f"bucket_of({key!r}, {BUCKET_COUNTS}) (seed {SEED})"


def test_bucket_of_rejects_no_buckets() -> None:
    assert bucket_of(b"anything", 1) == 0
    with pytest.raises(ValueError):
        bucket_of(b"anything", 0)


def test_partition_of_matches_a_real_consistent_hash_exchange() -> None:
    partitions, weight, count = 16, 20, 3000
    rng = random.Random(SEED)
    devices = list(dict.fromkeys(device_id(rng, rng.randrange(1, 41)) for _ in range(count)))
    try:
        connection = Connection(AMQP_URL, connect_timeout=3)
        connection.connect()
    except OSError as error:
        pytest.skip(f"needs RabbitMQ at {AMQP_URL}: {error}")
    tag = uuid.uuid4().hex[:10]
    exchange, queues = f"test.ring.{tag}", [f"test.ring.{tag}.{index}" for index in range(partitions)]
    channel = connection.channel()
    try:
        channel.exchange_declare(exchange, "x-consistent-hash", durable=False, auto_delete=True)
        for queue in queues:  # in order, one at a time: queue i takes buckets 20*i .. 20*i+19
            channel.queue_declare(queue, exclusive=True, auto_delete=False)
            channel.queue_bind(queue, exchange, routing_key=str(weight))
        channel.confirm_select()
        for device in devices:
            channel.basic_publish_confirm(amqp.Message(device.encode()), exchange, device)
        received: list[tuple[str, int]] = []
        for index, queue in enumerate(queues):
            channel.basic_consume(queue, no_ack=True,
                                  callback=lambda message, index=index: received.append((message.body.decode(), index)))
        deadline = time.monotonic() + 30
        while len(received) < len(devices) and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                connection.drain_events(timeout=1)
        landed = dict(received)
        assert len(received) == len(landed) == len(devices), f"{len(received)} messages back of {len(devices)}"
        wrong = {device: (index, partition_of(device, partitions, weight)) for device, index in landed.items()
                 if index != partition_of(device, partitions, weight)}
        assert not wrong, f"{len(wrong)} devices elsewhere (queue, ours), e.g. {list(wrong.items())[:5]} (seed {SEED})"
        assert len(set(landed.values())) == partitions  # every queue got some: the exchange did spread them
    finally:
        with contextlib.suppress(OSError, amqp.exceptions.AMQPError):  # a broken connection takes them with it
            cleanup = connection.channel()  # `channel` may have been closed by the error being reported
            for queue in queues:
                cleanup.queue_delete(queue)
            cleanup.exchange_delete(exchange)
        connection.release()
