"""The scenarios of a fleet and its traffic: ramp, hold and stampede, each a function of a `Run` and the options,
and the figures every scenario reads (faults.py and worker_kill.py have the faults).

Each returns a plain dict of figures (the JSON report). Every scenario starts
with a ramp, so every run also reports what connecting costs.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from typing import Any

import gevent

from bench.stampede.backend import CommandLog, pace
from bench.stampede.controller import Run, percentiles

KIB_PER_MIB = 1024
ROUND_TRIP_WINDOW = 5.0


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """Per-reason counts that happened between two marks."""
    return {k: v for k, v in (Counter(after) - Counter(before)).items() if v}


def cost(before: dict[str, Any], after: dict[str, Any], count: int, field: str,
         scale: float) -> float | None:
    """How much of gauge `field` each of `count` things cost between two marks (None without a gauge)."""
    if count <= 0 or before.get(field) is None or after.get(field) is None:
        return None
    return round((after[field] - before[field]) * scale / count, 4)


def handshakes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any] | None:
    """TLS handshakes between two marks: full, resumed (the device's ticket accepted), failed, and the resumed
    share of those completed; None for a plain transport (no handshake happened)."""
    counts = {kind: after[f"tls_{kind}"] - before[f"tls_{kind}"] for kind in ("full", "resumed", "failed")}
    if not any(counts.values()):
        return None
    completed = counts["full"] + counts["resumed"]
    return {**counts, "resumed_share": round(counts["resumed"] / completed, 4) if completed else None}


def ramp(run: Run, options: argparse.Namespace) -> dict[str, Any]:
    """Connect every device as fast as the bounded in-flight connects allow, then hold a moment."""
    devices = run.plan.devices
    objects_idle = run.broker.metadata() if run.broker is not None else None
    before = run.mark("before_connect", pss=True)
    run.fleet.tell({"op": "connect", "jitter": 0.0})
    all_up = run.wait_until_up(devices, options.ramp_timeout)
    connected = run.mark("connected")
    gevent.sleep(options.settle)
    held = run.mark("held", pss=True)
    objects_held = run.broker.metadata() if run.broker is not None else None
    seconds = max(run.fleet.last_welcome() - before["wall"], 1e-3)
    established = connected["established"] - before["established"]
    return {
        "devices": devices, "all_up": all_up, "up": connected["up"],
        "seconds": round(seconds, 3), "sessions_per_s": round(established / seconds, 1),
        "peak_sessions_per_s": max((entry["rate"] for entry in run.timeline), default=0),
        "failures": delta(connected["failures"], before["failures"]),
        "tls": handshakes(before, connected),
        "welcome_ms": percentiles(run.fleet.welcome_ms),
        "server_rss_mb_idle": before.get("rss_mb"), "server_rss_mb_held": held.get("rss_mb"),
        "rss_kib_per_session": cost(before, held, held["up"], "rss_mb", KIB_PER_MIB),
        "pss_kib_per_session": cost(before, held, held["up"], "pss_mb", KIB_PER_MIB),
        "cpu_ms_per_session": cost(before, connected, established, "cpu_s", 1000),
        # RabbitMQ's share (every node's, on a cluster): on one machine it competes with the gateway for the cores.
        "rabbit_cpu_ms_per_session": cost(before, connected, established, "rabbit_cpu_s", 1000),
        # Already-connected devices ping during the ramp: their share is in cpu_ms_per_session.
        "heartbeats_answered": connected["pongs"] - before["pongs"],
        "other_cpu_cores": busy_cores(before, connected, "others_cpu_s"),
        "rabbit_rss_mb_idle": before.get("rabbit_rss_mb"),
        "rabbit_rss_mb_held": held.get("rabbit_rss_mb"),
        "rabbit_kib_per_session": cost(before, held, held["up"], "rabbit_rss_mb", KIB_PER_MIB),
        # RabbitMQ's metadata (queues, bindings, exchanges) with none held and with every device held.
        "rabbit_objects_idle": objects_idle, "rabbit_objects_held": objects_held,
    }


def hold(run: Run, options: argparse.Namespace) -> dict[str, Any]:
    """Hold every session: an idle window (heartbeats only), then a commands window, then an events window.

    The windows follow each other rather than overlap so that each unit of work
    (a heartbeat, a command round trip, an event) gets its own CPU figure: the
    server's CPU in a window, less the idle rate over its length, over the count.
    The floor has no commands or events, so its hold ends with the idle window.
    """
    figures = {"ramp": ramp(run, options)}
    start = run.mark("idle_start")
    gevent.sleep(options.quiet)
    idle = idle_figures(start, run.mark("idle_end"))
    rate = idle["idle_cpu_s_per_s"] or 0.0
    traffic = {} if run.plan.floor else {"commands": command_window(run, options, rate),
                                         "events": event_window(run, options, rate)}
    end = run.mark("hold_end")
    figures["hold"] = {
        **idle, "seconds": options.duration, "command_rate": options.command_rate,
        "event_rate": options.event_rate, **traffic,
        "lost_sessions": delta(end["lost"], start["lost"]),
        "rabbit_rss_mb_end": end.get("rabbit_rss_mb"),
    }
    return figures


def busy_cores(start: dict[str, Any], end: dict[str, Any], field: str) -> float | None:
    """A cumulative CPU gauge's rate between two marks: cores kept busy on average."""
    return cost(start, end, 1, field, 1 / max(end["t"] - start["t"], 1e-3))


def idle_figures(start: dict[str, Any], end: dict[str, Any]) -> dict[str, Any]:
    """What holding costs: server CPU per second, and per heartbeat answered (counted by the devices)."""
    heartbeats = end["pongs"] - start["pongs"]
    return {"idle_seconds": round(end["t"] - start["t"], 3), "idle_heartbeats_answered": heartbeats,
            "idle_cpu_s_per_s": busy_cores(start, end, "cpu_s"),
            "cpu_ms_per_heartbeat": cost(start, end, heartbeats, "cpu_s", 1000),
            "idle_other_cpu_cores": busy_cores(start, end, "others_cpu_s")}


def drain(options: argparse.Namespace) -> None:
    """Wait for the last answers of a window (a command times out after --command-timeout)."""
    gevent.sleep(min(options.command_timeout, 5) + 1)


def command_window(run: Run, options: argparse.Namespace, idle_rate: float) -> dict[str, Any] | None:
    """Commands at --command-rate for --duration to random devices; round trips and CPU per command."""
    if run.commands is None or options.command_rate <= 0:
        return None
    start = run.mark("commands_start")
    send_commands(run, options, list(range(run.plan.devices)))
    drain(options)
    end = run.mark("commands_end")
    answered = end["commands"] - start["commands"]
    return {**command_figures(run), **above_idle(start, end, idle_rate, answered, "command")}


def event_window(run: Run, options: argparse.Namespace, idle_rate: float) -> dict[str, Any] | None:
    """Events at --event-rate for --duration from random devices; acks, delivery check and CPU per event."""
    if run.events is None or options.event_rate <= 0:
        return None
    start = run.mark("events_start")
    run.fleet.tell({"op": "events", "rate": options.event_rate / run.plan.processes})
    gevent.sleep(options.duration)
    run.fleet.tell({"op": "events", "rate": 0})
    drain(options)
    end = run.mark("events_end")
    acked = end["acked"] - start["acked"]
    return {**event_figures(run, start, end), **above_idle(start, end, idle_rate, acked, "event")}


def above_idle(start: dict[str, Any], end: dict[str, Any], idle_rate: float, count: int,
               unit: str) -> dict[str, Any]:
    """Server CPU of a window beyond what holding alone costs over its length, in all and per `unit`."""
    if start.get("cpu_s") is None:
        return {}
    busy = (end["cpu_s"] - start["cpu_s"]) - idle_rate * (end["t"] - start["t"])
    return {"cpu_s_above_idle": round(busy, 3),
            f"cpu_ms_per_{unit}": round(busy * 1000 / count, 4) if count > 0 else None,
            "other_cpu_cores": busy_cores(start, end, "others_cpu_s")}


def send_commands(run: Run, options: argparse.Namespace, device_indexes: list[int]) -> None:
    """Send commands to random devices among `device_indexes` at the command rate (or just wait)."""
    if run.commands is None or options.command_rate <= 0:
        gevent.sleep(options.duration)
        return
    commands = run.commands

    def one() -> None:
        commands.send(run.plan.device_name(random.choice(device_indexes)))

    pace(options.command_rate, options.duration, one)


def command_figures(run: Run) -> dict[str, Any] | None:
    if run.commands is None:
        return None
    log = run.commands.log
    return {"sent": log.sent, "outcomes": dict(log.outcomes),
            "broker_reconnects": getattr(run.commands, "reconnects", 0),
            "broker_blocked_by_alarm": getattr(run.commands, "blocked", 0),
            "round_trip_ms": percentiles([rtt for _, rtt in log.samples]),
            "round_trip_over_time": round_trip_windows(log, run.started_wall)}


def round_trip_windows(log: CommandLog, started_wall: float) -> list[dict[str, Any]]:
    """Round-trip percentiles per window of ROUND_TRIP_WINDOW seconds, by send time."""
    windows: dict[int, list[float]] = {}
    for sent, rtt in log.samples:
        windows.setdefault(int((sent - started_wall) // ROUND_TRIP_WINDOW), []).append(rtt)
    return [{"t": index * ROUND_TRIP_WINDOW, **percentiles(rtts)}
            for index, rtts in sorted(windows.items())]


def event_figures(run: Run, start: dict[str, Any], end: dict[str, Any]) -> dict[str, Any] | None:
    if run.events is None:
        return None
    missing = run.events.missing(run.fleet.acked_ids)
    return {"sent": end["events_sent"] - start["events_sent"],
            "acked": end["acked"] - start["acked"],
            "nacked": delta(end["nacked"], start["nacked"]),
            "unanswered_when_session_ended": end["unanswered_events"],
            "acked_but_not_consumed": len(missing), "missing_examples": missing[:10],
            "ack_ms": percentiles(run.fleet.ack_ms),
            "presence_seen": dict(run.events.presence),
            "verifier_broker_reconnects": run.events.reconnects}


def stampede(run: Run, options: argparse.Namespace) -> dict[str, Any]:
    """All devices drop at once and come back at once (and again spread over --jitter seconds)."""
    figures: dict[str, Any] = {"ramp": ramp(run, options)}
    for jitter in sorted({0.0, options.jitter}):
        run.fleet.tell({"op": "drop"})
        run.wait_until_down(options.ramp_timeout)
        gevent.sleep(options.settle)
        figures[f"reconnect_jitter_{jitter:g}s"] = reconnect(run, options, jitter)
    return figures


def reconnect(run: Run, options: argparse.Namespace, jitter: float) -> dict[str, Any]:
    before = run.mark(f"reconnect_{jitter:g}_start")
    run.fleet.tell({"op": "connect", "jitter": jitter})
    all_back = run.wait_until_up(run.plan.devices, options.ramp_timeout + jitter)
    after = run.mark(f"reconnect_{jitter:g}_done")
    established = after["established"] - before["established"]
    return {"jitter_s": jitter, "all_back": all_back, "up": after["up"],
            "seconds_until_all_back": round(run.fleet.last_welcome() - before["wall"], 3),
            # Every session re-established is one bind (its old session's unbind came with the drop).
            "sessions_per_s": round(established / max(run.fleet.last_welcome() - before["wall"], 1e-3), 1),
            "failures": delta(after["failures"], before["failures"]),
            "tls": handshakes(before, after),
            "sessions_lost_meanwhile": delta(after["lost"], before["lost"]),
            # Sessions already back keep pinging while the rest reconnect: the server must keep answering.
            "heartbeats_answered_meanwhile": after["pongs"] - before["pongs"],
            "cpu_ms_per_session": cost(before, after, established, "cpu_s", 1000),
            "rabbit_cpu_ms_per_session": cost(before, after, established, "rabbit_cpu_s", 1000)}
