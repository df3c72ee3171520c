"""Faults of the gateway's own processes: a worker killed, a session that crashes,
thousands of sessions dropped at once, a whole host (master and workers) killed."""

from __future__ import annotations

import os
import signal
import statistics
import textwrap
import threading
import time

import amqp
import pytest

from app.broker.directory import HOLDER_GRACE
from clients.backend import BackendClient
from support.fault_devices import (
    CommandFlow,
    bulk_sessions,
    command_roundtrip,
    connect,
    expect,
    http_roundtrip,
    is_closed,
    ping,
    read_line,
    reset,
    unique,
    worker_of,
)
from support.gateways import AMQP_URL, ROOT, all_ready, kill_tree, launch, metric
from support.rabbitmq import rabbitmqctl
from support.waiting import wait_until

pytestmark = pytest.mark.slow


def offline_now(backend: BackendClient, device: str, lost: list | None = None) -> bool:
    """A command comes back `offline`; one that vanishes (into a dying queue) counts in `lost`."""
    try:
        return backend.command(device, "unlock", timeout=1)["error"] == "offline"
    except TimeoutError:
        if lost is not None:
            lost.append(device)
        return False


def test_worker_sigkill_costs_only_its_own_sessions(tmp_path):
    """SIGKILL one of two workers while commands flow to the other's devices: those miss none and get each
    once; the dead worker's devices are offline until they reconnect, then answer again."""
    gateway = launch(tmp_path, workers=2)
    prefix = unique("fxk")
    clients = []
    backend = BackendClient(AMQP_URL)
    flow_backend = BackendClient(AMQP_URL)
    flow = None
    try:
        while len(clients) < 60:  # until both workers hold sessions
            clients.append(connect(gateway.tcp, f"{prefix}-{len(clients)}"))
            held = worker_of(gateway, clients)
            if len(clients) >= 8 and len(held) == 2 and min(len(v) for v in held.values()) >= 2:
                break
        assert len(held) == 2, "the kernel gave every connection to one worker"
        victim, survivor = sorted(held, key=lambda pid: len(held[pid]))
        lost, kept = held[victim], held[survivor]

        flow = CommandFlow(flow_backend, kept)  # from before the kill until the dead worker's devices are back
        wait_until(lambda: len(flow.delivered) >= 10, timeout=20)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        sent_before_kill = len(flow.sent)
        vanished: list[str] = []
        wait_until(lambda: offline_now(backend, lost[0].device, vanished), timeout=20, interval=0.01)
        print(f"\n[figure] worker SIGKILLed -> a command for one of its devices comes back offline: "
              f"{time.monotonic() - killed:.2f}s ({len(vanished)} command(s) sent before that timed out)")
        # Its devices' commands wait up to HOLDER_GRACE for a claim (README, "A holder's queue goes"): one
        # whose claim an owner replayed only now may wait that long.
        response = gateway.command(lost[1].device, timeout=HOLDER_GRACE + 5)
        assert response.status_code == 404 and response.json()["error"] == "offline"
        for client in lost:
            assert is_closed(client, timeout=10)
        # gunicorn's child_exit marks the dead worker: the instance's gauges stop counting it.
        wait_until(lambda: metric(gateway, "warren_sessions") == len(kept), timeout=20)

        wait_until(lambda: len(gateway.worker_pids()) == 2 and victim not in gateway.worker_pids(), timeout=30)
        wait_until(lambda: all_ready(gateway, 2), timeout=30)
        again = [connect(gateway.tcp, client.device) for client in lost]
        clients += again
        for client in again:  # the dead worker's devices answer again once reconnected
            assert command_roundtrip(backend, client)["ok"] is True
        replies = flow.stop()
        assert len(flow.sent) > sent_before_kill > 0
        # The other worker's devices missed none of the commands sent through the kill, and got each once.
        assert [reply.get("error") for reply in replies if not reply.get("ok")] == []
        assert sorted(flow.delivered) == sorted(flow.sent)
        assert metric(gateway, "warren_sessions") == len(kept) + len(again)
        for client in kept:  # their sessions are untouched
            ping(client)
            assert command_roundtrip(backend, client)["ok"] is True
        print(f"[figure] session loss: {len(lost)} of {len(lost) + len(kept)} (the killed worker's), "
              f"all reconnected; {len(flow.sent)} commands to the other worker's devices "
              f"({len(flow.sent) - sent_before_kill} after the kill), all answered once")
    finally:
        if flow is not None:
            flow.close()
        flow_backend.close()
        backend.close()
        for client in clients:
            client.close()
        gateway.stop()


