"""Floods: more devices than a worker takes, a device over its rate limit, slow-loris
connections, and a reconnect storm without jitter."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from clients.backend import BackendClient
from clients.device import DeviceClient
from support.fault_devices import (
    command_roundtrip,
    connect,
    expect,
    hello_line,
    is_closed,
    ping,
    read_line,
    reset,
    unique,
)
from support.gateways import AMQP_URL, SECRET, get, launch, metric
from support.rabbitmq import DurableQueue
from support.waiting import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One worker that takes 5 sessions, 2 events a second (burst 5), hello within 2 s."""
    gateway = launch(tmp_path_factory.mktemp("small"), workers=1, MAX_CONNECTIONS="5",
                     EVENT_RATE="2", EVENT_BURST="5", HELLO_TIMEOUT="2")
    yield gateway
    gateway.stop()


def test_over_max_connections_new_sessions_get_overloaded(small):
    prefix = unique("fxo")
    clients = [connect(small.tcp if n % 2 else small.ws, f"{prefix}-{n}") for n in range(5)]
    backend = BackendClient(AMQP_URL)
    try:
        for transport in ("tcp", "ws"):
            extra = DeviceClient(small.url(transport))
            refusal = extra.hello(f"{prefix}-extra", SECRET)
            assert refusal["type"] == "error" and refusal["code"] == "overloaded", refusal
            assert refusal["retry_after"] > 0
            assert is_closed(extra)
            extra.close()
        for client in clients:  # established sessions keep answering
            ping(client)
        assert command_roundtrip(backend, clients[0])["ok"] is True
        assert metric(small, 'warren_hello_failures_total{code="overloaded"}') >= 2
        clients.pop().close()
        wait_until(lambda: metric(small, "warren_sessions") == 4, timeout=10)
        clients.append(connect(small.tcp, f"{prefix}-later"))  # room again
        ping(clients[-1])
    finally:
        backend.close()
        for client in clients:
            client.close()


def test_a_device_over_its_rate_limit_is_told_and_kept(small):
    device = unique("fxl")
    witness = DurableQueue(f"{device}.#")
    client = connect(small.tcp, device)
    try:
        for n in range(12):
            client.send({"type": "event", "id": f"e-{n}", "name": "meter.reading", "data": n})
        answers = [expect(client, lambda f: f.get("type") in {"ack", "nack"}) for _ in range(12)]
        limited = [a for a in answers if a["type"] == "nack" and a["reason"] == "rate_limited"]
        assert limited and all(a["retry_after"] > 0 for a in limited), answers
        assert sum(a["type"] == "ack" for a in answers) >= 5, answers  # the burst
        client.send({"type": "ping"})
        answer = expect(client, lambda f: f.get("type") in {"pong", "error"})
        assert answer["type"] == "pong" or answer["code"] == "rate_limited"
        time.sleep(max(a["retry_after"] for a in limited) + 0.5)
        ping(client)  # the session is still here, and the bucket refilled
        client.send({"type": "event", "id": "after", "name": "meter.reading", "data": 0})
        acked = expect(client, lambda f: f.get("type") in {"ack", "nack"} and f["id"] == "after")
        assert acked["type"] == "ack", acked
        stored = {body["id"] for body in witness.drain() if body["name"] == "meter.reading"}
        assert stored == {a["id"] for a in answers if a["type"] == "ack"} | {"after"}
    finally:
        client.close()
        witness.delete()


def test_slow_loris_is_shed_at_hello_timeout(small):
    """Half a hello line, then silence: cut at HELLO_TIMEOUT, on both ports."""
    keeper = connect(small.tcp, unique("fxk"))
    loris = socket.create_connection(("127.0.0.1", small.device_port), timeout=15)
    silent = socket.create_connection(("127.0.0.1", small.device_port), timeout=15)
    http = socket.create_connection(("127.0.0.1", small.port), timeout=15)
    try:
        opened = time.monotonic()
        loris.sendall(b'{"type":"hello","devi')
        http.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")  # never ends
        frame = read_line(loris, timeout=15)
        assert frame["type"] == "error" and frame["code"] == "hello_timeout", frame
        assert loris.recv(1) == b""
        assert read_line(silent, timeout=15)["code"] == "hello_timeout"
        print(f"\n[figure] slow-loris on the device port cut after {time.monotonic() - opened:.1f}s "
              f"(HELLO_TIMEOUT=2)")
        http.settimeout(15)
        try:
            data = http.recv(65536)
        except ConnectionError:
            data = b""
        print(f"[figure] slow-loris on the HTTP port cut after {time.monotonic() - opened:.1f}s")
        assert data == b"" or data.startswith((b"HTTP/1.1 408", b"HTTP/1.1 400")), data
        ping(keeper)
    finally:
        for sock in (loris, silent, http):
            sock.close()
        keeper.close()


