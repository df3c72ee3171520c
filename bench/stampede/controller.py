"""The controller side of a run: load processes, their counters, gauges and the per-second timeline.

A `Run` owns everything one measurement needs (the fleet of load processes, the
backend connections, the gauges) and cleans all of it up on exit, Ctrl-C included.
"""

from __future__ import annotations

import gc
import math
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

import gevent
import orjson

from bench.sampling import TreeGauge, others_cpu_s
from bench.stampede.backend import AmqpCommands, EventVerifier, HttpCommands
from bench.stampede.gauges import rabbit_cpu_s, rabbit_processes, rabbit_rss_mb

if TYPE_CHECKING:
    from bench.stampede.brokers import Broker

DEVICES_PER_PROCESS = 15000
SOURCES_PER_PROCESS = 4
SUMMED = ("up", "connecting", "backing_off", "established", "tls_full", "tls_resumed", "tls_failed", "commands",
          "pongs", "events_sent", "acked", "unanswered_events")
COUNTED = ("failures", "lost", "errors", "nacked")


@dataclass
class Plan:
    """What to simulate: how many devices, where, and how they behave."""

    label: str
    targets: list[str]
    devices: int
    processes: int
    floor: bool
    secret: str
    prefix: str = "stampede"
    concurrency: int = 1000
    connect_timeout: float = 10.0
    welcome_timeout: float = 15.0
    heartbeat: float | None = None
    cafile: str | None = None  # the CA the devices trust over TLS (None: the system's)
    verify_tls: bool = True
    dialect: str | None = None  # "broker": MQTT devices of a general broker (bench.mqtt_peers), else Warren's
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))

    def share(self, worker: int) -> tuple[int, int]:
        """(first device index, device count) of one load process."""
        size = math.ceil(self.devices / self.processes)
        first = worker * size
        return first, max(0, min(size, self.devices - first))

    def settings(self, worker: int) -> dict[str, Any]:
        first, count = self.share(worker)
        sources = [f"127.0.{worker + 1}.{k}" for k in range(1, SOURCES_PER_PROCESS + 1)]
        return {"worker": worker, "first": first, "count": count, "targets": self.targets,
                "sources": sources, "floor": self.floor, "secret": self.secret,
                "prefix": self.prefix, "run_id": self.run_id, "concurrency": self.concurrency,
                "connect_timeout": self.connect_timeout,
                "welcome_timeout": self.welcome_timeout, "heartbeat": self.heartbeat,
                "cafile": self.cafile, "verify_tls": self.verify_tls, "dialect": self.dialect}

    def device_name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}"


def processes_for(devices: int, minimum: int = 1) -> int:
    return max(minimum, math.ceil(devices / DEVICES_PER_PROCESS))


