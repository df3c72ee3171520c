"""The figures compared, how each is read from a server's results, and how Warren stands against RabbitMQ.

Costs per unit of work come from the run's marks (`unit_costs`), for the server's own processes and,
on Warren, for the RabbitMQ it publishes through: Warren alone is gunicorn's tree, while RabbitMQ's
MQTT plugin and Mosquitto do all of an MQTT broker's work in their one process. So every CPU and
memory figure is given twice: the server alone, and "with its broker" (Warren + its RabbitMQ's share;
the peers' own figure again). That RabbitMQ is the machine's, shared: its share is what it spent
meanwhile, anyone else's work on it included (the run's own traffic is most of it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.stampede.scenarios import cost
from bench.stampede.units import pick

LOWER, HIGHER = "lower", "higher"
KIB_PER_MB = 1024


def unit_costs(marks: dict[str, dict[str, Any]], devices: int, prefix: str = "") -> dict[str, float | None]:
    """CPU (ms) per unit of work and memory (KiB) per held connection of the gauges named `prefix`cpu_s,
    `prefix`rss_mb and `prefix`pss_mb, from the marks of a run (None where a mark or gauge is missing).

    The traffic windows (events, commands) count only the CPU above the keep-alive window's rate."""
    cpu, rss, pss = f"{prefix}cpu_s", f"{prefix}rss_mb", f"{prefix}pss_mb"
    empty: dict[str, Any] = {}
    before, connected, held = (marks.get(name, empty) for name in ("before_connect", "connected", "held"))
    idle_start, idle_end = marks.get("idle_start", empty), marks.get("idle_end", empty)
    back_start, back_done = marks.get("reconnect_0_start", empty), marks.get("reconnect_0_done", empty)
    idle_rate = rate(idle_start, idle_end, cpu)
    pings = count(idle_start, idle_end, "pongs")
    up = idle_end.get("up") or devices
    return {
        "setup_cpu_ms": cost(before, connected, count(before, connected, "established"), cpu, 1000),
        "rss_kib_per_session": cost(before, held, held.get("up", 0), rss, KIB_PER_MB),
        "pss_kib_per_session": cost(before, held, held.get("up", 0), pss, KIB_PER_MB),
        "heartbeat_cpu_ms": cost(idle_start, idle_end, pings, cpu, 1000),
        # Every held device's PINGREQ once: the CPU of one keep-alive period, however long it is.
        "keepalive_round_ms": cost(idle_start, idle_end, pings, cpu, 1000 * up),
        "idle_cores": None if idle_rate is None else round(idle_rate, 4),
        "event_cpu_ms": above_idle(marks, "events", "acked", cpu, idle_rate),
        "command_cpu_ms": above_idle(marks, "commands", "commands", cpu, idle_rate),
        "reconnect_cpu_ms": cost(back_start, back_done, count(back_start, back_done, "established"), cpu, 1000),
    }


def count(start: dict[str, Any], end: dict[str, Any], counter: str) -> int:
    """How much a device counter (sessions established, pongs, events acked...) grew between two marks."""
    if counter not in start or counter not in end:
        return 0
    return end[counter] - start[counter]


def rate(start: dict[str, Any], end: dict[str, Any], gauge: str) -> float | None:
    """A cumulative gauge's growth per second between two marks (CPU seconds: cores busy)."""
    if start.get(gauge) is None or end.get(gauge) is None:
        return None
    return (end[gauge] - start[gauge]) / max(end["t"] - start["t"], 1e-3)


def above_idle(marks: dict[str, dict[str, Any]], window: str, counter: str, cpu: str,
               idle_rate: float | None) -> float | None:
    """CPU (ms) per unit counted by `counter` in the marks `window`_start/_end, above the idle rate."""
    start, end = marks.get(f"{window}_start"), marks.get(f"{window}_end")
    if start is None or end is None or idle_rate is None or start.get(cpu) is None or end.get(cpu) is None:
        return None
    units = count(start, end, counter)
    if units <= 0:
        return None
    busy = end[cpu] - start[cpu] - idle_rate * (end["t"] - start["t"])
    return round(busy * 1000 / units, 4)


@dataclass(frozen=True)
class Row:
    """One figure of the table: how it is read from one server's results, and which way is better
    (None: shown, not compared). `view` says where it counts: "both" (latencies, rates, failures),
    "alone" (the server's own processes) or "with_broker" (Warren with its RabbitMQ)."""

    label: str
    read: Callable[[dict[str, Any]], float | None]
    better: str | None = LOWER
    fmt: str = "{:,.3f}"
    view: str = "both"


def at(*path: str) -> Callable[[dict[str, Any]], Any]:
    return lambda figures: number(pick(figures, path))


def total(*path: str) -> Callable[[dict[str, Any]], int | None]:
    """The sum of a dict of counts (failures by reason), 0 for an empty one, None if it is missing."""

    def read(figures: dict[str, Any]) -> int | None:
        counts = pick(figures, path)
        return sum(counts.values()) if isinstance(counts, dict) else None

    return read


