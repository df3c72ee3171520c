"""Smoke test of the load tool: a few hundred devices against the floor echo server, in seconds.

It proves the tool runs end to end (workers, progress, JSON, PNG), not how fast
anything is. The test marked `gateway` runs it against a real gunicorn gateway on
RabbitMQ (conftest's `gateway` fixture).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from conftest import AMQP_URL, API_TOKEN, SECRET, Gateway, free_port

ROOT = Path(__file__).resolve().parent.parent
DEVICES = 300


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


@pytest.fixture
def floor() -> Iterator[str]:
    """A floor echo server with two workers on a free port, stopped afterwards."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bench.floor", "--port", str(port),
                               "--workers", "2"], cwd=ROOT)
    try:
        wait_for_port(port)
        yield f"tcp://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


def run_stampede(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.stampede", *args], cwd=ROOT, check=False,
                          capture_output=True, text=True, timeout=timeout)


def test_every_device_reaches_the_floor_and_results_are_written(floor: str, tmp_path: Path) -> None:
    out = tmp_path / "ramp.json"
    done = run_stampede("stampede", "--floor", floor, "--devices", str(DEVICES),
                        "--processes", "2", "--jitter", "1", "--settle", "0.5",
                        "--ramp-timeout", "30", "--out", str(out))
    assert done.returncode == 0, done.stderr
    results = orjson.loads(out.read_bytes())
    floor_figures = results["runs"]["floor"]
    assert floor_figures["ramp"]["up"] == DEVICES
    assert floor_figures["ramp"]["failures"] == {}
    for jitter in ("0", "1"):
        assert floor_figures[f"reconnect_jitter_{jitter}s"]["all_back"]
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert "sessions_per_s" in done.stdout
    assert "up" in done.stderr  # the live progress lines


def test_the_floor_hold_counts_the_heartbeats_it_answers(floor: str, tmp_path: Path) -> None:
    out = tmp_path / "hold.json"
    heartbeat = 2.0
    done = run_stampede("hold", "--floor", floor, "--devices", str(DEVICES), "--processes", "2",
                        "--heartbeat", str(heartbeat), "--quiet", "4", "--settle", "0.5",
                        "--ramp-timeout", "30", "--out", str(out))
    assert done.returncode == 0, done.stderr
    results = orjson.loads(out.read_bytes())
    hold = results["runs"]["floor"]["hold"]
    expected = DEVICES * hold["idle_seconds"] / heartbeat
    assert 0.5 < hold["idle_heartbeats_answered"] / expected < 1.5
    assert hold["cpu_ms_per_heartbeat"] is not None
    assert "commands" not in hold  # the floor has no command path: its hold is the idle window
    assert results["per_unit"]["floor"]["heartbeats"] == hold["idle_heartbeats_answered"]
    assert "CPU per heartbeat" in done.stdout


@pytest.mark.gateway
def test_a_real_gateway_answers_every_command_and_loses_no_acked_event(
        gateway: Gateway, tmp_path: Path) -> None:
    out = tmp_path / "hold.json"
    done = run_stampede("hold", "--target", gateway.tcp, "--devices", str(DEVICES),
                        "--secret", SECRET, "--amqp-url", AMQP_URL, "--api-token", API_TOKEN,
                        "--prefix", f"smoke{gateway.port}", "--gateway-pid", str(gateway.process.pid),
                        "--duration", "3", "--quiet", "2", "--heartbeat", "1", "--settle", "0.5",
                        "--command-rate", "30",
                        "--event-rate", "30", "--ramp-timeout", "30", "--out", str(out))
    assert done.returncode == 0, done.stderr
    figures = orjson.loads(out.read_bytes())["runs"]["gateway"]
    assert figures["ramp"]["up"] == DEVICES
    commands, events = figures["hold"]["commands"], figures["hold"]["events"]
    assert commands["sent"] > 0
    assert commands["outcomes"] == {"ok": commands["sent"]}
    assert events["acked"] > 0
    assert events["acked_but_not_consumed"] == 0
    assert figures["ramp"]["rss_kib_per_session"] is not None
    assert figures["hold"]["idle_heartbeats_answered"] > 0
    assert commands["cpu_ms_per_command"] is not None
    assert events["cpu_ms_per_event"] is not None
