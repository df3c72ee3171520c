"""One server's turn: the same fleet and the same phases, driven by bench.stampede's controller and scenarios.

    ramp       connect every device (CONNECT, SUBSCRIBE ..commands/# at QoS 1), at most --concurrency
               connects in flight per load process
    keep-alive hold for --quiet seconds, only PINGREQs flowing (one per device per --heartbeat)
    events     QoS 1 events at --event-rate for --duration (PUBACK latency; Warren's after RabbitMQ's confirm)
    commands   commands at --command-rate for --duration (publish -> device; and the reply back: round trip)
    drop       every connection closed at once, then every device reconnecting at once

A `PeerRun` gauges the server's process tree (and, for Warren, the RabbitMQ it uses, apart: fields
`broker_*`) at every mark, so that costs per unit of work come out of the marks for either
(figures.unit_costs).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import gevent

from bench.mqtt_peers.backend import MqttBackend, StampedAmqpCommands
from bench.mqtt_peers.figures import unit_costs
from bench.mqtt_peers.servers import Server
from bench.sampling import TreeGauge, others_cpu_s
from bench.stampede.backend import EventVerifier
from bench.stampede.controller import Plan, Run, percentiles
from bench.stampede.scenarios import command_window, event_window, idle_figures, ramp, reconnect


def say(text: str) -> None:
    print(f"[mqtt_peers] {text}", file=sys.stderr, flush=True)


class PeerRun(Run):
    """bench.stampede's Run against one of the three servers, with that server's backend."""

    def __init__(self, plan: Plan, server: Server, args: argparse.Namespace) -> None:
        self.server = server
        self.broker_gauge = TreeGauge(server.broker_pid) if server.broker_pid else None
        super().__init__(plan, server.pid, "none", args.amqp_url, "", "", args.command_timeout)
        try:
            if server.key == "warren":
                self.commands = StampedAmqpCommands(args.amqp_url, args.command_timeout)
                self.events = EventVerifier(args.amqp_url, f"{plan.prefix}-")
            else:
                host, port = server.host_port
                self.commands = self.events = MqttBackend(host, port, f"{plan.prefix}-backend", args.command_timeout)
        except BaseException:
            self.__exit__()
            raise

    def gauges(self) -> dict[str, Any]:
        """The server tree's RSS and CPU; Warren's RabbitMQ's as `broker_*`; everything else's CPU."""
        sample: dict[str, Any] = dict(self.gauge.sample())
        if self.broker_gauge is not None:
            sample |= {f"broker_{name}": value for name, value in self.broker_gauge.sample().items()}
        sample["others_cpu_s"] = others_cpu_s(self.measured_pids())
        return sample

    def measured_pids(self) -> set[int]:
        """This tool, its load processes, the server and Warren's RabbitMQ."""
        pids = {os.getpid(), *(process.pid for process in self.fleet.processes), *self.gauge.pids()}
        return pids | (self.broker_gauge.pids() if self.broker_gauge is not None else set())

    def mark(self, name: str, pss: bool = False) -> dict[str, Any]:
        mark = super().mark(name, pss)
        if pss and self.broker_gauge is not None:
            mark["broker_pss_mb"] = self.broker_gauge.pss_mb()
        return mark


def plan_for(args: argparse.Namespace, server: Server) -> Plan:
    return Plan(label=server.key, targets=[server.url], devices=args.devices, processes=args.processes,
                floor=False, secret=args.secret, prefix=args.prefix, concurrency=args.concurrency,
                heartbeat=args.heartbeat, dialect=None if server.key == "warren" else "broker")


def measure(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    """Every phase against `server`; its figures, costs per unit of work and timeline."""
    plan = plan_for(args, server)
    say(f"{server.label}: {args.devices:,} devices from {plan.processes} load processes to {server.url}")
    with PeerRun(plan, server, args) as run:
        figures: dict[str, Any] = {"server": server.label, "version": server.version, "url": server.url}
        say(f"{server.label}: ramp")
        figures["ramp"] = ramp(run, args)
        say(f"{server.label}: keep-alive only, {args.quiet:g}s")
        start = run.mark("idle_start")
        gevent.sleep(args.quiet)
        figures["keepalive"] = idle_figures(start, run.mark("idle_end"))
        idle_rate = figures["keepalive"]["idle_cpu_s_per_s"] or 0.0
        say(f"{server.label}: QoS 1 events at {args.event_rate:g}/s for {args.duration:g}s")
        figures["events"] = event_window(run, args, idle_rate)
        say(f"{server.label}: commands at {args.command_rate:g}/s for {args.duration:g}s")
        figures["commands"] = command_window(run, args, idle_rate)
        if figures["commands"] is not None:
            figures["commands"]["delivery_ms"] = percentiles(run.fleet.command_ms)
        say(f"{server.label}: mass drop, then every device back at once")
        run.fleet.tell({"op": "drop"})
        run.wait_until_down(args.ramp_timeout)
        gevent.sleep(args.settle)
        figures["drop"] = reconnect(run, args, 0.0)
        gevent.sleep(args.settle)  # the timeline (and its plot) shows every device back
        figures["units"] = {"server": unit_costs(run.marks, args.devices)}
        if run.broker_gauge is not None:
            figures["units"]["broker"] = unit_costs(run.marks, args.devices, "broker_")
        figures["timeline"] = run.timeline
    return figures