def _queue_exists(channel_factory, name: str) -> bool:
    channel = channel_factory()
    try:
        channel.queue_declare(name, passive=True)
        channel.close()
        return True
    except amqp.exceptions.ResourceLocked:  # exclusive to a connection that is still alive
        return True
    except amqp.exceptions.NotFound:
        return False


def test_dead_worker_with_many_bindings_cost_to_rabbitmq(tmp_path):
    """Measure (not assert) what RabbitMQ pays when a worker holding 5,000 bindings dies:
    how long its queue takes to go, and the publish->confirm latency another connection sees."""
    sessions = int(os.environ.get("FAULTS_BINDINGS", "5000"))
    gateway = launch(tmp_path, workers=1)
    prefix = unique("fxb")
    socks = []
    try:
        started = time.monotonic()
        socks = bulk_sessions(gateway, [f"{prefix}-{n}" for n in range(sessions)])
        wait_until(lambda: metric(gateway, "warren_sessions") == sessions, timeout=60)
        with BackendClient(AMQP_URL) as backend:  # bindings are written in order: the last one proves all
            command_id = backend.send(f"{prefix}-{sessions - 1}", "unlock", timeout=30)
            frame = read_line(socks[-1])
            assert frame["type"] == "command" and frame["id"] == command_id
        print(f"\n[figure] {sessions} sessions and bindings on one worker in {time.monotonic() - started:.1f}s")
        worker = gateway.worker_pids()[0]
        queue = next(name for name in rabbitmqctl("list_queues", "-q", "--no-table-headers", "name").split()
                     if f".{worker}." in name)

        probe = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
        probe.connect()
        channel = probe.channel()
        channel.confirm_select()
        target = channel.queue_declare("", exclusive=True, auto_delete=True).queue
        watcher = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
        watcher.connect()
        latencies: list[tuple[float, float]] = []
        stop = threading.Event()

        def publish_forever():
            while not stop.is_set():
                sent = time.monotonic()
                channel.basic_publish_confirm(amqp.Message(b"x"), exchange="", routing_key=target)
                latencies.append((sent, time.monotonic() - sent))
                time.sleep(0.002)

        prober = threading.Thread(target=publish_forever, daemon=True)
        prober.start()
        time.sleep(2)
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: not _queue_exists(watcher.channel, queue), timeout=120, interval=0.05)
        gone = time.monotonic() - killed
        time.sleep(2)
        stop.set()
        prober.join(30)
        probe.close()
        watcher.close()

        before = [lat for sent, lat in latencies if sent < killed]
        during = [lat for sent, lat in latencies if killed <= sent < killed + gone + 0.5] or [0.0]
        stalled = max((lat for sent, lat in latencies if sent >= killed - 1), default=0.0)
        print(f"[figure] worker with {sessions} bindings SIGKILLed: its queue gone after {gone:.2f}s; "
              f"another connection's publish->confirm: median {statistics.median(before) * 1000:.1f} ms "
              f"before, median {statistics.median(during) * 1000:.1f} ms / max {stalled * 1000:.0f} ms "
              f"while the queue was deleted ({len(during)} publishes)")
        assert latencies and latencies[-1][0] > killed + gone  # the prober kept publishing throughout
        wait_until(lambda: all_ready(gateway, 1), timeout=30)
    finally:
        for sock in socks:
            sock.close()
        gateway.stop()


INJECTOR = '''
"""Fault injection for tests/test_faults_workers.py (on PYTHONPATH of that gunicorn only).

A bug in one code path: a device reply whose error is "inject-crash" raises.
"""
import os

if os.environ.get("WARREN_INJECT_FAULT") == "reply-crash":
    # app.metrics writes there as soon as it is imported (gunicorn.conf.py makes it later).
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    from app.sessions import session as _session

    _original = _session.Session._on_reply

    def _on_reply(self, frame):
        if frame.get("error") == "inject-crash":
            raise RuntimeError("injected bug in Session._on_reply")
        return _original(self, frame)

    _session.Session._on_reply = _on_reply
'''


