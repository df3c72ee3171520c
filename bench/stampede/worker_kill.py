"""The worker-kill scenario: a gateway worker SIGKILLed while every device is held and commands flow.

Issue 19's target: the devices of the other workers miss no command; those of the dead worker answer
again within RECOVERY_TARGET seconds of reconnecting. Which worker holds which device is read before the
kill from both ends of each connection: the load processes say each device's own address, and each
worker's sockets name their peers (psutil). The worker holding the most devices is killed (never the only
one); gunicorn starts another. Commands go to random devices (all of them) at --command-rate for --quiet
seconds before the kill and --duration seconds after it. The dead worker's devices see their connection
drop and reconnect as firmware does (their backoff, plus up to --jitter seconds); each comeback (its new
welcome) is passed to the controller within a load process's CHANGES_TICK, and from then on that device is
sent a command, and another at least PROBE_INTERVAL later whenever one settles not ok, until one is answered
ok (one probe in flight per device: probes that pile up behind a slow answer would only slow it more):
welcome to that answer is its recovery, an upper bound: `first_command_after_comeback_ms` is the tool's
own share of it (a loaded machine delays the news of a welcome), `answered_after_first_command_ms` the
gateway's. Once every one of them is back, and
RECOVERY_TARGET seconds after the last came back, a sweep sends one command to each. Figures are read
from the complete logs at the end (the probes only steer the sending).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import signal
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import gevent
import psutil

from bench.stampede.backend import Settled, pace
from bench.stampede.controller import Run, percentiles
from bench.stampede.faults import RECOVERY_TARGET, SWEEP_SECONDS, answered_share, recovery, sweep
from bench.stampede.scenarios import busy_cores, command_figures, cost, drain, ramp

PROBE_INTERVAL = 0.5  # a device back but not yet answering is sent another command at most this often
PROBE_TICK = 0.05
CHILDREN_EVERY = 0.25  # seconds between looks for the worker gunicorn starts in the dead one's place
OFFLINE = ("failed:offline", "returned_offline")  # the gateway said no session holds the device
Timeline = list[tuple[str, float]]  # ("lost" | "back", wall-clock time), in order


def holders(master: int, addresses: dict[str, tuple[str, int]]) -> dict[int, set[str]]:
    """The devices each child of `master` (a gunicorn worker) holds: those whose address is the peer of one
    of its sockets."""
    by_address = {address: device for device, address in addresses.items()}
    held: dict[int, set[str]] = {}
    for worker in psutil.Process(master).children():
        try:
            peers = [(conn.raddr.ip, conn.raddr.port) for conn in worker.net_connections("tcp") if conn.raddr]
        except psutil.NoSuchProcess:
            continue
        held[worker.pid] = {by_address[peer] for peer in peers if peer in by_address}
    return held


class Comebacks:
    """The dead worker's devices coming back: sends each one, once welcomed again, a command, and another
    whenever its last one settled not ok (PROBE_INTERVAL apart at least), until one is answered ok; notes
    when every one was back, and the new worker."""

    def __init__(self, run: Run, devices: set[str], workers: set[int] | None) -> None:
        """`workers`: the server's workers before the kill, to note when a new one appears (None: no kill)."""
        self.run, self.devices, self.workers = run, devices, workers
        self.children_seen = 0.0  # when the server's workers were last listed: a scan of /proc costs ~3 ms
        self.back: dict[str, float] = {}  # device -> when it was first welcomed again
        self.answered: set[str] = set()  # those that answered a command sent after that
        self.last_probe: dict[str, float] = {}
        self.probing: set[str] = set()  # those with a command sent since their comeback and not yet settled
        self.changes_read = self.settled_read = 0
        self.all_back: dict[str, Any] | None = None  # the run's mark when the last one came back
        self.replaced_at: float | None = None  # when the master had a child it did not have before

    def follow(self, until: float) -> None:
        """Probe until every device answered or the wall clock reaches `until`."""
        while time.time() < until and len(self.answered) < len(self.devices):
            self.read()
            now = time.time()
            for device in self.back.keys() - self.answered - self.probing:
                if now - self.last_probe.get(device, 0.0) >= PROBE_INTERVAL:
                    self.last_probe[device] = now
                    self.probing.add(device)
                    self.run.commands.send(device)
            gevent.sleep(PROBE_TICK)

    def read(self) -> None:
        """Take in the comebacks and answers logged since the last look. A comeback is logged before any
        answer to a probe of it; a random command answered before its comeback was read is missed here
        (one probe more), not in the figures, which are read from the whole logs at the end."""
        changes, settled = self.run.fleet.changes, self.run.commands.log.settled
        for device, kind, at in changes[self.changes_read:]:
            if kind == "back" and device in self.devices:
                self.back.setdefault(device, at)
        since_comeback = [(device, outcome) for sent, device, outcome, _ in settled[self.settled_read:]
                          if sent >= self.back.get(device, float("inf"))]
        self.answered |= {device for device, outcome in since_comeback if outcome == "ok"}
        # Any command of it settled (a random one may settle first): the next probe may go.
        self.probing -= {device for device, _ in since_comeback}
        self.changes_read, self.settled_read = len(changes), len(settled)
        if self.all_back is None and len(self.back) == len(self.devices):
            self.all_back = self.run.mark("all_back")
        now = time.time()
        if self.workers is not None and self.replaced_at is None and now - self.children_seen >= CHILDREN_EVERY:
            self.children_seen = now
            if {child.pid for child in self.children()} - self.workers:
                self.replaced_at = now

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.run.server_pid).children()
        except psutil.NoSuchProcess:
            return []


