"""A network partition between the gateway and RabbitMQ: packets dropped, nothing closed.

Unlike a broker restart, nobody tells the gateway: only AMQP heartbeats (20 s, two
missed) and publisher-confirm timeouts (10 s) can. And the same proxy holding our bytes
for a few seconds only, as RabbitMQ's credit flow does: that must cost nothing. Through a
proxy of our own, so the shared RabbitMQ is not disturbed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from clients.backend import BackendClient
from support.fault_devices import command_roundtrip, connect, expect, ping, send_event, unique
from support.gateways import AMQP_URL, all_ready, launch, readyz_codes
from support.rabbitmq import Blackhole, DurableQueue
from support.waiting import wait_until

pytestmark = pytest.mark.slow


@contextmanager
def device_behind_a_proxy(tmp_path, prefix: str, **env: str) -> Iterator[tuple]:
    """A one-worker gateway that reaches RabbitMQ through a `Blackhole` proxy, a device connected to it, and a
    queue that witnesses the device's events: (proxy, gateway, client, witness)."""
    proxy = Blackhole()
    gateway = launch(tmp_path, workers=1, AMQP_URL=proxy.url, **env)
    device = unique(prefix)
    witness = DurableQueue(f"{device}.#")
    client = connect(gateway.tcp, device)
    try:
        yield proxy, gateway, client, witness
    finally:
        client.close()
        witness.delete()
        gateway.stop()
        proxy.close()


def test_partition_detected_by_heartbeats_and_healed_without_device_reconnects(tmp_path):
    with device_behind_a_proxy(tmp_path, "fxp") as (proxy, gateway, client, witness):
        assert send_event(client, "before")["type"] == "ack"
        proxy.partition()
        cut = time.monotonic()
        nack = send_event(client, "during", timeout=60)
        assert nack["type"] == "nack" and nack["reason"] == "broker_unavailable", nack
        assert nack["retry_after"] > 0
        unconfirmed = time.monotonic() - cut
        ping(client)
        wait_until(lambda: readyz_codes(gateway, tries=2) == {503}, timeout=90, interval=0.5)
        detected = time.monotonic() - cut
        # The overdue confirm (10 s) gives the link up; heartbeats alone take 2 x 20 s.
        assert detected < 30, f"partition noticed only after {detected:.0f}s (heartbeats, not confirms)"
        ping(client)
        proxy.heal()
        healed = time.monotonic()
        wait_until(lambda: all_ready(gateway, 1), timeout=60)
        with BackendClient(AMQP_URL) as backend:
            # Ready means connected; the worker's sessions are claimed again in its first write after
            # that, and a command its owner takes before the claim is answered `offline` (the old
            # queue is gone): commands flow again within moments, not necessarily at once.
            def routed_again() -> bool:
                try:
                    return command_roundtrip(backend, client, timeout=3)["ok"] is True
                except (TimeoutError, AssertionError):
                    return False

            wait_until(routed_again, timeout=30, interval=0.2)
        recovered = time.monotonic() - healed
        assert send_event(client, "after")["type"] == "ack"
        print(f"\n[figure] partition: event nacked (confirm timeout) after {unconfirmed:.1f}s; "
              f"/readyz 503 after {detected:.1f}s; healed -> ready and commands "
              f"flowing after {recovered:.1f}s; the session survived throughout")
        ids = {body["id"] for body in witness.drain()}
        assert {"before", "after"} <= ids


def test_rabbitmq_not_reading_for_seconds_costs_no_connection(tmp_path):
    """RabbitMQ stops reading a connection for a while whenever its credit flow holds back one that
    publishes faster than its queues take (a stampede's presence events), or its node is busy.
    py-amqp's own TCP_USER_TIMEOUT (1 s) had the kernel cut such a connection (ETIMEDOUT): at
    200,000 devices publishers were lost every few minutes. Here the proxy holds our bytes for
    4 s, after the gateway sent more than the sockets between can hold: no connection is lost,
    and every event is acked once RabbitMQ reads on (CONFIRM_TIMEOUT, 10 s, is not reached)."""
    with device_behind_a_proxy(tmp_path, "fxs", MAX_FRAME_BYTES=str(256 * 1024), EVENT_RATE="1000",
                               EVENT_BURST="1000") as (proxy, gateway, client, witness):
        assert send_event(client, "before")["type"] == "ack"
        proxy.partition()
        blob = "x" * (200 * 1024)
        ids = [f"big-{n}" for n in range(100)]  # 20 MB: loopback sockets block after about 4 MB
        for event_id in ids:
            client.send({"type": "event", "id": event_id, "name": "door.opened", "data": {"blob": blob}})
        time.sleep(4)
        proxy.resume()
        answers = {}
        for _ in ids:
            frame = expect(client, lambda f: f.get("type") in {"ack", "nack"}, timeout=30)
            answers[frame["id"]] = frame["type"]
        assert answers == dict.fromkeys(ids, "ack"), {k: v for k, v in answers.items() if v != "ack"}
        assert "lost RabbitMQ" not in gateway.log()
        assert {body["id"] for body in witness.drain()} >= {"before", *ids}
