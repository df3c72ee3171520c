"""Run one scenario against the floor (when given) and the gateway, and publish what it measured."""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import gevent
import psutil

from bench.stampede import report, units
from bench.stampede.catalog import SCENARIOS
from bench.stampede.controller import Plan, Run, processes_for
from bench.stampede.gauges import pid_listening_on


def local_pid(url: str) -> int | None:
    """The pid of the server behind `url` when it listens on this machine."""
    parts = urlsplit(url)
    if parts.hostname not in ("localhost",) and not (parts.hostname or "").startswith("127."):
        return None
    return pid_listening_on(parts.port)


def servers(args: argparse.Namespace) -> list[tuple[str, list[str], int | None]]:
    """(label, device endpoints, pid to measure) for the floor (first) and the gateway."""
    found = []
    if args.floor:
        found.append(("floor", [args.floor], args.floor_pid or local_pid(args.floor)))
    if args.target:
        found.append(("gateway", args.target, args.gateway_pid or local_pid(args.target[0])))
    return found


def machine() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1]}


def revision(directory: Path) -> str | None:
    """The checkout's commit (with "+dirty" for local changes): the gateway measured, when local."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, cwd=directory,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=directory,
                               capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty.strip() else "")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the scenario against the floor (if given), then the gateway; return every figure."""
    runs = {}
    for label, targets, pid in servers(args):
        runs[label] = measure_server(args, label, targets, pid)
        gevent.sleep(args.settle)
    return assemble(args, runs)


@dataclass
class ServerRun:
    """One scenario against one server: where its devices connected, what it measured, its timeline."""

    targets: list[str]
    figures: dict[str, Any]
    timeline: list[dict[str, Any]]


def measure_server(args: argparse.Namespace, label: str, targets: list[str], pid: int | None) -> ServerRun:
    """One scenario against one server (the floor when `label` is "floor")."""
    minimum_processes = 3 if args.scenario == "kill-load" else 1
    plan = Plan(label=label, targets=targets, devices=args.devices, floor=label == "floor",
                processes=args.processes or processes_for(args.devices, minimum_processes),
                secret=args.secret, prefix=args.prefix, concurrency=args.concurrency,
                heartbeat=args.heartbeat, cafile=args.cafile, verify_tls=not args.insecure)
    with Run(plan, pid, args.commands_via, args.amqp_url, args.http_url, args.api_token,
             args.command_timeout, args.rabbit) as run:
        return ServerRun(targets, SCENARIOS[args.scenario](run, args), run.timeline)


def assemble(args: argparse.Namespace, runs: dict[str, ServerRun]) -> dict[str, Any]:
    """The results of one scenario's runs (by label, the floor first): every figure, and the ratios."""
    results: dict[str, Any] = {"scenario": args.scenario, "devices": args.devices,
                               "command": " ".join(["python -m bench.stampede", *sys.argv[1:]]),
                               "machine": machine(), "gateway_dir": str(args.gateway_dir.resolve()),
                               "revision": revision(args.gateway_dir),
                               "targets": {label: run.targets for label, run in runs.items()},
                               "runs": {label: run.figures for label, run in runs.items()},
                               "timelines": {label: run.timeline for label, run in runs.items()}}
    results["ratios"] = report.ratios(results["runs"])
    results["per_unit"] = units.per_unit(results["runs"])
    return results


def publish(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Write the JSON and the PNG, print the table."""
    report.write_json(results, args.out)
    report.plot(results, results["timelines"], args.plot)
    print(report.table(results))
    print(f"\nwrote {args.out} and {args.plot}")
