"""Deployments for the bans benchmark: a private vhost each, gateway instances on it, their API and metrics.

Why a vhost per deployment: bans and flapping are deployment-wide (a stream every worker
follows, start counts kept by the partition owners). Two deployments on one vhost would
share partition queues, so one's owners would count the other's starts; and the shared
machine's RabbitMQ may carry other people's gateways on `/`. The vhost is set up as the
README asks of any deployment (the routing's policy) and deleted at the end, streams and all.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import gevent
import orjson
import urllib3
from gevent.pool import Pool

from bench.ports import free_port
from bench.rabbit_cluster import ROUTES_POLICY
from bench.sampling import TreeGauge
from bench.stampede.suite import SESSIONS_PER_WORKER, ensure_unused, gateway_env, started, wait_for_http

BANS_STREAM = "warren.bench.bans"


def rabbitmqctl(*args: str) -> str:
    """`rabbitmqctl ARGS` on this machine's node; its output, or SystemExit with what it said."""
    out = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=120, check=False)
    if out.returncode != 0:
        raise SystemExit(f"bans: rabbitmqctl {' '.join(args)} failed: {out.stdout}{out.stderr}")
    return out.stdout


@contextmanager
def private_vhost(amqp_url: str, name: str) -> Iterator[str]:
    """A fresh vhost with the routing's policy for the block; yields its AMQP URL, deletes it afterwards."""
    parts = urlsplit(amqp_url)
    user = parts.username or "guest"
    if name in rabbitmqctl("list_vhosts", "-q").split():  # left by a run that was killed
        rabbitmqctl("delete_vhost", name)
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
        rabbitmqctl(*ROUTES_POLICY[:1], "-p", name, *ROUTES_POLICY[1:])
        yield f"{parts.scheme}://{parts.netloc}/{quote(name, safe='')}"
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True, timeout=120, check=False)


@dataclass
class Instance:
    """One gateway instance (a gunicorn master and its workers) of a deployment."""

    name: str
    http_port: int
    device_port: int
    pid: int
    workers: int

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def device_url(self) -> str:
        return f"tcp://127.0.0.1:{self.device_port}"

    def gauge(self) -> dict[str, float]:
        return TreeGauge(self.pid).sample()


def workers_for(devices: int) -> int:
    """Gateway workers an instance needs to hold `devices` (at least 2, as the suite starts them)."""
    return max(2, math.ceil(devices / SESSIONS_PER_WORKER))


@contextmanager
def instance(args: argparse.Namespace, name: str, amqp_url: str, workers: int,
             extra: dict[str, str] | None = None) -> Iterator[Instance]:
    """A gateway instance from --gateway-dir on `amqp_url` (the deployment's vhost), on free ports.

    Built with the suite's environment (gateway_env), less what must differ per instance: its
    own metrics directory (else two instances would sum each other's), no MQTT and no TLS."""
    one = copy.copy(args)
    one.http_port, one.device_port, one.mqtt_port = free_port(), free_port(), free_port()
    ensure_unused({"HTTP": one.http_port, "DEVICE": one.device_port})
    env = gateway_env(one, workers, "tcp", amqp_url)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env |= {"MQTT_PORT": "", "BANS_STREAM": BANS_STREAM, "OPS_TOKENS": args.api_token,
            "HELLO_RATE": "100000", **(extra or {})}
    log = args.logs / f"gateway-{name}.log"
    command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
    with started(command, env, log, cwd=args.gateway_dir) as process:
        wait_for_http(f"http://127.0.0.1:{one.http_port}/readyz", 60, process)
        say(f"{name}: gateway up ({workers} workers, pid {process.pid}, HTTP {one.http_port}, "
            f"devices {one.device_port}; log {log})")
        yield Instance(name, one.http_port, one.device_port, process.pid, workers)


def say(text: str) -> None:
    print(f"[bans] {text}", file=sys.stderr, flush=True)