def worker_kill(run: Run, options: argparse.Namespace) -> dict[str, Any]:
    """SIGKILL the gateway worker holding the most devices while commands flow; see the module's docstring."""
    figures: dict[str, Any] = {"ramp": ramp(run, options), "worker_kill": None}
    held = workers_holding(run)
    if held is not None:
        kill = Kill(victim=max(held, key=lambda pid: len(held[pid])), held=held)
        kill_and_follow(run, options, kill)
        figures["worker_kill"] = kill_figures(run, kill)
    return figures


def workers_holding(run: Run) -> dict[int, set[str]] | None:
    """The devices each gateway worker holds; None where there is nothing to kill or no command to send
    (the floor, --commands-via none, a server not on this machine, a single worker)."""
    if run.plan.floor or run.commands is None or run.server_pid is None:
        return None
    started = time.monotonic()
    held = holders(run.server_pid, run.fleet.addresses())
    print(f"worker-kill: devices held by worker: {', '.join(f'{pid} {len(held[pid])}' for pid in held)} "
          f"(read in {time.monotonic() - started:.1f}s)", file=sys.stderr)
    if len(held) < 2:
        print(f"worker-kill: the server has {len(held)} worker(s): killing one would kill them all; skipped",
              file=sys.stderr)
        return None
    return held


@dataclass
class Kill:
    """One worker's kill: who held what before it, and when each phase began (wall clock)."""

    victim: int
    held: dict[int, set[str]]
    killed: float = 0.0  # just before the signal
    window_end: float = 0.0  # the random commands stopped
    sweep_started: float = 0.0
    replaced_at: float | None = None  # when the master had a new worker
    landed: dict[int, set[str]] = field(default_factory=dict)  # who held what after the sweep

    @property
    def dead(self) -> set[str]:
        return self.held[self.victim]

    @property
    def kept(self) -> set[str]:
        return set().union(*(devices for pid, devices in self.held.items() if pid != self.victim))


def kill_and_follow(run: Run, options: argparse.Namespace, kill: Kill) -> None:
    """Random commands for --quiet seconds, the kill, --duration seconds more of them while the dead
    worker's devices come back and are probed (probes go on after that until every one answered, for
    --ramp-timeout seconds from the kill at most), then the sweep; the run's marks say when."""
    run.fleet.tell({"op": "reconnect_spread", "seconds": options.jitter})
    comebacks = Comebacks(run, kill.dead, set(kill.held))
    commands, names = run.commands, [run.plan.device_name(index) for index in range(run.plan.devices)]
    run.mark("commands_start")
    flow = gevent.spawn(pace, options.command_rate, options.quiet + options.duration,
                        lambda: commands.send(random.choice(names)))
    gevent.sleep(options.quiet)
    run.mark("worker_killed")
    kill.killed = time.time()
    os.kill(kill.victim, signal.SIGKILL)
    comebacks.follow(until=kill.killed + options.duration)
    flow.join()
    kill.window_end = time.time()
    comebacks.follow(until=kill.killed + options.ramp_timeout)  # those back late (--jitter) are probed too
    kill.replaced_at = comebacks.replaced_at
    kill.sweep_started = sweep_comebacks(run, options, kill.dead)
    kill.landed = holders(run.server_pid, run.fleet.addresses())


