"""Faults of RabbitMQ itself: connections closed by the broker, the broker app stopped,
a gateway booting while RabbitMQ is down or unreachable, and a memory alarm.

These tests disturb the shared RabbitMQ (stop_app, memory alarm): they live in this
one module, keep the disturbance short, and always leave RabbitMQ running.
"""

from __future__ import annotations

import time

import pytest
import requests

from clients.backend import BackendClient
from support.fault_devices import (
    command_roundtrip,
    connect,
    http_roundtrip,
    ping,
    read_until_closed,
    send_event,
    unique,
)
from support.gateways import AMQP_URL, API_TOKEN, all_ready, get, launch, metric, readyz_codes
from support.rabbitmq import DurableQueue, close_connections, rabbitmqctl
from support.waiting import wait_until

pytestmark = pytest.mark.slow


def _ensure_rabbit_running() -> None:
    rabbitmqctl("start_app", check=False)
    rabbitmqctl("await_startup", check=False)


@pytest.fixture
def rabbit_restored():
    """Whatever happens in the test, RabbitMQ ends up running and without an alarm."""
    try:
        yield
    finally:
        rabbitmqctl("set_vm_memory_high_watermark", "0.4", check=False)
        _ensure_rabbit_running()


def test_connections_closed_by_broker_sessions_survive_and_traffic_resumes(tmp_path, rabbit_restored):
    """`close_connection` on every AMQP connection of the gateway: the links reconnect,
    re-declare and re-bind every live session; no device reconnects."""
    gateway = launch(tmp_path, workers=2)
    prefix = unique("fxc")
    witness = DurableQueue(f"{prefix}-0.door.#")
    clients = [connect(gateway.tcp if n % 2 else gateway.ws, f"{prefix}-{n}") for n in range(6)]
    backend = BackendClient(AMQP_URL)
    try:
        assert send_event(clients[0], "before")["type"] == "ack"
        opened_before = metric(gateway, "warren_sessions_opened_total")

        closed = close_connections(gateway.worker_pids())
        started = time.monotonic()  # rabbitmqctl has closed them all
        assert len(closed) == 6, closed  # three links per worker: publisher, consumer, bans
        for client in clients:  # the very same sockets keep answering
            ping(client)
        wait_until(lambda: all_ready(gateway, 2), timeout=60)
        for client in clients:
            assert command_roundtrip(backend, client)["ok"] is True
        recovered = time.monotonic() - started
        assert http_roundtrip(gateway, clients[1]).status_code == 200
        assert send_event(clients[0], "after")["type"] == "ack"
        print(f"\n[figure] rabbitmqctl close_connection returned -> every worker ready and commands to all "
              f"{len(clients)} devices answered: {recovered:.2f}s")

        assert metric(gateway, "warren_sessions") == len(clients)
        assert metric(gateway, "warren_sessions_opened_total") == opened_before
        assert gateway.log().count("lost RabbitMQ") >= 4
        ids = [body["id"] for body in witness.drain()]
        assert "before" in ids and "after" in ids
    finally:
        backend.close()
        for client in clients:
            client.close()
        witness.delete()
        gateway.stop()


def found(gateway, device: str) -> bool:
    """The operator API finds `device`'s session (its claim is routed)."""
    response = requests.get(f"{gateway.http}/devices/{device}", headers={"Authorization": f"Bearer {API_TOKEN}"},
                            timeout=10)
    return response.status_code == 200