class Api:
    """The gateway's HTTP API with the bearer token (bans, /metrics), over a pool of `size` connections."""

    def __init__(self, token: str, size: int = 32) -> None:
        self.http = urllib3.PoolManager(maxsize=size, retries=False, timeout=30)
        self.headers = {"Authorization": f"Bearer {token}"}

    def ban(self, base: str, device: str, seconds: float | None = None,
            reason: str = "bench") -> tuple[int, float, float]:
        """PUT a ban; (status, wall-clock time the request was sent, time the answer was read)."""
        body = {"reason": reason} | ({} if seconds is None else {"for": seconds})
        sent = time.time()
        answer = self.http.request("PUT", f"{base}/devices/{device}/ban", body=orjson.dumps(body),
                                   headers={**self.headers, "Content-Type": "application/json"})
        return answer.status, sent, time.time()

    def bans_seen(self, base: str) -> int:
        """How many bans the worker that answers GET /bans has in force (a new connection: any worker)."""
        answer = self.http.request("GET", f"{base}/bans", headers={**self.headers, "Connection": "close"})
        return len(orjson.loads(answer.data)["bans"]) if answer.status == 200 else -1

    def metric(self, base: str, name: str, labels: str = "") -> float | None:
        """One sample of the instance's /metrics (e.g. `warren_bans_issued_total`, `by="flapping"`)."""
        text = self.http.request("GET", f"{base}/metrics", headers=self.headers).data.decode()
        selector = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else r"(?:\{\})?")
        found = re.search(rf"^{selector} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else None


def ban_all(api: Api, base: str, devices: list[str], concurrency: int, seconds: float | None,
            label: str) -> tuple[dict[str, tuple[float, float]], dict[int, int]]:
    """Ban every device of `devices` through `base`'s API, `concurrency` at a time, with progress:
    ({device: (time its PUT was sent, time its 200 was read)}, {status: count})."""
    done: dict[str, tuple[float, float]] = {}
    statuses: dict[int, int] = {}

    def one(device: str) -> None:
        try:
            status, sent, answered = api.ban(base, device, seconds)
        except urllib3.exceptions.HTTPError:
            status, sent, answered = 0, 0.0, 0.0
        statuses[status] = statuses.get(status, 0) + 1
        if status == 200:
            done[device] = (sent, answered)

    pool = Pool(concurrency)
    reporter = gevent.spawn(report_progress, lambda: f"{label}: {sum(statuses.values()):,}/{len(devices):,} "
                                                     f"bans answered {statuses}")
    started_at = time.monotonic()
    pool.map(one, devices)
    reporter.kill()
    say(f"{label}: {len(done):,} bans stored in {time.monotonic() - started_at:.1f}s {statuses}")
    return done, statuses


def report_progress(line: Callable[[], str]) -> None:
    while True:
        gevent.sleep(1.0)
        say(line())


def wait_for_bans(api: Api, base: str, count: int, timeout: float, asks: int = 6) -> bool:
    """Wait until `asks` answers in a row of GET /bans (new connections, so various workers) list
    `count` bans at least: by then every worker has very likely read them."""
    deadline = time.monotonic() + timeout
    streak = 0
    while time.monotonic() < deadline:
        streak = streak + 1 if api.bans_seen(base) >= count else 0
        if streak >= asks:
            return True
        gevent.sleep(0.2)
    return False


def wait_until_quiet(instances: list[Instance], timeout: float = 20.0, cores: float = 0.05) -> None:
    """Wait until every instance's CPU is below `cores` over a second (sessions just dropped are
    cleaned up): the next measurement must not pay for the last one's aftermath."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = [one.gauge().get("cpu_s", 0.0) for one in instances]
        gevent.sleep(1.0)
        after = [one.gauge().get("cpu_s", 0.0) for one in instances]
        if all(b - a < cores for a, b in zip(before, after)):
            return


def pick(values: dict[str, Any], *path: str) -> Any:
    for key in path:
        values = values.get(key) if isinstance(values, dict) else None
    return values


def logs_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="bench-bans-"))


def vhost_name(prefix: str, part: str) -> str:
    return f"warren-bench-{prefix}-{part}"


def environment_note() -> str:
    """Who else is on the machine: the CPU figures are only as clean as this."""
    load = os.getloadavg()
    return f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} when the run started"
