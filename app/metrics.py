"""Prometheus metrics, correct across every gunicorn worker of an instance.

prometheus_client's multiprocess mode: each worker writes its samples to files
in PROMETHEUS_MULTIPROC_DIR (gunicorn.conf.py makes it fresh at start and marks
dead workers), and `/metrics` on any worker sums them all. Gauges say how they
combine: `livesum` adds the live workers' values.
"""

from __future__ import annotations

import os

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

# The children the hot paths bump, looked up once: `labels()` takes a lock and a dict lookup per call.
EVENTS_ACKED = EVENTS.labels(outcome="acked")
COMMANDS_DELIVERED = COMMANDS.labels(outcome="delivered")
COMMANDS_REPLIED = COMMANDS.labels(outcome="replied")
COMMANDS_OFFLINE = COMMANDS.labels(outcome="offline")


def instance_registry() -> CollectorRegistry:
    """The registry that sees the whole instance: every worker's files in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def render() -> tuple[bytes, str]:
    """The Prometheus text for the whole instance, whichever worker answers."""
    return generate_latest(instance_registry()), CONTENT_TYPE_LATEST
