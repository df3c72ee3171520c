"""Faults under a held fleet: load processes killed (kill-load) and a RabbitMQ node lost (node-loss), and the
arithmetic of recovery that worker_kill.py reads too: which commands were answered, by when they were sent.

Outcomes are judged from the command log's `Settled` entries by send time, once everything settled: a
command's outcome may come after the next phase began.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections import Counter
from typing import Any

from bench.stampede.backend import Settled, pace
from bench.stampede.controller import Run
from bench.stampede.scenarios import command_figures, delta, drain, ramp, send_commands


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


def recovery(settled: list[Settled], since: float, killed: float, until: float) -> dict[str, Any]:
    """Random commands sent between `since` and `until`: how they fared before and after the loss at `killed`."""
    sample = [(sent - killed, outcome) for sent, _device, outcome, _at in settled if since <= sent < until]
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


def sweep(settled: list[Settled], started: float, ended: float, killed: float,
          devices: int) -> dict[str, Any]:
    """The sweep's commands (one per device): how many devices answered, and when the failed ones were sent."""
    swept = [(sent - killed, device, outcome) for sent, device, outcome, _at in settled
             if started <= sent < ended]
    answered = {device for _, device, outcome in swept if outcome == "ok"}
    failed = [(t, outcome) for t, device, outcome in swept if outcome != "ok" and device not in answered]
    return {"devices": devices, "started_after_loss_s": round(started - killed, 3),
            "answered": len(answered), "not_answered": dict(Counter(outcome for _, outcome in failed)),
            "last_failed_sent_after_loss_s": round(max(t for t, _ in failed), 3) if failed else None,
            "answered_share_over_time": answered_share([(t, outcome) for t, _device, outcome in swept])}


def outcomes_between(settled: list[Settled], since: float, until: float = math.inf) -> dict[str, int]:
    """Commands sent in [since, until), by outcome."""
    return dict(Counter(outcome for sent, _device, outcome, _at in settled if since <= sent < until))