def test_a_crashing_session_ends_alone(tmp_path):
    """An exception inside one session's handler ends that session only: the others on
    the same worker keep their sockets and their commands, and nothing restarts."""
    injector = tmp_path / "inject"
    injector.mkdir()
    (injector / "sitecustomize.py").write_text(textwrap.dedent(INJECTOR))
    gateway = launch(tmp_path, workers=1, PYTHONPATH=f"{injector}{os.pathsep}{ROOT}",
                     WARREN_INJECT_FAULT="reply-crash")
    prefix = unique("fxx")
    bystanders = [connect(gateway.tcp if n % 2 else gateway.ws, f"{prefix}-{n}") for n in range(6)]
    victim = connect(gateway.tcp, f"{prefix}-victim")
    worker = gateway.worker_pids()
    backend = BackendClient(AMQP_URL)
    try:
        command_id = backend.send(victim.device, "unlock", timeout=10)
        frame = expect(victim, lambda f: f.get("type") == "command")
        assert frame["id"] == command_id
        victim.send({"type": "reply", "id": command_id, "ok": False, "error": "inject-crash"})
        assert is_closed(victim, timeout=10)

        wait_until(lambda: metric(gateway, "warren_sessions") == len(bystanders), timeout=10)
        for client in bystanders:
            ping(client)
            assert command_roundtrip(backend, client)["ok"] is True
        assert metric(gateway, 'warren_crashes_total{supervisor="connections"}') == 1
        assert metric(gateway, "warren_supervisor_restarts_total") == 0
        assert gateway.worker_pids() == worker
        assert "injected bug in Session._on_reply" in gateway.log()
        again = connect(gateway.tcp, victim.device)
        assert command_roundtrip(backend, again)["ok"] is True
        again.close()
    finally:
        backend.close()
        victim.close()
        for client in bystanders:
            client.close()
        gateway.stop()


def test_thousands_of_sessions_dropped_at_once_restart_nothing(tmp_path):
    count = int(os.environ.get("FAULTS_MASS_DROP", "2000"))
    gateway = launch(tmp_path, workers=2)
    prefix = unique("fxd")
    bystander = connect(gateway.ws, f"{prefix}-bystander")
    socks = []
    backend = BackendClient(AMQP_URL)
    try:
        pids = sorted(gateway.worker_pids())
        socks = bulk_sessions(gateway, [f"{prefix}-{n}" for n in range(count)])
        wait_until(lambda: metric(gateway, "warren_sessions") == count + 1, timeout=60)
        for n, sock in enumerate(socks):  # half vanish with an RST, half with a FIN, all at once
            reset(sock) if n % 2 else sock.close()
        dropped = time.monotonic()
        wait_until(lambda: metric(gateway, "warren_sessions") == 1, timeout=60)
        print(f"\n[figure] {count} sessions dropped at once: all closed on the gateway after "
              f"{time.monotonic() - dropped:.1f}s")
        ping(bystander)
        assert command_roundtrip(backend, bystander)["ok"] is True
        assert metric(gateway, "warren_supervisor_restarts_total") == 0
        assert metric(gateway, "warren_crashes_total") == 0
        assert sorted(gateway.worker_pids()) == pids
        assert "crashed" not in gateway.log()
    finally:
        backend.close()
        bystander.close()
        for sock in socks:
            sock.close()
        gateway.stop()


def test_host_killed_devices_move_to_the_other_instance(tmp_path):
    """Two gateway instances on one RabbitMQ; SIGKILL one instance's master and workers:
    its devices reconnect to the other, and commands sent through the survivor reach them."""
    doomed = launch(tmp_path, workers=2)
    survivor = launch(tmp_path, workers=2)
    prefix = unique("fxh")
    clients = [connect(doomed.tcp if n % 2 else doomed.ws, f"{prefix}-{n}") for n in range(8)]
    stay = connect(survivor.tcp, f"{prefix}-stay")
    moved = []
    backend = BackendClient(AMQP_URL)
    try:
        response = survivor.command(clients[0].device, timeout=1)  # routed to the doomed host
        assert response.status_code == 504
        kill_tree(doomed)
        killed = time.monotonic()
        for client in clients:
            assert is_closed(client, timeout=10)

        def offline_via_survivor():
            return survivor.command(clients[1].device, timeout=3).status_code == 404

        wait_until(offline_via_survivor, timeout=20)
        print(f"\n[figure] host killed -> its devices answer offline through the survivor after "
              f"{time.monotonic() - killed:.2f}s")
        moved = [connect(survivor.tcp if n % 2 else survivor.ws, client.device)
                 for n, client in enumerate(clients)]
        for client in moved:
            assert command_roundtrip(backend, client)["ok"] is True
        for client in moved[:3]:
            response = http_roundtrip(survivor, client)
            assert response.status_code == 200 and response.json()["ok"] is True
        ping(stay)
        assert command_roundtrip(backend, stay)["ok"] is True
    finally:
        backend.close()
        for client in clients + moved + [stay]:
            client.close()
        doomed.stop()
        survivor.stop()
