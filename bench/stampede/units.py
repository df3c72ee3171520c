"""What one unit of work costs (a session set-up, a heartbeat, a command, an event), floor next to gateway.

The scenarios measure these figures (`ramp.cpu_ms_per_session`,
`hold.cpu_ms_per_heartbeat`, ...) among many others; this module picks them out,
states them in the unit they are read in (CPU in µs) and sets each server's
figure beside the floor's, so the comparison reads at a glance above the full table.
CPU is the server's process tree only: the load generator and RabbitMQ are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FLOOR = "floor"


@dataclass(frozen=True)
class Unit:
    key: str
    label: str
    path: tuple[str, ...]  # where the figure is in one run's results
    scale: float = 1.0
    suffix: str = ""
    compared: bool = True  # False for counts and noise: their ratio says nothing about cost
    digits: int = 1


UNITS = (
    Unit("setup_cpu_us", "CPU per session set-up (ramp)", ("ramp", "cpu_ms_per_session"), 1000, " µs"),
    Unit("rabbit_setup_cpu_us", "RabbitMQ's CPU per session set-up, every node's (ramp)",
         ("ramp", "rabbit_cpu_ms_per_session"), 1000, " µs"),
    Unit("heartbeat_cpu_us", "CPU per heartbeat (idle hold window)", ("hold", "cpu_ms_per_heartbeat"),
         1000, " µs"),
    Unit("command_cpu_us", "CPU per command round trip above idle",
         ("hold", "commands", "cpu_ms_per_command"), 1000, " µs"),
    Unit("event_cpu_us", "CPU per event acked above idle", ("hold", "events", "cpu_ms_per_event"),
         1000, " µs"),
    Unit("round_trip_p50_ms", "command round trip p50", ("hold", "commands", "round_trip_ms", "p50"),
         suffix=" ms"),
    Unit("round_trip_p99_ms", "command round trip p99", ("hold", "commands", "round_trip_ms", "p99"),
         suffix=" ms"),
    Unit("round_trip_p99_9_ms", "command round trip p99.9", ("hold", "commands", "round_trip_ms", "p99_9"),
         suffix=" ms"),
    Unit("event_ack_p50_ms", "event ack p50", ("hold", "events", "ack_ms", "p50"), suffix=" ms"),
    Unit("event_ack_p99_ms", "event ack p99", ("hold", "events", "ack_ms", "p99"), suffix=" ms"),
    Unit("rss_kib_per_session", "memory per held session (RSS)", ("ramp", "rss_kib_per_session"),
         suffix=" KiB"),
    Unit("pss_kib_per_session", "memory per held session (PSS)", ("ramp", "pss_kib_per_session"),
         suffix=" KiB"),
    Unit("binds_per_s_ramp", "sessions (one bind each) per second (ramp)", ("ramp", "sessions_per_s"),
         suffix="/s"),
    Unit("binds_per_s_at_once", "sessions re-bound per second (at once)",
         ("reconnect_jitter_0s", "sessions_per_s"), suffix="/s"),
    Unit("node_loss_recovery_s", "every device answering again after a node loss (last failure)",
         ("node_loss", "every_device_answering_after_s"), suffix=" s", compared=False, digits=2),
    Unit("node_loss_swept", "devices answering a command 5 s after the loss",
         ("node_loss", "sweep", "answered"), compared=False),
    Unit("node_loss_sessions_lost", "sessions lost to the node loss", ("node_loss", "sessions_lost"),
         compared=False),
    Unit("worker_kill_missed", "other workers' commands not answered after a worker's kill",
         ("worker_kill", "other_workers", "missed_after_loss"), compared=False),
    Unit("worker_kill_answered_p99_ms", "dead worker's devices: comeback to first answer, p99",
         ("worker_kill", "killed_worker", "answered_after_comeback_ms", "p99"), suffix=" ms", compared=False),
    Unit("worker_kill_within_target", "dead worker's devices answering within 3 s of coming back",
         ("worker_kill", "killed_worker", "answered_within_target"), compared=False),
    Unit("mass_reconnect_twice", "commands answered twice through a mass reconnect",
         ("mass_reconnect", "answered_twice"), compared=False),
    Unit("mass_reconnect_offline_p99_ms", "mass reconnect: `offline` answered, p99",
         ("mass_reconnect", "offline_answer_ms", "p99"), suffix=" ms", compared=False),
    Unit("mass_reconnect_within_target", "mass reconnect: devices answering within 3 s of coming back",
         ("mass_reconnect", "reconnected", "answered_within_target"), compared=False),
    Unit("back_at_once_s", "all back after a mass drop (at once)",
         ("reconnect_jitter_0s", "seconds_until_all_back"), suffix=" s"),
    Unit("reconnect_cpu_us", "CPU per session re-established (at once)",
         ("reconnect_jitter_0s", "cpu_ms_per_session"), 1000, " µs"),
    Unit("rabbit_reconnect_cpu_us", "RabbitMQ's CPU per session re-established, every node's (at once)",
         ("reconnect_jitter_0s", "rabbit_cpu_ms_per_session"), 1000, " µs"),
    Unit("tls_full_ramp", "TLS full handshakes (ramp)", ("ramp", "tls", "full"), compared=False),
    Unit("tls_resumed_share", "TLS reconnects resumed (at once)", ("reconnect_jitter_0s", "tls", "resumed_share"),
         compared=False, digits=4),
    Unit("tls_failed_at_once", "TLS handshakes failed (at once)", ("reconnect_jitter_0s", "tls", "failed"),
         compared=False),
    Unit("idle_seconds", "idle window measured", ("hold", "idle_seconds"), suffix=" s", compared=False),
    Unit("heartbeats", "heartbeats answered in it", ("hold", "idle_heartbeats_answered"), compared=False),
    Unit("commands", "commands answered", ("hold", "commands", "outcomes", "ok"), compared=False),
    Unit("events", "events acked", ("hold", "events", "acked"), compared=False),
    Unit("events_lost", "events acked but never consumed", ("hold", "events", "acked_but_not_consumed"),
         compared=False),
    # Noise: CPU that other processes (not the server, this tool or RabbitMQ) took meanwhile, of os.cpu_count().
    Unit("others_ramp_cores", "others' CPU during the ramp", ("ramp", "other_cpu_cores"),
         suffix=" cores", compared=False, digits=2),
    Unit("others_idle_cores", "others' CPU during the idle window", ("hold", "idle_other_cpu_cores"),
         suffix=" cores", compared=False, digits=2),
    Unit("others_commands_cores", "others' CPU during the commands", ("hold", "commands", "other_cpu_cores"),
         suffix=" cores", compared=False, digits=2),
)


def pick(figures: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(figures, dict):
            return None
        figures = figures.get(key)
    return figures


def comparisons(labels: list[str]) -> list[tuple[str, str]]:
    """(run, reference) pairs to divide: every server by the floor, and every gateway after the first by the
    first (a suite of several transports: `mqtt/tcp`)."""
    servers = [label for label in labels if label != FLOOR]
    pairs = [(label, FLOOR) for label in servers] if FLOOR in labels else []
    return pairs + [(label, servers[0]) for label in servers[1:]]


def per_unit(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """{label: {unit key: value}} for every run, then {"RUN/REFERENCE": {unit key: ratio}} for each comparison."""
    values = {label: {unit.key: scaled(pick(figures, unit.path), unit.scale) for unit in UNITS}
              for label, figures in runs.items()}
    for label, reference in comparisons(list(runs)):
        values[f"{label}/{reference}"] = {
            unit.key: round(values[label][unit.key] / values[reference][unit.key], 2)
            for unit in UNITS
            if unit.compared and values[label][unit.key] is not None and values[reference][unit.key]}
    return values


def scaled(value: Any, scale: float) -> float | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return round(value * scale, 1) if scale != 1 else value


def table(summary: dict[str, dict[str, float | None]]) -> str:
    """The per-unit figures as a plain-text table (rows no run measured are left out)."""
    labels = list(summary)
    header = ["per unit of work (server CPU)", *labels]
    lines = [header]
    for unit in UNITS:
        cells = [cell(summary[label].get(unit.key), unit, "/" in label) for label in labels]
        if any(value != "-" for value, label in zip(cells, labels) if "/" not in label):
            lines.append([unit.label, *cells])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = ["  ".join(value.ljust(width) if i == 0 else value.rjust(width)
                      for i, (value, width) in enumerate(zip(row, widths))) for row in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(text)


def cell(value: float | None, unit: Unit, ratio: bool) -> str:
    if value is None:
        return "-"
    if ratio:
        return f"{value:.2f}×"
    return f"{value:,.{unit.digits}f}{unit.suffix}" if isinstance(value, float) else f"{value:,}{unit.suffix}"