def test_broker_stopped_and_restarted(tmp_path, rabbit_restored):
    """stop_app: sessions stay, /readyz 503, events nacked broker_unavailable, the HTTP
    API answers 503, and a gateway can boot meanwhile. start_app: everything resumes
    without any device reconnecting; an event acked before the outage is still queued."""
    gateway = launch(tmp_path, workers=2)
    prefix = unique("fxr")
    witness = DurableQueue(f"{prefix}-0.door.#")
    clients = [connect(gateway.tcp if n % 2 else gateway.ws, f"{prefix}-{n}") for n in range(4)]
    late = twin = None
    booted = None
    try:
        assert send_event(clients[0], "before")["type"] == "ack"
        rabbitmqctl("stop_app")
        stopped = time.monotonic()
        try:
            wait_until(lambda: readyz_codes(gateway) == {503}, timeout=30)
            for client in clients:
                ping(client)
            nack = send_event(clients[0], "during")
            assert nack["type"] == "nack" and nack["reason"] == "broker_unavailable", nack
            assert nack["retry_after"] > 0
            response = gateway.command(clients[1].device, timeout=3)
            assert response.status_code == 503 and response.json()["error"] == "broker_unavailable"

            # A worker never fails to boot because RabbitMQ is down.
            booted = launch(tmp_path, workers=2, wait=False)
            pids = sorted(booted.worker_pids())
            assert get(booted, "/healthz").status_code == 200
            assert readyz_codes(booted) == {503}
            late = connect(booted.tcp, f"{prefix}-late")
            ping(late)
            # A device that gives up on its old connection and says hello again meanwhile.
            twin = connect(gateway.tcp, clients[2].device)
            ping(twin)
            time.sleep(3)  # several reconnect attempts later...
            assert booted.process.poll() is None
            assert sorted(booted.worker_pids()) == pids, "workers died while RabbitMQ was down"
            print(f"\n[figure] outage observed for {time.monotonic() - stopped:.1f}s")
        finally:
            rabbitmqctl("start_app")
        restarted = time.monotonic()

        wait_until(lambda: all_ready(gateway, 2), timeout=60)
        # One session per device, across workers, once RabbitMQ is back: the older one goes.
        old_frames = read_until_closed(clients[2], timeout=30)
        assert [f["code"] for f in old_frames if f.get("type") == "error"] == ["replaced"], old_frames
        clients[2] = twin
        with BackendClient(AMQP_URL) as backend:
            for client in clients:
                assert command_roundtrip(backend, client)["ok"] is True
            recovered = time.monotonic() - restarted
            wait_until(lambda: all_ready(booted, 2), timeout=60)
            # A session welcomed during the outage is claimed once its worker has read the bans (up to
            # LOAD_WAIT after its ban link connects, which backs off on its own): found from then on.
            wait_until(lambda: found(booted, late.device), timeout=30)
            assert command_roundtrip(backend, late)["ok"] is True
        print(f"[figure] start_app returned -> every worker ready and commands to all devices "
              f"answered: {recovered:.2f}s")
        assert http_roundtrip(gateway, clients[1]).status_code == 200
        assert readyz_codes(gateway) == {200}
        assert send_event(clients[0], "after")["type"] == "ack"
        for client in clients:
            ping(client)
        assert metric(gateway, "warren_sessions") == len(clients)
        assert metric(gateway, "warren_sessions_closed_total") == 1  # the replaced one
        assert metric(gateway, 'warren_sessions_closed_total{reason="replaced"}') == 1
        ids = [body["id"] for body in witness.drain()]
        assert "before" in ids and "after" in ids and "during" not in ids
    finally:
        for client in clients + [c for c in (late, twin) if c]:
            client.close()
        witness.delete()
        gateway.stop()
        if booted is not None:
            booted.stop()


def test_unreachable_broker_at_boot_keeps_gunicorn_up(tmp_path):
    """AMQP_URL pointing at a closed port: a configuration nobody can fix from here, but
    gunicorn keeps running, healthy and not ready, and devices can still say hello."""
    gateway = launch(tmp_path, workers=2, wait=False, AMQP_URL="amqp://guest:guest@127.0.0.1:1//")
    try:
        pids = sorted(gateway.worker_pids())
        client = connect(gateway.tcp, unique("fxu"))
        ping(client)
        nack = send_event(client, "e-1")
        assert nack["type"] == "nack" and nack["reason"] == "broker_unavailable"
        time.sleep(4)
        assert gateway.process.poll() is None
        assert sorted(gateway.worker_pids()) == pids
        assert get(gateway, "/healthz").status_code == 200
        assert readyz_codes(gateway) == {503}
        assert gateway.command(client.device, timeout=2).status_code == 503
        ping(client)
        assert "cannot reach RabbitMQ" in gateway.log()
        client.close()
    finally:
        gateway.stop()


def test_memory_alarm_nacks_events_and_recovers(tmp_path, rabbit_restored):
    """A memory alarm blocks publishing: events are nacked broker_unavailable with a
    retry_after instead of piling up; sessions stay; once it clears, events are acked."""
    gateway = launch(tmp_path, workers=2)
    device = unique("fxm")
    witness = DurableQueue(f"{device}.#")  # events nobody takes are nacked unroutable
    client = connect(gateway.tcp, device)
    try:
        assert send_event(client, "before")["type"] == "ack"
        rabbitmqctl("set_vm_memory_high_watermark", "0.0000001")
        alarmed = time.monotonic()
        try:
            answers = []

            def nacked_unavailable():
                answer = send_event(client, f"alarm-{len(answers)}", timeout=20)
                answers.append(answer)
                return answer["type"] == "nack" and answer["reason"] == "broker_unavailable"

            wait_until(nacked_unavailable, timeout=60, interval=0.2)
            print(f"\n[figure] memory alarm -> first event nacked broker_unavailable: "
                  f"{time.monotonic() - alarmed:.1f}s ({len(answers)} events tried)")
            assert answers[-1]["retry_after"] > 0
            assert metric(gateway, "warren_broker_blocked") >= 1
            # Blocked now: further events are refused at once, not queued behind the alarm.
            for n in range(3):
                answer = send_event(client, f"blocked-{n}", timeout=5)
                assert answer["type"] == "nack" and answer["reason"] == "broker_unavailable", answer
            ping(client)
            # (/readyz turns 503 on the workers RabbitMQ blocked: those that tried to publish.)
            hello_sent = time.monotonic()
            late = connect(gateway.tcp if len(answers) % 2 else gateway.ws, unique("fxm"))
            print(f"[figure] hello during the alarm welcomed after {time.monotonic() - hello_sent:.1f}s")
        finally:
            rabbitmqctl("set_vm_memory_high_watermark", "0.4")
        cleared = time.monotonic()
        answers = []

        def acked():
            answer = send_event(client, f"cleared-{len(answers)}", timeout=20)
            answers.append(answer)
            return answer["type"] == "ack"

        wait_until(acked, timeout=60, interval=0.2)
        print(f"[figure] alarm cleared -> events acked again: {time.monotonic() - cleared:.1f}s")
        ping(client)
        assert metric(gateway, "warren_broker_blocked") == 0
        assert readyz_codes(gateway) == {200}
        with BackendClient(AMQP_URL) as backend:  # its binding went through once unblocked
            assert command_roundtrip(backend, late, timeout=20)["ok"] is True
            assert command_roundtrip(backend, client)["ok"] is True
        late.close()
        assert "lost RabbitMQ" not in gateway.log()  # blocked is not dead: no reconnect
        ids = {body["id"] for body in witness.drain()}
        assert "before" in ids and answers[-1]["id"] in ids
        print(f"[figure] the event caught by the alarm (nacked after the confirm timeout) was "
              f"{'stored anyway (a duplicate when resent)' if 'alarm-0' in ids else 'not stored'}")
        assert not any(i.startswith("blocked-") for i in ids)
    finally:
        client.close()
        witness.delete()
        gateway.stop()


