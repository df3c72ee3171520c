"""The scenarios: ramp, hold, stampede and kill-load, each a function of a `Run` and the options.

Each returns a plain dict of figures (the JSON report). Every scenario starts
with a ramp, so every run also reports what connecting costs.
"""

from __future__ import annotations

import argparse
import math
import random
import time
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
            "cpu_ms_per_session": cost(before, after, established, "cpu_s", 1000)}


def kill_load(run: Run, options: argparse.Namespace) -> dict[str, Any]:
    """SIGKILL the load processes holding a third of the devices; the rest must not notice."""
    figures: dict[str, Any] = {"ramp": ramp(run, options)}
    workers = list(range(run.plan.processes))
    victims = workers[:max(1, len(workers) // 3)]
    survivors = workers[len(victims):]
    survivor_devices = [index for worker in survivors
                        for index in range(*span(run.plan.share(worker)))]
    before = run.fleet.totals(survivors)
    run.fleet.kill(victims)
    run.mark("killed")
    send_commands(run, options, survivor_devices)
    drain(options)
    after = run.fleet.totals(survivors)
    run.mark("after_kill")
    figures["kill"] = {
        "killed_processes": len(victims), "surviving_processes": len(survivors),
        "survivor_devices": len(survivor_devices), "survivors_up_after": after["up"],
        "survivors_sessions_lost": delta(after["lost"], before["lost"]),
        "survivors_reconnects": after["established"] - before["established"],
        "commands": command_figures(run),
    }
    return figures


def span(share: tuple[int, int]) -> tuple[int, int]:
    first, count = share
    return first, first + count


RECOVERY_TARGET = 3.0  # seconds after a node's loss by which commands must flow for every device (issue 19; 5 in issue 13)
SWEEP_SECONDS = 10.0  # the sweep sends one command to every device, spread over this long


def node_loss(run: Run, options: argparse.Namespace) -> dict[str, Any]:
    """A RabbitMQ node crashes (SIGKILL) while every device is held and commands flow: do they flow again
    within RECOVERY_TARGET seconds, for every device?

    Commands go to random devices at --command-rate for --quiet seconds, then through the loss and
    RECOVERY_TARGET seconds after it: the last of them that failed says when commands flowed again
    (for a sample of devices). Then a sweep, RECOVERY_TARGET seconds after the loss, sends one command
    to every device: each answered proves that device reachable again by then. The node is booted
    again at the end, and commands flow for --settle seconds more, so later runs find both nodes.
    Only on a cluster the suite booted (`--broker cluster` or `cluster3`): one node has nothing to lose.
    """
    figures: dict[str, Any] = {"ramp": ramp(run, options)}
    if run.broker is None or not run.broker.can_lose_node or run.commands is None:
        figures["node_loss"] = None
        return figures
    log, devices = run.commands.log, run.plan.devices
    start = run.mark("commands_start")
    commands = run.commands

    def one() -> None:
        commands.send(run.plan.device_name(random.randrange(devices)))

    pace(options.command_rate, options.quiet, one)
    killed = run.broker.lose_node()
    run.mark("node_lost")
    pace(options.command_rate, RECOVERY_TARGET - (time.time() - killed), one)
    sweep_started = time.time()
    names = (run.plan.device_name(index) for index in range(devices))
    pace(devices / SWEEP_SECONDS, SWEEP_SECONDS, lambda: commands.send(next(names)))
    for name in names:  # the pacing's last tick may fall short of the last few
        commands.send(name)
    drain(options)
    swept = run.mark("swept")
    restored_in = run.broker.restore_node()
    pace(options.command_rate, options.settle, one)
    drain(options)
    end = run.mark("node_restored")
    # Judged by send time once everything settled: a command's outcome may come after the next phase began.
    sampled = recovery(log.settled, start["wall"], killed, sweep_started)
    swept_figures = sweep(log.settled, sweep_started, swept["wall"], killed, devices)
    figures["node_loss"] = {
        "killed_after_s": round(killed - start["wall"], 3),
        # The last failure of either: after it, every command sent was answered, the sweep's included.
        "every_device_answering_after_s": max(sampled["recovery_s"],
                                              swept_figures["last_failed_sent_after_loss_s"] or 0.0),
        "sampled": sampled,
        "sweep": swept_figures,
        "sessions_lost": sum(delta(swept["lost"], start["lost"]).values()),
        "sessions_lost_by_reason": delta(swept["lost"], start["lost"]),
        "up_after": swept["up"],
        "node_restored_in_s": round(restored_in, 3),
        "after_restore": outcomes_between(log.settled, swept["wall"]),
        "sessions_lost_after_restore": delta(end["lost"], swept["lost"]),
        "commands": command_figures(run),
        "commands_unsettled": log.sent - len(log.settled),  # neither answered nor timed out by the end
    }
    return figures


IN_FLIGHT_S = 0.5  # a command round trip is milliseconds: one sent half a second before the loss was answered


def recovery(settled: list[tuple[float, str, str]], since: float, killed: float, until: float) -> dict[str, Any]:
    """Random commands sent between `since` and `until`: how they fared before and after the loss at `killed`."""
    sample = [(sent - killed, outcome) for sent, _device, outcome in settled if since <= sent < until]
    failed_after = [t for t, outcome in sample if outcome != "ok" and t >= 0]
    # Sent within IN_FLIGHT_S before the loss: maybe still on its way (a forward in a queue on the node
    # killed): reported apart, not as a failure before the loss.
    return {"sent_before_loss": sum(t < -IN_FLIGHT_S for t, _ in sample),
            "failed_before_loss": sum(t < -IN_FLIGHT_S and outcome != "ok" for t, outcome in sample),
            "in_flight_at_loss": dict(Counter(outcome for t, outcome in sample if -IN_FLIGHT_S <= t < 0)),
            "sent_after_loss": sum(t >= 0 for t, _ in sample),
            "failed_after_loss": dict(Counter(outcome for t, outcome in sample if outcome != "ok" and t >= 0)),
            "first_failed_s": round(min(failed_after), 3) if failed_after else None,
            # After this, every sampled command was answered: commands flowed again.
            "recovery_s": round(max(failed_after), 3) if failed_after else 0.0,
            "answered_share_over_time": answered_share(sample)}


def answered_share(sample: list[tuple[float, str]], width: float = 0.5) -> list[dict[str, Any]]:
    """Per `width` seconds (0 = the loss): commands sent then, and the share of them answered."""
    bins: dict[int, list[int]] = {}
    for t, outcome in sample:
        counts = bins.setdefault(math.floor(t / width), [0, 0])
        counts[0] += 1
        counts[1] += outcome == "ok"
    return [{"t": index * width, "sent": sent, "share": round(ok / sent, 4)}
            for index, (sent, ok) in sorted(bins.items())]


def sweep(settled: list[tuple[float, str, str]], started: float, ended: float, killed: float,
          devices: int) -> dict[str, Any]:
    """The sweep's commands (one per device): how many devices answered, and when the failed ones were sent."""
    swept = [(sent - killed, device, outcome) for sent, device, outcome in settled if started <= sent < ended]
    answered = {device for _, device, outcome in swept if outcome == "ok"}
    failed = [(t, outcome) for t, device, outcome in swept if outcome != "ok" and device not in answered]
    return {"devices": devices, "started_after_loss_s": round(started - killed, 3),
            "answered": len(answered), "not_answered": dict(Counter(outcome for _, outcome in failed)),
            "last_failed_sent_after_loss_s": round(max(t for t, _ in failed), 3) if failed else None,
            "answered_share_over_time": answered_share([(t, outcome) for t, _device, outcome in swept])}


def outcomes_between(settled: list[tuple[float, str, str]], since: float) -> dict[str, int]:
    return dict(Counter(outcome for sent, _device, outcome in settled if sent >= since))


SCENARIOS = {"ramp": lambda run, options: {"ramp": ramp(run, options)},
             "hold": hold, "stampede": stampede, "kill-load": kill_load, "node-loss": node_loss}
