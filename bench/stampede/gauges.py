"""The server's own cost, read from outside: which process tree is the server, and RabbitMQ's memory and CPU.

A gunicorn master forks its workers, so every figure sums the master and all
its descendants: bench/sampling.py's TreeGauge reads them (RSS every second, PSS
at a few moments), as it reads every benchmark's processes. The machine is shared,
so the CPU everything else used meanwhile is gauged too (sampling.others_cpu_s):
it says how disturbed a figure is.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import psutil

from bench.sampling import MB


def pid_listening_on(port: int) -> int | None:
    """The top process of the tree that listens on `port` (a gunicorn master, the floor's parent).

    Pre-forked workers share the listen socket and psutil names only one of
    them as its owner, so climb to the highest ancestor that also listens.
    """
    owner = next((conn.pid for conn in psutil.net_connections("tcp")
                  if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid),
                 None)
    if owner is None:
        return None
    process = psutil.Process(owner)
    while (parent := process.parent()) is not None and listens_on(parent, port):
        process = parent
    return process.pid


def listens_on(process: psutil.Process, port: int) -> bool:
    try:
        return any(conn.status == psutil.CONN_LISTEN and conn.laddr.port == port
                   for conn in process.net_connections("tcp"))
    except psutil.Error:
        return False


def rabbit_processes(pids: list[int] | None = None) -> list[psutil.Process]:
    """The RabbitMQ nodes a run drives: the processes `pids` (a cluster the suite booted), else the
    local node (its beam.smp process), if one runs here.

    The local node is the oldest beam: every `rabbitmqctl` (others run them on a shared machine) is a
    short-lived beam.smp too, and mistaking one for the node swaps the node's whole memory and CPU in
    or out of a figure.
    """
    if pids is not None:
        found = []
        for pid in pids:
            try:
                found.append(psutil.Process(pid))
            except psutil.Error:
                continue
        return found
    beams = [process for process in psutil.process_iter(["name", "create_time"])
             if (process.info["name"] or "").startswith("beam")]
    return [min(beams, key=lambda process: process.info["create_time"])] if beams else []


def rabbit_rss_mb(pids: list[int] | None = None) -> float | None:
    """RSS of the RabbitMQ nodes (summed over a cluster's), None when there is none to read."""
    total = _summed_over_nodes(pids, lambda process: process.memory_info().rss)
    return None if total is None else total / MB


def rabbit_cpu_s(pids: list[int] | None = None) -> float | None:
    """CPU seconds the RabbitMQ nodes have used so far (summed over a cluster's), None when there is none
    to read. Cumulative: only a difference between two readings means something. On a cluster every
    quorum queue's write is taken by each of its members, so this is where a cluster's extra cost shows."""
    return _summed_over_nodes(pids, lambda process: sum(process.cpu_times()[:2]))  # user + system


def _summed_over_nodes(pids: list[int] | None, read: Callable[[psutil.Process], float]) -> float | None:
    """`read` of every RabbitMQ node this run drives, summed; None when none could be read."""
    total, found = 0.0, False
    for process in rabbit_processes(pids):
        try:
            total += read(process)
        except psutil.Error:
            continue
        found = True
    return total if found else None


def rabbit_breakdown() -> dict[str, float]:
    """RabbitMQ's own memory breakdown in MB (best effort: empty when the CLI is missing or fails)."""
    try:
        output = subprocess.run(
            ["rabbitmq-diagnostics", "-q", "memory_breakdown", "--unit", "mb"],
            capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    breakdown = {}
    for line in output.splitlines():
        name, _, rest = line.partition(":")
        try:
            breakdown[name.strip()] = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
    return breakdown