def test_sigterm_while_confirms_hang_still_answers_every_event(tmp_path, rabbit_restored):
    """SIGTERM while RabbitMQ withholds confirms (memory alarm): the drain window ends before
    the confirm timeout, yet the in-flight event is nacked shutting_down and the session
    told shutting_down, never cut without a word."""
    import signal

    gateway = launch(tmp_path, workers=1, GRACEFUL_TIMEOUT="5")
    device = unique("fxt")
    witness = DurableQueue(f"{device}.#")
    client = connect(gateway.tcp, device)
    idle = connect(gateway.ws, unique("fxt"))
    try:
        assert send_event(client, "before")["type"] == "ack"
        rabbitmqctl("set_vm_memory_high_watermark", "0.0000001")
        try:
            time.sleep(1)
            client.send({"type": "event", "id": "held", "name": "door.opened", "data": {}})
            time.sleep(0.5)  # published, its confirm withheld
            gateway.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            frames = read_until_closed(client, timeout=40)
            idle_frames = read_until_closed(idle, timeout=40)
            gateway.process.wait(40)
            elapsed = time.monotonic() - signalled
        finally:
            rabbitmqctl("set_vm_memory_high_watermark", "0.4")
        print(f"\n[figure] SIGTERM with a confirm withheld: gunicorn exited after {elapsed:.1f}s; "
              f"device saw {frames}")
        answers = [f for f in frames if f.get("id") == "held" and f.get("type") in {"ack", "nack"}]
        assert answers and (answers[0]["type"] == "ack" or answers[0]["reason"] == "shutting_down"), frames
        assert [f["code"] for f in frames if f.get("type") == "error"] == ["shutting_down"], frames
        assert [f["code"] for f in idle_frames if f.get("type") == "error"] == ["shutting_down"], idle_frames
        assert elapsed < 30
        stored = {body["id"] for body in witness.drain() if body["name"] == "door.opened"}
        assert "before" in stored
        print(f"[figure] the event nacked shutting_down was {'STORED' if 'held' in stored else 'not stored'}")
    finally:
        client.close()
        idle.close()
        witness.delete()
        gateway.stop()


def test_broker_refusing_setup_leaks_no_connections(tmp_path):
    """A RabbitMQ that accepts the connection but refuses the declare (here `devices.events`
    already exists as another type, in a vhost of its own): the worker keeps retrying with
    backoff, stays up and not ready, and leaves no connection behind per retry."""
    from kombu import Connection

    vhost = unique("fx-vhost")
    rabbitmqctl("add_vhost", vhost)
    gateway = None
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        url = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
        with Connection(url) as connection:
            connection.channel().exchange_declare("devices.events", "direct", durable=True)
        gateway = launch(tmp_path, workers=1, wait=False, AMQP_URL=url)
        pid = gateway.worker_pids()
        counts = []
        for _ in range(5):
            time.sleep(2)
            listed = rabbitmqctl("list_connections", "-q", "--no-table-headers", "vhost")
            counts.append(sum(1 for line in listed.splitlines() if line.strip() == vhost))
        print(f"\n[figure] connections open at RabbitMQ while setup keeps failing: {counts}")
        assert max(counts) <= 2, counts  # at most the two links' current attempts
        assert gateway.log().count("PRECONDITION_FAILED") >= 2
        assert readyz_codes(gateway) == {503}
        assert gateway.process.poll() is None and gateway.worker_pids() == pid
    finally:
        if gateway is not None:
            gateway.stop()
        rabbitmqctl("delete_vhost", vhost, check=False)
