"""Prometheus metrics, correct across every gunicorn worker of an instance.

prometheus_client's multiprocess mode: each worker writes its samples to files
in PROMETHEUS_MULTIPROC_DIR (gunicorn.conf.py makes it fresh at start and marks
dead workers), and `/metrics` on any worker sums them all. Gauges say how they
combine: `livesum` adds the live workers' values.

What is counted per command and per event is batched: each write to those files
takes a lock, checks the pid and writes an mmap (1.5-6 µs), which made about a
tenth of a busy worker's time. Those counts are kept in plain Python and written
once every FLUSH_SECONDS (`flush_forever`, a child of the worker's tree), and
whenever this worker answers `/metrics`: the others' are at most that late.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from typing import Any

import gevent
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

SESSIONS = Gauge("warren_sessions", "Authenticated device sessions now.", ["transport"],
                 multiprocess_mode="livesum")
# liveall keeps one sample per live worker (a `pid` label): the status page's per-worker view.
SESSIONS_BY_WORKER = Gauge("warren_worker_sessions", "Authenticated device sessions now, per worker.",
                           multiprocess_mode="liveall")
CONNECTIONS = Gauge("warren_connections", "Open connections (devices before hello, HTTP, sessions).",
                    multiprocess_mode="livesum")
SESSIONS_OPENED = Counter("warren_sessions_opened", "Sessions welcomed.", ["transport"])
SESSIONS_CLOSED = Counter("warren_sessions_closed", "Sessions ended, by reason.", ["reason"])
HELLO_FAILURES = Counter("warren_hello_failures", "Hellos refused, by error code.", ["code"])
ERRORS_SENT = Counter("warren_errors_sent", "Error frames sent to devices, by code.", ["code"])
EVENTS = Counter("warren_events", "Device events: acked, or nacked by reason.", ["outcome"])
EVENT_CONFIRM = Histogram("warren_event_confirm_seconds", "Event received to RabbitMQ confirm.",
                          buckets=LATENCY_BUCKETS)
COMMANDS = Counter("warren_commands", "Commands by outcome (delivered, replied, expired, offline...).",
                   ["outcome"])
COMMAND_DEVICE_RTT = Histogram("warren_command_device_seconds",
                               "Command written to the device to its reply.", buckets=LATENCY_BUCKETS)
COMMAND_API_RTT = Histogram("warren_command_api_seconds",
                            "HTTP command API: request to the device's reply.", buckets=LATENCY_BUCKETS)
SUPERVISOR_RESTARTS = Counter("warren_supervisor_restarts", "Children restarted, by supervisor.",
                              ["supervisor"])
CHILD_CRASHES = Counter("warren_crashes", "Supervised children (sessions included) that crashed.",
                        ["supervisor"])
SUPERVISOR_GAVE_UP = Counter("warren_supervisor_gave_up", "Supervisors that exhausted their budget.",
                             ["supervisor"])
BROKER_CONNECTED = Gauge("warren_broker_connected", "Workers whose RabbitMQ link is up, by link.",
                         ["link"], multiprocess_mode="livesum")
BROKER_BLOCKED = Gauge("warren_broker_blocked", "Workers whose publishing RabbitMQ blocks.",
                       multiprocess_mode="livesum")
ACCEPT_PAUSED = Gauge("warren_accept_paused",
                      "Workers that stopped accepting because they are full (backlog pressure).",
                      multiprocess_mode="livesum")
WORKERS = Gauge("warren_workers", "Live gunicorn workers.", multiprocess_mode="livesum")
TLS_HANDSHAKES = Counter("warren_tls_handshakes", "TLS handshakes by outcome: full, resumed, timeout, closed, refused.",
                         ["outcome"])
BANS_IN_FORCE = Gauge("warren_bans_in_force", "Bans in force (PROTOCOL.md section 6), as the workers read them.",
                      multiprocess_mode="livemax")
BANS_ISSUED = Counter("warren_bans_issued", "Bans issued by this instance, by who decided: operator or flapping.",
                      ["by"])
# TLS_CRL_FILE (PROTOCOL.md section 6, "Revoked certificates"): every worker holds the same CRL, so the gauges
# combine by their maximum.
CRL_STALE = Gauge("warren_crl_stale", "CRLs in force past their next update (still enforced): publish fresh ones.",
                  multiprocess_mode="livemax")
CRL_FILE_BAD = Gauge("warren_crl_file_bad",
                     "Workers whose TLS_CRL_FILE changed but cannot be loaded (the CRL before stays in force).",
                     multiprocess_mode="livemax")
CRL_REVOKED = Gauge("warren_crl_revoked_certificates", "Device certificates the CRLs in force revoke.",
                    multiprocess_mode="livemax")
CRL_RELOADS = Counter("warren_crl_reloads", "TLS_CRL_FILE loaded again after a change: loaded, failed.",
                      ["outcome"])
CRL_REFUSALS = Counter("warren_crl_refusals",
                       "Revoked client certificates refused: at a connection (handshake) or a live session ended "
                       "by a reload (reload).", ["at"])

FLUSH_SECONDS = 1.0


class BatchedCounter:
    """A counter (child) bumped on a hot path: counted here, written to the shared files by `flush`."""

    __slots__ = ("_child", "_pending")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._pending = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self._pending += amount

    def flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, 0.0
            self._child.inc(pending)


class BatchedHistogram:
    """A histogram (without labels) observed on a hot path: bucket counts and the sum kept here, written by
    `flush` through the histogram's own values, as `Histogram.observe` writes them (it has no bulk form)."""

    __slots__ = ("_counts", "_histogram", "_sum", "_upper_bounds")

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._upper_bounds = list(histogram._upper_bounds)  # the last one is +Inf: every amount has a bucket
        self._counts = [0] * len(self._upper_bounds)
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        self._counts[bisect_left(self._upper_bounds, amount)] += 1  # the first bound >= amount, as `le` reads
        self._sum += amount

    def flush(self) -> None:
        counts = self._counts
        if any(counts):
            total, self._counts, self._sum = self._sum, [0] * len(counts), 0.0
            self._histogram._sum.inc(total)
            for bucket, count in zip(self._histogram._buckets, counts, strict=True):
                if count:
                    bucket.inc(count)


# What the hot paths bump, per event and per command.
EVENTS_ACKED = BatchedCounter(EVENTS.labels(outcome="acked"))
COMMANDS_DELIVERED = BatchedCounter(COMMANDS.labels(outcome="delivered"))
COMMANDS_REPLIED = BatchedCounter(COMMANDS.labels(outcome="replied"))
COMMANDS_OFFLINE = BatchedCounter(COMMANDS.labels(outcome="offline"))
EVENT_CONFIRM_TIMES = BatchedHistogram(EVENT_CONFIRM)
COMMAND_DEVICE_TIMES = BatchedHistogram(COMMAND_DEVICE_RTT)
BATCHED = (EVENTS_ACKED, COMMANDS_DELIVERED, COMMANDS_REPLIED, COMMANDS_OFFLINE, EVENT_CONFIRM_TIMES,
           COMMAND_DEVICE_TIMES)


def flush() -> None:
    """Write this worker's batched counts to the shared files."""
    for batched in BATCHED:
        batched.flush()


def flush_forever() -> None:
    while True:
        gevent.sleep(FLUSH_SECONDS)
        flush()


def instance_registry() -> CollectorRegistry:
    """The registry that sees the whole instance: every worker's files in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def render() -> tuple[bytes, str]:
    """The Prometheus text for the whole instance, whichever worker answers."""
    flush()
    return generate_latest(instance_registry()), CONTENT_TYPE_LATEST