def sweep_comebacks(run: Run, options: argparse.Namespace, dead: set[str]) -> float:
    """RECOVERY_TARGET seconds after the last of `dead` came back, one command to each, spread over
    SWEEP_SECONDS; marks `swept` once they settled; returns when the sweep began."""
    last_back = max((at for device, kind, at in run.fleet.changes if kind == "back" and device in dead),
                    default=time.time())
    gevent.sleep(max(0.0, last_back + RECOVERY_TARGET - time.time()))
    started = time.time()
    names = iter(sorted(dead))
    commands = run.commands
    pace(len(dead) / SWEEP_SECONDS, SWEEP_SECONDS, lambda: commands.send(next(names)))
    for name in names:  # the pacing's last tick may fall short of the last few
        commands.send(name)
    drain(options)
    run.mark("swept")
    return started


def kill_figures(run: Run, kill: Kill) -> dict[str, Any]:
    """Everything the kill's logs and marks say; CPU and memory from the kill until every device was back
    (until the sweep's end if some never came back)."""
    start, killed, swept = run.marks["commands_start"], run.marks["worker_killed"], run.marks["swept"]
    back = run.marks.get("all_back", swept)
    lines = timelines(run.fleet.changes, kill.killed, kill.dead)
    log = run.commands.log
    return {
        "workers": len(kill.held),
        "devices_per_worker": sorted((len(devices) for devices in kill.held.values()), reverse=True),
        "devices_on_no_worker": run.plan.devices - sum(len(devices) for devices in kill.held.values()),
        "killed_after_s": round(kill.killed - start["wall"], 3),
        "replacement_worker_after_s": round(kill.replaced_at - kill.killed, 3) if kill.replaced_at else None,
        "other_workers": other_workers(log.settled, lines, kill.kept, start["wall"], kill.killed, kill.window_end),
        "killed_worker": {**killed_worker(log.settled, lines, kill.dead, kill.killed, kill.sweep_started),
                          "landed_on": landed_on(kill.landed, kill.dead, set(kill.held) - {kill.victim})},
        "sweep": {**sweep(log.settled, kill.sweep_started, swept["wall"], kill.killed, len(kill.dead)),
                  "offline_while_connected": offline_while_connected(log.settled, lines, kill.sweep_started,
                                                                     swept["wall"])},
        "answered_twice": log.outcomes["answered_twice"],
        "up_after": swept["up"],
        "server_rss_mb_before_kill": killed.get("rss_mb"), "server_rss_mb_all_back": back.get("rss_mb"),
        "server_cpu_cores_kill_to_all_back": busy_cores(killed, back, "cpu_s"),
        # Every session set up meanwhile (the dead worker's coming back), with the commands and the new
        # worker's start in the same CPU.
        "cpu_ms_per_session_back": cost(killed, back, back["established"] - killed["established"], "cpu_s", 1000),
        "other_cpu_cores": busy_cores(killed, back, "others_cpu_s"),
        "commands": command_figures(run),
        "commands_unsettled": log.sent - len(log.settled),
    }


def timelines(changes: list[tuple[str, str, float]], killed: float, dead: set[str]) -> dict[str, Timeline]:
    """Every device's sessions lost and regained after the kill; the dead worker's start lost at the kill
    (their own loss is logged a moment later, when their connection's end reaches them)."""
    lines: dict[str, Timeline] = defaultdict(list)
    for device in dead:
        lines[device].append(("lost", killed))
    for device, kind, at in changes:
        if at >= killed and not (device in dead and kind == "lost" and lines[device][-1][0] == "lost"):
            lines[device].append((kind, at))
    return lines


def connected_at(line: Timeline, when: float) -> bool:
    """Whether a device held before the kill had a session at `when`, by its timeline."""
    connected = True
    for kind, at in line:
        if at > when:
            break
        connected = kind == "back"
    return connected


