"""Graceful shutdown: SIGTERM to the gunicorn master (what Heroku and systemd send)."""

from __future__ import annotations

import signal
import time

import orjson
import pytest

from support.fault_devices import connect, read_until_closed, unique
from support.gateways import launch
from support.rabbitmq import DurableQueue

pytestmark = pytest.mark.slow

GRACEFUL_TIMEOUT = 5


def test_sigterm_drains_sessions_with_jitter_and_loses_no_acked_event(tmp_path):
    gateway = launch(tmp_path, workers=2, GRACEFUL_TIMEOUT=str(GRACEFUL_TIMEOUT), LOG_FORMAT="json")
    prefix = unique("fxs")
    devices = [f"{prefix}-{n}" for n in range(10)]
    witness = DurableQueue(*(f"{device}.#" for device in devices))
    clients = [connect(gateway.tcp if n % 2 else gateway.ws, device) for n, device in enumerate(devices)]
    try:
        for client in clients:  # in flight when the signal arrives
            client.send({"type": "event", "id": "last", "name": "door.closed", "data": {}})
        gateway.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        outcomes, goodbyes = {}, {}
        for client in clients:
            frames = read_until_closed(client, GRACEFUL_TIMEOUT + 10)
            answers = [f for f in frames if f.get("type") in {"ack", "nack"} and f.get("id") == "last"]
            errors = [f for f in frames if f.get("type") == "error"]
            assert len(answers) == 1, f"{client.device}: the in-flight event was dropped silently: {frames}"
            outcomes[client.device] = answers[0]
            assert [e["code"] for e in errors] == ["shutting_down"], frames
            goodbyes[client.device] = errors[0]

        returncode = gateway.process.wait(40)
        elapsed = time.monotonic() - signalled
        print(f"\n[figure] SIGTERM -> gunicorn exited: {elapsed:.1f}s (GRACEFUL_TIMEOUT={GRACEFUL_TIMEOUT})")
        assert returncode == 0
        assert elapsed < 30, "past Heroku's 30 s SIGKILL"

        for device, answer in outcomes.items():
            assert answer["type"] == "ack" or answer["reason"] == "shutting_down", (device, answer)
        retry_afters = [goodbye["retry_after"] for goodbye in goodbyes.values()]
        assert all(value > 0 for value in retry_afters)
        assert len(set(retry_afters)) > 1, f"no jitter: {retry_afters}"

        bodies = witness.drain()
        stored = {(body["device"], body["id"]) for body in bodies if body["name"] == "door.closed"}
        acked = {(device, "last") for device, answer in outcomes.items() if answer["type"] == "ack"}
        assert acked <= stored, f"acked but not in RabbitMQ: {acked - stored}"
        closed = {body["device"]: body["data"]["reason"] for body in bodies if body["name"] == "session.closed"}
        assert closed == dict.fromkeys(devices, "shutting_down"), closed

        lines = [orjson.loads(line) for line in gateway.log().splitlines() if line.startswith("{")]
        crashes = [line for line in lines if "crashed" in line["msg"] or line.get("exc")]
        assert not crashes, crashes
        print(f"[figure] sessions told shutting_down: {len(goodbyes)}/{len(clients)}; events acked "
              f"{len(acked)}, nacked shutting_down {len(outcomes) - len(acked)}; retry_after {sorted(retry_afters)}")
    finally:
        for client in clients:
            client.close()
        witness.delete()
        gateway.stop()
