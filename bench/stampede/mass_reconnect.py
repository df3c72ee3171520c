"""The mass-reconnect scenario: every device's connection cut at once while commands flow, and every device
coming back at once, each sent a command as soon as its new session is welcomed.

Issue 19's "nothing lost, nothing doubled" at scale: PROTOCOL.md section 2.4 says every command gets
exactly one answer (none only if it expires unanswered) and, from a session's welcome on, reaches that
session and no older one. Here the load processes shut every device's socket down at once (`cut`: the
devices see their session end and come back after their backoff plus up to --jitter seconds, as firmware
would after a network outage; the gateway sees each old connection end while its new hello races in).
Commands go to random devices at --command-rate for --quiet seconds before the cut and --duration seconds
after it; each comeback is sent a command at once, and another whenever that one settles not ok, until
one is answered ok (worker_kill.py's `Comebacks`, standing in for a backend reacting to `session.connected`); and
RECOVERY_TARGET seconds after the last came back a sweep sends one command to each device.

What the figures say against section 2.4, read from the complete logs at the end:
- `answered_twice`: a command answered more than once (target 0);
- `after_comeback`: commands sent after the device's new welcome, by outcome. One delivered to the older
  session (which the device no longer reads) would time out here, one answered `offline` would show as
  such: every one must be `ok`;
- `offline_while_connected`: commands answered `offline` that were sent while the device had a session;
- `offline_answer_ms`: how soon `offline` came for a device between sessions (target p99 <= 250 ms).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from typing import Any

import gevent

from bench.stampede.backend import Settled, pace
from bench.stampede.controller import Run, percentiles
from bench.stampede.faults import outcomes_between, sweep
from bench.stampede.scenarios import busy_cores, command_figures, cost, ramp
from bench.stampede.worker_kill import OFFLINE, Comebacks, killed_worker, sweep_comebacks, timelines


def mass_reconnect(run: Run, options: argparse.Namespace) -> dict[str, Any]:
    """Cut every device's connection at once while commands flow; see the module's docstring."""
    figures: dict[str, Any] = {"ramp": ramp(run, options), "mass_reconnect": None}
    if run.plan.floor or run.commands is None:
        print("mass-reconnect: no commands to send here (the floor, or --commands-via none); skipped",
              file=sys.stderr)
        return figures
    devices = {run.plan.device_name(index) for index in range(run.plan.devices)}
    cut, window_end, sweep_started = cut_and_follow(run, options, devices)
    figures["mass_reconnect"] = reconnect_figures(run, devices, cut, window_end, sweep_started)
    return figures


def cut_and_follow(run: Run, options: argparse.Namespace, devices: set[str]) -> tuple[float, float, float]:
    """Random commands for --quiet seconds, the cut, --duration seconds more while every device comes back
    and is probed (probes go on until each answered, --ramp-timeout seconds from the cut at most), then the
    sweep. Returns when the cut, the random commands' end and the sweep's start were (wall clock)."""
    run.fleet.tell({"op": "reconnect_spread", "seconds": options.jitter})
    comebacks = Comebacks(run, devices, None)
    commands, names = run.commands, sorted(devices)
    run.mark("commands_start")
    flow = gevent.spawn(pace, options.command_rate, options.quiet + options.duration,
                        lambda: commands.send(random.choice(names)))
    gevent.sleep(options.quiet)
    run.mark("cut")
    cut = time.time()
    run.fleet.tell({"op": "cut"})
    comebacks.follow(until=cut + options.duration)
    flow.join()
    window_end = time.time()
    comebacks.follow(until=cut + options.ramp_timeout)
    return cut, window_end, sweep_comebacks(run, options, devices)


def reconnect_figures(run: Run, devices: set[str], cut: float, window_end: float,
                      sweep_started: float) -> dict[str, Any]:
    """Everything the logs say about section 2.4 through the mass reconnect; CPU from the cut until every
    device was back (until the sweep's end if some never came back)."""
    start, at_cut, swept = run.marks["commands_start"], run.marks["cut"], run.marks["swept"]
    back = run.marks.get("all_back", swept)
    lines = timelines(run.fleet.changes, cut, devices)
    log = run.commands.log
    reconnected = killed_worker(log.settled, lines, devices, cut, sweep_started)
    return {
        "devices": len(devices),
        "cut_after_s": round(cut - start["wall"], 3),
        "answered_twice": log.outcomes["answered_twice"],
        "late_replies": log.outcomes["late_reply"],  # answers after the command's timeout (a timeout each)
        "reconnected": reconnected,
        "after_comeback": reconnected["commands_after_comeback"],
        "offline_while_connected": reconnected["offline_while_connected"],
        "offline_answer_ms": offline_answer_ms(log.settled, cut, window_end),
        # Every command (random and probes), sent before the cut and from it to the window's end.
        "commands_by_outcome": {"before_cut": outcomes_between(log.settled, start["wall"], cut),
                                "after_cut": outcomes_between(log.settled, cut, window_end)},
        "sweep": sweep(log.settled, sweep_started, swept["wall"], cut, len(devices)),
        "up_after": swept["up"],
        "server_cpu_cores_cut_to_all_back": busy_cores(at_cut, back, "cpu_s"),
        "cpu_ms_per_session_back": cost(at_cut, back, back["established"] - at_cut["established"], "cpu_s", 1000),
        "other_cpu_cores": busy_cores(at_cut, back, "others_cpu_s"),
        "commands": command_figures(run),
        "commands_unsettled": log.sent - len(log.settled),
    }


def offline_answer_ms(settled: list[Settled], since: float, until: float) -> dict[str, float | None]:
    """From send to answer, of the commands sent in [since, until) answered `offline` (section 5: at once)."""
    return percentiles([(at - sent) * 1000 for sent, _, outcome, at in settled
                        if outcome in OFFLINE and since <= sent < until])