def offline_while_connected(settled: list[Settled], lines: dict[str, Timeline], since: float, until: float) -> int:
    """Commands sent in [since, until) answered `offline` to a device that had a session when they were sent."""
    return sum(outcome in OFFLINE and connected_at(lines.get(device, []), sent)
               for sent, device, outcome, _ in settled if since <= sent < until)


def other_workers(settled: list[Settled], lines: dict[str, Timeline], kept: set[str], since: float,
                  killed: float, until: float) -> dict[str, Any]:
    """The devices of the workers that lived: their commands before and after the kill (every one must be
    answered), how long the answers took, and any session of theirs lost."""
    mine = [entry for entry in settled if entry[1] in kept]
    figures = recovery(mine, since, killed, until)

    def round_trips(start: float, end: float) -> dict[str, float | None]:
        return percentiles([(at - sent) * 1000 for sent, _, outcome, at in mine
                            if outcome == "ok" and start <= sent < end])

    return {"devices": len(kept), **figures, "missed_after_loss": sum(figures["failed_after_loss"].values()),
            "round_trip_before_loss_ms": round_trips(since, killed),
            "round_trip_after_loss_ms": round_trips(killed, until),
            "offline_while_connected": offline_while_connected(mine, lines, since, until),
            "sessions_lost": sum(kind == "lost" for device in kept for kind, _ in lines.get(device, []))}


def killed_worker(settled: list[Settled], lines: dict[str, Timeline], dead: set[str], killed: float,
                  sweep_started: float) -> dict[str, Any]:
    """The dead worker's devices: when each came back, and from its comeback to its first command answered
    ok (any command sent after its welcome, random or probe, before the sweep)."""
    back = {device: next(at for kind, at in lines[device] if kind == "back")
            for device in dead if any(kind == "back" for kind, _ in lines[device])}
    mine = [entry for entry in settled if entry[1] in dead and entry[0] < sweep_started]
    after = [entry for entry in mine if entry[0] >= back.get(entry[1], math.inf)]
    away = [entry for entry in mine if killed <= entry[0] < back.get(entry[1], math.inf)]
    first_sent: dict[str, float] = {}
    first_ok: dict[str, float] = {}
    for sent, device, outcome, at in after:
        first_sent[device] = min(sent, first_sent.get(device, sent))
        if outcome == "ok":
            first_ok[device] = min(at, first_ok.get(device, at))
    recovered = [(first_ok[device] - back[device]) * 1000 for device in first_ok]
    return {"devices": len(dead), "back": len(back),
            "back_after_kill_ms": percentiles([(at - killed) * 1000 for at in back.values()]),
            # How soon the first command followed a comeback: the floor of the next figure.
            "first_command_after_comeback_ms": percentiles([(first_sent[d] - back[d]) * 1000 for d in first_sent]),
            "answered_after_comeback_ms": percentiles(recovered),
            # The gateway's part of it: from that first command to the first answer ok.
            "answered_after_first_command_ms": percentiles([(first_ok[d] - first_sent[d]) * 1000 for d in first_ok]),
            "answered_within_target": sum(ms <= RECOVERY_TARGET * 1000 for ms in recovered),
            "target_s": RECOVERY_TARGET, "back_never_answered": len(back) - len(first_ok),
            "commands_while_away": dict(Counter(entry[2] for entry in away)),
            "commands_after_comeback": dict(Counter(entry[2] for entry in after)),
            "offline_while_connected": offline_while_connected(mine, lines, killed, sweep_started),
            # [device, ms from its comeback to the command's send] of the first few answered offline after it
            "offline_after_comeback_examples": [[device, round((sent - back[device]) * 1000, 1)]
                                                for sent, device, outcome, _ in after if outcome in OFFLINE][:5],
            "lost_again": sum(sum(kind == "lost" for kind, _ in lines[device]) > 1 for device in dead),
            "answered_share_over_time": answered_share([(sent - killed, outcome) for sent, _, outcome, _ in mine])}


def landed_on(landed: dict[int, set[str]], dead: set[str], survivors: set[int]) -> dict[str, int]:
    """Where the dead worker's devices are held after the sweep: by the workers that lived, or a new one."""
    return {"surviving_workers": sum(len(devices & dead) for pid, devices in landed.items() if pid in survivors),
            "new_worker": sum(len(devices & dead) for pid, devices in landed.items() if pid not in survivors)}