def failed_commands(figures: dict[str, Any]) -> int | None:
    outcomes = pick(figures, ("commands", "outcomes"))
    return sum(n for outcome, n in outcomes.items() if outcome != "ok") if isinstance(outcomes, dict) else None


def with_broker(key: str) -> Callable[[dict[str, Any]], float | None]:
    """A unit cost of the server plus, for Warren, the same of its RabbitMQ."""

    def read(figures: dict[str, Any]) -> float | None:
        own = number(pick(figures, ("units", "server", key)))
        if "broker" not in figures.get("units", {}):
            return own
        broker = number(pick(figures, ("units", "broker", key)))
        return None if own is None or broker is None else own + broker

    return read


def number(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


COSTS = (("setup_cpu_ms", "CPU per session set-up", "{:,.3f} ms"),
         ("rss_kib_per_session", "memory per held connection, RSS", "{:,.1f} KiB"),
         ("pss_kib_per_session", "memory per held connection, PSS", "{:,.1f} KiB"),
         ("keepalive_round_ms", "CPU per keep-alive round (every device's PINGREQ)", "{:,.1f} ms"),
         ("event_cpu_ms", "CPU per QoS 1 event", "{:,.3f} ms"),
         ("command_cpu_ms", "CPU per command", "{:,.3f} ms"),
         ("reconnect_cpu_ms", "CPU per session set up again (mass drop)", "{:,.3f} ms"))

ROWS = (
    Row("ramp: sessions set up per second", at("ramp", "sessions_per_s"), HIGHER, "{:,.0f}/s"),
    Row("ramp: failed connects", total("ramp", "failures"), LOWER, "{:,}"),
    Row("event PUBACK p50", at("events", "ack_ms", "p50"), fmt="{:,.2f} ms"),
    Row("event PUBACK p99", at("events", "ack_ms", "p99"), fmt="{:,.2f} ms"),
    Row("command publish -> device p50", at("commands", "delivery_ms", "p50"), fmt="{:,.2f} ms"),
    Row("command publish -> device p99", at("commands", "delivery_ms", "p99"), fmt="{:,.2f} ms"),
    Row("command round trip (device's reply back) p50", at("commands", "round_trip_ms", "p50"), fmt="{:,.2f} ms"),
    Row("command round trip (device's reply back) p99", at("commands", "round_trip_ms", "p99"), fmt="{:,.2f} ms"),
    Row("mass drop: seconds until all back", at("drop", "seconds_until_all_back"), fmt="{:,.2f} s"),
    Row("mass drop: failed connects", total("drop", "failures"), LOWER, "{:,}"),
    *(Row(f"server alone: {label}", at("units", "server", key), fmt=fmt, view="alone") for key, label, fmt in COSTS),
    *(Row(f"with its broker: {label}", with_broker(key), fmt=fmt, view="with_broker") for key, label, fmt in COSTS),
    *(Row(f"Warren's RabbitMQ alone: {label}", at("units", "broker", key), None, fmt) for key, label, fmt in COSTS),
    Row("check: events acked", at("events", "acked"), None, "{:,}"),
    Row("check: events acked but never consumed", at("events", "acked_but_not_consumed"), None, "{:,}"),
    Row("check: commands answered", at("commands", "outcomes", "ok"), None, "{:,}"),
    Row("check: commands failed (any outcome but ok)", failed_commands, None, "{:,}"),
    Row("noise: others' CPU during the ramp", at("ramp", "other_cpu_cores"), None, "{:.2f} cores"),
    Row("noise: others' CPU during keep-alive", at("keepalive", "idle_other_cpu_cores"), None, "{:.2f} cores"),
    Row("noise: others' CPU during events", at("events", "other_cpu_cores"), None, "{:.2f} cores"),
    Row("noise: others' CPU during commands", at("commands", "other_cpu_cores"), None, "{:.2f} cores"),
)


def ratio(warren: float | None, rabbit: float | None) -> float | None:
    """Warren ÷ RabbitMQ, None when either is missing or RabbitMQ's is 0."""
    if warren is None or rabbit is None or rabbit == 0:
        return None
    return warren / rabbit


def verdict(better: str | None, warren: float | None, rabbit: float | None) -> str:
    """"ahead", "behind" or "even" for Warren against RabbitMQ on a figure where `better` is LOWER or HIGHER;
    "" when the figure is not compared or either value is missing."""
    if better is None or warren is None or rabbit is None:
        return ""
    if warren == rabbit:
        return "even"
    return "ahead" if (warren < rabbit) == (better == LOWER) else "behind"


def standing(rows: tuple[Row, ...], warren: dict[str, Any], rabbit: dict[str, Any], view: str) -> dict[str, list[str]]:
    """Warren against RabbitMQ on the compared figures of `view` ("alone" or "with_broker", plus those of
    both views): the labels of the figures it is ahead on, even, behind on, and could not compare."""
    found: dict[str, list[str]] = {"ahead": [], "even": [], "behind": [], "": []}
    for row in rows:
        if row.better is not None and row.view in ("both", view):
            found[verdict(row.better, row.read(warren), row.read(rabbit))].append(row.label)
    found["not compared"] = found.pop("")
    return found
