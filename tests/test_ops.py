"""Operations: metrics across workers (a SIGKILLed worker stops counting) and one log line per event."""

from __future__ import annotations

import json
import os
import signal

import pytest
import requests
from prometheus_client.metrics import MetricWrapperBase

from app import metrics
from clients.device import DeviceClient
from support.gateways import SECRET, metric_value, start_gateway
from support.waiting import wait_until

# Every metric the operations issue asks for, by name (counters end in _total in the text format).
EXPECTED_METRICS = (
    "warren_sessions", "warren_worker_sessions", "warren_connections", "warren_sessions_opened_total",
    "warren_sessions_closed_total", "warren_hello_failures_total", "warren_errors_sent_total",
    "warren_events_total", "warren_event_confirm_seconds_bucket", "warren_commands_total",
    "warren_command_device_seconds_bucket", "warren_command_api_seconds_bucket",
    "warren_supervisor_restarts_total", "warren_supervisor_gave_up_total", "warren_crashes_total",
    "warren_broker_connected", "warren_broker_blocked", "warren_accept_paused", "warren_workers",
)


def scrape(gateway) -> str:
    return requests.get(f"{gateway.http}/metrics", timeout=5).text


def scrape_until(gateway, predicate, timeout: float = 10) -> str:
    """Scrape /metrics until predicate(text) holds; return that text."""
    def attempt():
        text = scrape(gateway)
        return text if predicate(text) else None

    return wait_until(attempt, timeout=timeout)


def sessions_by_worker(text: str) -> dict[int, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("warren_worker_sessions{"):
            pid = int(line.split('pid="', 1)[1].split('"', 1)[0])
            out[pid] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.fixture(scope="module")
def ops_gateway(tmp_path_factory):
    instance = start_gateway(tmp_path_factory.mktemp("ops"), workers=2, LOG_FORMAT="json", HELLO_TIMEOUT="2")
    yield instance
    instance.stop()


def test_metrics_are_exposed_and_updated(ops_gateway):
    gateway = ops_gateway
    with DeviceClient(gateway.ws) as device:
        assert device.hello("metrics-ws", SECRET)["type"] == "welcome"
        device.send({"type": "event", "id": "e-1", "name": "door.opened", "data": {}})
        assert device.receive()["type"] in {"ack", "nack"}
        device.send(b"nonsense")
        assert device.receive()["code"] == "bad_frame"
        # 404 offline; 503 while RabbitMQ blocks publishers (other tests on this broker may do that).
        assert gateway.command("metrics-offline-device").status_code in {404, 503}
        with DeviceClient(gateway.tcp) as bad:
            assert bad.hello("metrics-bad", "wrong")["code"] == "unauthorized"
        # The event's count is written within metrics.FLUSH_SECONDS by the worker that took it.
        text = scrape_until(gateway, lambda t: metric_value(t, 'warren_sessions{transport="ws"}') >= 1 and (
            metric_value(t, "warren_event_confirm_seconds_count")
            + metric_value(t, 'warren_events_total{outcome="unroutable"}')) >= 1)
    declared = {metric._name for metric in vars(metrics).values() if isinstance(metric, MetricWrapperBase)}
    for name in EXPECTED_METRICS:
        assert name.removesuffix("_total").removesuffix("_bucket") in declared, name
    for name in ("warren_sessions", "warren_worker_sessions", "warren_connections", "warren_broker_connected",
                 "warren_broker_blocked", "warren_accept_paused", "warren_workers",
                 "warren_event_confirm_seconds_bucket", "warren_command_api_seconds_bucket"):
        assert f"\n{name}" in text, name  # unlabelled ones and gauges: sampled from the start
    assert metric_value(text, 'warren_sessions_opened_total{transport="ws"}') >= 1
    assert metric_value(text, 'warren_hello_failures_total{code="unauthorized"}') >= 1
    assert metric_value(text, 'warren_errors_sent_total{code="bad_frame"}') >= 1
    assert metric_value(text, 'warren_broker_connected{link="publisher"}') == 2
    assert metric_value(text, "warren_workers") == 2
    assert metric_value(text, "warren_event_confirm_seconds_count") + \
        metric_value(text, 'warren_events_total{outcome="unroutable"}') >= 1
    wait_until(lambda: metric_value(scrape(gateway), 'warren_sessions_closed_total{reason="closed"}') >= 1)


def test_sigkilled_worker_stops_counting_in_live_gauges(ops_gateway):
    gateway = ops_gateway
    devices = []
    try:
        for number in range(6):
            device = DeviceClient(gateway.tcp if number % 2 else gateway.ws)
            assert device.hello(f"kill-{number}", SECRET)["type"] == "welcome"
            devices.append(device)
        base = scrape_until(gateway, lambda t: metric_value(t, "warren_sessions") >= 6)
        per_worker = sessions_by_worker(base)
        victim, victim_sessions = max(per_worker.items(), key=lambda item: item[1])
        assert victim_sessions >= 1 and victim in gateway.worker_pids()
        before = metric_value(base, "warren_sessions")
        os.kill(victim, signal.SIGKILL)
        # gunicorn replaces the worker (child_exit marks it dead): its sessions leave the live gauges.
        wait_until(lambda: victim not in gateway.worker_pids() and len(gateway.worker_pids()) == 2, timeout=30)

        def settled():
            text = scrape(gateway)
            return text if metric_value(text, "warren_workers") == 2 and victim not in sessions_by_worker(text) \
                and metric_value(text, 'warren_broker_connected{link="consumer"}') == 2 else None

        after = wait_until(settled, timeout=30)
        assert metric_value(after, "warren_sessions") == before - victim_sessions
        assert sum(sessions_by_worker(after).values()) == before - victim_sessions
        # Counters keep what the dead worker counted.
        assert metric_value(after, "warren_sessions_opened_total") >= metric_value(base, "warren_sessions_opened_total")
    finally:
        for device in devices:
            device.close()


def test_json_logs_one_line_per_session_event_none_per_ping(ops_gateway):
    gateway = ops_gateway

    def lines() -> list[dict]:
        out = []
        for raw in gateway.log().splitlines():
            if raw.startswith("{"):
                out.append(json.loads(raw))  # every Warren line is one JSON object
        return out

    with DeviceClient(gateway.tcp) as device:
        welcome = device.hello("logs-1", SECRET)
        session = welcome["session"]
        opened = wait_until(lambda: [line for line in lines() if line.get("session") == session])
        assert [line["msg"] for line in opened] == ["session opened"]
        assert opened[0]["device"] == "logs-1" and opened[0]["transport"] == "tcp"
        assert opened[0]["level"] == "info" and isinstance(opened[0]["pid"], int)
        def of_this_device() -> list[dict]:  # not the instance's other work (routing after an earlier test)
            return [line for line in lines() if line.get("device") == "logs-1" or line.get("session") == session]

        count = len(of_this_device())
        for _ in range(20):
            device.send({"type": "ping"})
            assert device.receive() == {"type": "pong"}
        assert len(of_this_device()) == count, of_this_device()[count:]
    closed = wait_until(lambda: [line for line in lines()
                                 if line.get("session") == session and line["msg"] == "session closed"])
    assert len(closed) == 1
    assert closed[0]["device"] == "logs-1" and closed[0]["reason"] == "closed" and closed[0]["transport"] == "tcp"