@pytest.mark.parametrize("port", ["device", "http"])
def test_dribbling_slow_loris_is_shed_at_hello_timeout(small, port):
    """A byte every half second never lets one read time out: the deadline is for the whole
    hello (or request head), not for each read."""
    keeper = connect(small.ws, unique("fxk"))
    address = ("127.0.0.1", small.device_port if port == "device" else small.port)
    payload = (b'{"type":"hello","device":"' + b"d" * 100 if port == "device"
               else b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"p" * 100)
    sock = socket.create_connection(address, timeout=0.5)
    try:
        opened = time.monotonic()
        received = b""
        for byte in payload:
            try:
                sock.sendall(bytes([byte]))
                received = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            break  # an answer (hello_timeout, 400) or the end of the stream: shed
        shed_after = time.monotonic() - opened
        print(f"\n[figure] dribbling slow-loris on the {port} port cut after {shed_after:.1f}s")
        assert shed_after < len(payload) * 0.5, "never cut while it kept dribbling"
        if port == "device" and received:
            assert b'"hello_timeout"' in received, received
        ping(keeper)
    finally:
        sock.close()
        keeper.close()


def test_reconnect_storm_without_jitter(tmp_path):
    """A few hundred devices connect at the same instant, are all dropped at once, and all
    come straight back at once, retrying without jitter when refused."""
    count = 300
    gateway = launch(tmp_path, workers=2)
    prefix = unique("fxs")
    pids = sorted(gateway.worker_pids())
    socks: list[socket.socket | None] = [None] * count
    refusals: list[str] = []

    def storm():
        barrier = threading.Barrier(count)

        def device(n: int) -> None:
            barrier.wait()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    sock = socket.create_connection(("127.0.0.1", gateway.device_port), timeout=30)
                    sock.sendall(hello_line(f"{prefix}-{n}"))
                    frame = read_line(sock, timeout=30)
                except OSError as exc:
                    refusals.append(repr(exc))
                    time.sleep(0.5)
                    continue
                if frame.get("type") == "welcome":
                    socks[n] = sock
                    return
                refusals.append(frame.get("code", "?"))
                sock.close()
                time.sleep(0.5)  # the same for everyone: no jitter

        threads = [threading.Thread(target=device, args=(n,)) for n in range(count)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        return time.monotonic() - started

    try:
        first = storm()
        assert all(socks), f"{socks.count(None)} devices never got in; refusals: {refusals[:10]}"
        wait_until(lambda: metric(gateway, "warren_sessions") == count, timeout=30)
        for sock in socks:
            reset(sock)
        socks = [None] * count
        second = storm()
        assert all(socks), f"{socks.count(None)} devices never got back; refusals: {refusals[:10]}"
        wait_until(lambda: metric(gateway, "warren_sessions") == count, timeout=30)
        print(f"\n[figure] storm of {count}: all connected in {first:.1f}s; dropped at once and all back "
              f"in {second:.1f}s; refusals/retries: {len(refusals)}")
        assert get(gateway, "/healthz").status_code == 200
        assert sorted(gateway.worker_pids()) == pids
        assert metric(gateway, "warren_supervisor_restarts_total") == 0
        with BackendClient(AMQP_URL) as backend:
            command_id = backend.send(f"{prefix}-0", "unlock", timeout=10)
            assert read_line(socks[0])["id"] == command_id
    finally:
        for sock in socks:
            if sock is not None:
                sock.close()
        gateway.stop()


def test_hello_flood_of_bad_tokens_does_not_disturb_sessions(small):
    """Garbage and bad-token hellos by the hundred: each refused, the sessions unharmed."""
    keeper = connect(small.ws, unique("fxg"))
    try:
        for n in range(100):
            with socket.create_connection(("127.0.0.1", small.device_port), timeout=10) as sock:
                sock.sendall(b'{"type":"hello","device":"x","token":"00","v":1}\n' if n % 2
                             else b"\x00\xff garbage\n")
                assert read_line(sock)["code"] == "unauthorized"
        ping(keeper)
    finally:
        keeper.close()


def test_a_device_that_stops_reading_is_cut_not_buffered(tmp_path):
    """Commands pile up for a device that never reads: past SEND_BUFFER_BYTES of unread
    output its session is cut; the worker does not grow with it, other sessions carry on."""
    gateway = launch(tmp_path, workers=1, SEND_BUFFER_BYTES="65536")
    prefix = unique("fxw")
    keeper = connect(gateway.tcp, f"{prefix}-keeper")
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", gateway.device_port))
    stuck.sendall(hello_line(f"{prefix}-stuck"))
    assert read_line(stuck)["type"] == "welcome"
    import psutil

    worker = psutil.Process(gateway.worker_pids()[0])
    rss_before = worker.memory_info().rss
    try:
        wait_until(lambda: metric(gateway, "warren_sessions") == 2, timeout=10)
        payload = {"blob": "x" * 2000}
        with BackendClient(AMQP_URL) as backend:
            sent = 0
            while metric(gateway, "warren_sessions") == 2 and sent < 40000:
                for _ in range(500):
                    backend.send(f"{prefix}-stuck", "firmware.chunk", payload, timeout=60)
                sent += 500
                time.sleep(0.05)
            wait_until(lambda: metric(gateway, "warren_sessions") == 1, timeout=30)
            grown = (worker.memory_info().rss - rss_before) / 1e6
            print(f"\n[figure] a device that stopped reading was cut after ~{sent} commands of 2 kB; "
                  f"worker RSS grew {grown:.0f} MB meanwhile")
            ping(keeper)
            assert command_roundtrip(backend, keeper)["ok"] is True
            assert backend.command(f"{prefix}-stuck", "unlock", timeout=5)["error"] == "offline"
        assert metric(gateway, "warren_crashes_total") == 0
    finally:
        stuck.close()
        keeper.close()
        gateway.stop()
