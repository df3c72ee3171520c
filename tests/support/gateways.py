"""Real gunicorn gateways: starting them as a user does, reaching them, reading their metrics, stopping them.

A gateway is started exactly as a user starts it, `gunicorn -c gunicorn.conf.py
wsgi:app`, with its configuration in the environment, on free ports, against the
real RabbitMQ. `start_gateway` is the one way in; `launch` (the fault tests'
settings) and `start_guarded` (OPS_TOKENS set) are it with presets.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests
from kombu import Connection

from bench.ports import free_port  # the tests take it from here
from support.waiting import WAIT, wait_until

ROOT = Path(__file__).resolve().parents[2]
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
SECRET = "test-secret"
API_TOKEN = "test-api-token"
OPS_TOKENS = ("test-ops-token", "test-ops-token-next")  # two: a rotation in progress
FUZZ_TOKEN = "test-fuzz-token"  # in API_TOKENS and OPS_TOKENS: one header opens every door to schemathesis


@dataclass
class Gateway:
    """A running gunicorn gateway (master and workers) and how to reach it."""

    process: subprocess.Popen
    port: int
    device_port: int
    env: dict[str, str]
    log_path: Path
    extra: dict = field(default_factory=dict)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def tcp(self) -> str:
        return f"tcp://127.0.0.1:{self.device_port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def mqtt_port(self) -> int:
        return int(self.env["MQTT_PORT"])

    def url(self, transport: str) -> str:
        return self.tcp if transport == "tcp" else self.ws

    def command(self, device: str, name: str = "unlock", data: object = None, timeout: float = 5,
                token: str = API_TOKEN) -> requests.Response:
        return requests.post(f"{self.http}/devices/{device}/commands",
                             json={"name": name, "data": data, "timeout": timeout},
                             headers={"Authorization": f"Bearer {token}"}, timeout=timeout + 10)

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False)
        return [int(pid) for pid in out.stdout.split()]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.extra.pop("own_bans_stream", False):
            delete_stream(self.env["AMQP_URL"], self.env["BANS_STREAM"])
        return self.process.returncode


def delete_stream(amqp_url: str, name: str) -> None:
    """Delete a test deployment's ban stream (streams live on disk until deleted); quietly, since a
    test may have left RabbitMQ down."""
    with contextlib.suppress(Exception), Connection(amqp_url.split(";")[0], connect_timeout=3) as connection:
        connection.default_channel.queue_delete(name)


def start_gateway(tmp_path: Path, workers: int = 2, wait: bool = True, **env_overrides: str) -> Gateway:
    """Start `gunicorn -c gunicorn.conf.py wsgi:app` and wait until every worker is ready.

    With wait=False, return once /healthz answers on every worker (RabbitMQ may be down).
    """
    port, device_port, mqtt_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in {"AMQP_URL", "CLOUDAMQP_URL", "RABBITMQ_URL", "PROMETHEUS_MULTIPROC_DIR", "WARREN_SKIPPED_PORTS"}}
    env.update({
        "PORT": str(port), "DEVICE_PORT": str(device_port), "MQTT_PORT": str(mqtt_port),
        "WEB_CONCURRENCY": str(workers),
        "AMQP_URL": AMQP_URL, "DEVICE_SECRETS": SECRET, "API_TOKENS": API_TOKEN,
        "BIND_HOST": "127.0.0.1", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / f"metrics-{port}"),
    })
    # Each deployment its own bans, so that a test's bans (schemathesis bans any device) reach no other
    # test's gateways; deleted when it stops. Tests of bans across instances or restarts name one.
    own_stream = "BANS_STREAM" not in env_overrides
    env["BANS_STREAM"] = f"warren.bans.test.{uuid.uuid4().hex[:12]}"
    env.update(env_overrides)
    log_path = tmp_path / f"gunicorn-{port}.log"
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    gateway = Gateway(process, port, device_port, env, log_path, extra={"own_bans_stream": own_stream})
    if wait:
        wait_ready(gateway, workers)
    else:
        wait_healthy(gateway, workers)
    return gateway


def wait_healthy(gateway: Gateway, workers: int, timeout: float = 30) -> None:
    """Until /healthz answers and gunicorn shows `workers` workers (RabbitMQ may be down)."""
    def healthy() -> bool:
        answered = requests.get(f"{gateway.http}/healthz", timeout=5).status_code == 200
        return answered and len(gateway.worker_pids()) == workers

    _wait_for(gateway, healthy, "healthy", timeout)


def wait_ready(gateway: Gateway, workers: int, timeout: float = 30) -> None:
    """Ready when every worker reports both RabbitMQ links up (the instance-wide metric)."""
    def ready() -> bool:
        metrics = requests.get(f"{gateway.http}/metrics", timeout=2).text
        return all(metric_value(metrics, f'warren_broker_connected{{link="{link}"}}') >= workers
                   for link in ("consumer", "publisher"))

    _wait_for(gateway, ready, "ready", timeout)


def _wait_for(gateway: Gateway, condition: Callable[[], bool], what: str, timeout: float) -> None:
    """Poll `condition` until it holds; stop the gateway and show its log if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {gateway.process.returncode}:\n{gateway.log()}")
        try:
            if condition():
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    gateway.stop()
    raise RuntimeError(f"gateway not {what} within {timeout}s:\n{gateway.log()}")