class Fleet:
    """The load processes of a run and the latest counters each one reported."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.processes = [self.spawn(worker) for worker in range(plan.processes)]
        self.latest: dict[int, dict[str, Any]] = {}
        self.acked_ids: list[str] = []
        self.ack_ms: list[float] = []
        self.welcome_ms: list[float] = []
        self.command_ms: list[float] = []
        self.banned_at: dict[str, float] = {}  # device -> when its session first ended with `banned`
        # (device, "lost" | "back", wall-clock time): sessions lost, and the welcome after each, in order.
        self.changes: list[tuple[str, str, float]] = []
        self.where: dict[str, tuple[str, int]] = {}  # device -> its (source IP, port), when asked
        self.where_from: set[int] = set()  # the load processes that answered the last `where`
        self.readers = [gevent.spawn(self.listen, process) for process in self.processes]

    def spawn(self, worker: int) -> subprocess.Popen:
        settings = orjson.dumps(self.plan.settings(worker)).decode()
        return subprocess.Popen([sys.executable, "-m", "bench.stampede.worker", settings],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def listen(self, process: subprocess.Popen) -> None:
        """Keep the latest totals of one worker and collect its samples."""
        for line in process.stdout:
            report = orjson.loads(line)
            if self.side_line(report):
                continue
            self.latest[report["worker"]] = report
            self.acked_ids += report["acked_ids"]
            self.ack_ms += report["ack_ms"]
            self.welcome_ms += report["welcome_ms"]
            self.command_ms += report["command_ms"]
            for device, at in report["banned_at"]:
                self.banned_at.setdefault(device, at)
        worker = self.processes.index(process)
        if worker in self.latest:
            self.latest[worker]["up"] = 0  # it died: none of its sessions is up any more

    def side_line(self, report: dict[str, Any]) -> bool:
        """Take a line that is not the per-second report (sessions lost and regained, or addresses)."""
        if "changes" in report:
            self.changes += [(device, kind, at) for device, kind, at in report["changes"]]
            return True
        if "where" in report:
            self.where.update((device, (ip, port)) for device, (ip, port) in report["where"].items())
            self.where_from.add(report["worker"])
            return True
        return False

    def addresses(self, timeout: float = 60.0) -> dict[str, tuple[str, int]]:
        """Every connected device's own (source IP, port), asked of every live load process."""
        self.where, self.where_from = {}, set()
        self.tell({"op": "where"})
        alive = {worker for worker, process in enumerate(self.processes) if process.poll() is None}
        deadline = time.monotonic() + timeout
        while not alive <= self.where_from:
            if time.monotonic() > deadline:
                raise TimeoutError("load processes did not say where their devices are in time")
            gevent.sleep(0.05)
        return dict(self.where)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until every worker has built its devices and reported once."""
        deadline = time.monotonic() + timeout
        while len(self.latest) < len(self.processes):
            if time.monotonic() > deadline:
                raise TimeoutError("load processes did not start in time")
            gevent.sleep(0.05)

    def tell(self, command: dict[str, Any], workers: list[int] | None = None) -> None:
        for worker in range(len(self.processes)) if workers is None else workers:
            process = self.processes[worker]
            if process.poll() is None:
                process.stdin.write(orjson.dumps(command) + b"\n")
                process.stdin.flush()

    def kill(self, workers: list[int]) -> None:
        """SIGKILL some load processes: their devices vanish without a goodbye."""
        for worker in workers:
            self.processes[worker].send_signal(signal.SIGKILL)

    def totals(self, workers: list[int] | None = None) -> dict[str, Any]:
        """Counters summed over the workers' latest reports."""
        reports = [report for worker, report in self.latest.items()
                   if workers is None or worker in workers]
        totals: dict[str, Any] = {name: sum(r[name] for r in reports) for name in SUMMED}
        for name in COUNTED:
            totals[name] = dict(sum((Counter(r[name]) for r in reports), Counter()))
        return totals

    def last_welcome(self) -> float:
        """Wall-clock time of the most recent welcome in any worker."""
        return max((report["last_welcome"] for report in self.latest.values()), default=0.0)

    def stop(self) -> None:
        """Ask every worker to stop, then make sure none is left."""
        for process in self.processes:
            try:
                process.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + 10
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        gevent.killall(self.readers)


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p99 and p99.9 (nearest rank), None when there is nothing to rank."""
    if not values:
        return {"p50": None, "p99": None, "p99_9": None, "max": None, "n": 0}
    ranked = sorted(values)

    def rank(q: float) -> float:
        return round(ranked[min(len(ranked) - 1, math.ceil(q * len(ranked)) - 1)], 2)

    return {"p50": rank(0.5), "p99": rank(0.99), "p99_9": rank(0.999),
            "max": round(ranked[-1], 2), "n": len(ranked)}


class Run:
    """One measurement against one server; a context manager that always cleans up."""

    def __init__(self, plan: Plan, gateway_pid: int | None, commands: str,
                 amqp_url: str, http_url: str, api_token: str, command_timeout: float,
                 broker: Broker | None = None) -> None:
        self.plan = plan
        self.broker = broker  # the suite's broker: the node-loss scenario loses one of its nodes
        self.server_pid = gateway_pid  # the worker-kill scenario kills one of its children
        self.gauge = TreeGauge(gateway_pid) if gateway_pid else None
        self.commands: AmqpCommands | HttpCommands | None = None
        self.events: EventVerifier | None = None
        if not plan.floor and commands == "amqp":
            self.commands = AmqpCommands(amqp_url, command_timeout)
        elif not plan.floor and commands == "http":
            self.commands = HttpCommands(http_url, api_token, command_timeout)
        if not plan.floor and commands != "none":
            self.events = EventVerifier(amqp_url, f"{plan.prefix}-")
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.timeline: list[dict[str, Any]] = []
        self.marks: dict[str, dict[str, Any]] = {}
        self.fleet = Fleet(plan)
        self.fleet.wait_ready()
        self.recorder = gevent.spawn(self.record_forever)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.recorder.kill()
        self.fleet.stop()
        for side in (self.commands, self.events):
            if side is not None:
                side.close()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def totals(self) -> dict[str, Any]:
        return self.fleet.totals()

    def gauges(self) -> dict[str, Any]:
        """The server tree's RSS and CPU, RabbitMQ's RSS and CPU, and the CPU everything else used, now."""
        sample: dict[str, Any] = self.gauge.sample() if self.gauge else {}
        if not self.plan.floor:
            sample["rabbit_rss_mb"] = rabbit_rss_mb(self.rabbit_pids())
            sample["rabbit_cpu_s"] = rabbit_cpu_s(self.rabbit_pids())
        sample["others_cpu_s"] = others_cpu_s(self.measured_pids())
        return sample

    def measured_pids(self) -> set[int]:
        """The server tree, this tool (controller and load processes) and RabbitMQ, which the gateway drives."""
        pids = {os.getpid(), *(process.pid for process in self.fleet.processes)}
        if self.gauge:
            pids |= self.gauge.pids()
        return pids | {process.pid for process in rabbit_processes(self.rabbit_pids())}

    def rabbit_pids(self) -> list[int] | None:
        """The cluster's nodes when the suite booted one, else None (the machine's broker)."""
        return self.broker.pids if self.broker is not None else None

    def mark(self, name: str, pss: bool = False) -> dict[str, Any]:
        """Remember the time, counters and gauges at a moment the scenario cares about."""
        mark = {"t": round(self.elapsed(), 3), "wall": time.time(), **self.totals(), **self.gauges()}
        if pss and self.gauge:
            mark["pss_mb"] = self.gauge.pss_mb()
        self.marks[name] = mark
        return mark

    def wait_until_up(self, count: int, timeout: float) -> bool:
        """Wait until `count` sessions are up; False if `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while self.totals()["up"] < count:
            if time.monotonic() > deadline:
                return False
            gevent.sleep(0.05)
        return True

    def wait_until_down(self, timeout: float) -> bool:
        """Wait until no session is up (after a drop); False if `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while self.totals()["up"] > 0:
            if time.monotonic() > deadline:
                return False
            gevent.sleep(0.05)
        return True

    def record_forever(self) -> None:
        """Once a second: append to the timeline and print a progress line to stderr."""
        while True:
            gevent.sleep(1.0)
            gc.freeze()  # latencies and timelines only grow: keep them out of the GC's walk
            entry = self.sample()
            self.timeline.append(entry)
            print(progress_line(self.plan.label, entry), file=sys.stderr, flush=True)

    def sample(self) -> dict[str, Any]:
        totals = self.totals()
        previous = self.timeline[-1] if self.timeline else {"established": 0}
        entry = {"t": round(self.elapsed(), 2), **totals,
                 "rate": totals["established"] - previous["established"], **self.gauges()}
        if self.commands:
            log = self.commands.log
            entry["commands_sent"] = log.sent
            entry["command_outcomes"] = dict(log.outcomes)
        return entry


def progress_line(label: str, entry: dict[str, Any]) -> str:
    failures = ", ".join(f"{reason} {count}" for reason, count in sorted(entry["failures"].items()))
    lost = ", ".join(f"{reason} {count}" for reason, count in sorted(entry["lost"].items()))
    line = (f"[{label} {entry['t']:6.1f}s] up {entry['up']:>7} | +{entry['rate']:>6}/s"
            f" | connecting {entry['connecting']}, backing off {entry['backing_off']}"
            f" | failures: {failures or 'none'} | lost: {lost or 'none'}")
    if entry["tls_full"] or entry["tls_resumed"]:
        line += f" | tls full {entry['tls_full']}, resumed {entry['tls_resumed']}"
    if "command_outcomes" in entry:
        line += f" | commands sent {entry['commands_sent']} {entry['command_outcomes']}"
    return line