def metric_value(text: str, name: str) -> float:
    """The sum of the samples of `name` (a metric name, optionally with its exact labels)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or (line.startswith(name + "{") and "{" not in name):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- presets ---------------------------------------------------------------------------
def launch(tmp_path: Path, workers: int = 2, wait: bool = True, **env_overrides: str) -> Gateway:
    """start_gateway with the fault tests' short hello timeout and generous rate limit."""
    env = {"HELLO_TIMEOUT": "2", "EVENT_RATE": "1000", "EVENT_BURST": "1000", **env_overrides}
    return start_gateway(tmp_path, workers, wait=wait, **env)


def start_guarded(tmp_path: Path, workers: int) -> Gateway:
    """A gateway with OPS_TOKENS set, ready: both RabbitMQ links up in every worker, read from
    /metrics with an ops token (start_gateway's readiness probe reads it without one)."""
    gateway = start_gateway(tmp_path, workers=workers, wait=False, OPS_TOKENS=",".join((*OPS_TOKENS, FUZZ_TOKEN)),
                            API_TOKENS=f"{API_TOKEN},{FUZZ_TOKEN}")

    def ready() -> bool:
        text = requests.get(f"{gateway.http}/metrics", auth=("prometheus", OPS_TOKENS[0]), timeout=5).text
        return all(metric_value(text, f'warren_broker_connected{{link="{link}"}}') >= workers
                   for link in ("consumer", "publisher"))

    try:
        wait_until(ready, timeout=30)
    except BaseException:
        gateway.stop()
        raise
    return gateway


# -- reading a gateway -----------------------------------------------------------------
def sessions(gateway: Gateway) -> float:
    return metric_value(requests.get(f"{gateway.http}/metrics", timeout=WAIT).text, "warren_sessions")


def metrics_text(gateway: Gateway) -> str:
    return requests.get(f"{gateway.http}/metrics", timeout=WAIT).text


def counted(gateway: Gateway, metric: str) -> float:
    return metric_value(metrics_text(gateway), metric)


def get(gateway: Gateway, path: str, timeout: float = 5) -> requests.Response:
    return requests.get(f"{gateway.http}{path}", timeout=timeout)


def metrics(gateway: Gateway) -> str:
    return get(gateway, "/metrics").text


def metric(gateway: Gateway, name: str) -> float:
    return metric_value(metrics(gateway), name)


def readyz_codes(gateway: Gateway, tries: int = 6) -> set[int]:
    """Status codes of a few /readyz requests (any worker may answer each)."""
    codes = set()
    for _ in range(tries):
        try:
            codes.add(get(gateway, "/readyz", timeout=3).status_code)
        except requests.RequestException:
            codes.add(0)
    return codes


def all_ready(gateway: Gateway, workers: int) -> bool:
    """Every worker has both RabbitMQ links up (the instance-wide gauge)."""
    text = metrics(gateway)
    return (metric_value(text, 'warren_broker_connected{link="consumer"}') >= workers
            and metric_value(text, 'warren_broker_connected{link="publisher"}') >= workers)


def kill_tree(gateway: Gateway) -> None:
    """SIGKILL the master and its workers at once (a host that dies)."""
    pids = [gateway.process.pid, *gateway.worker_pids()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    gateway.process.wait(10)
    for pid in pids[1:]:
        wait_until(lambda pid=pid: not psutil.pid_exists(pid) or
                   psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, timeout=10)
