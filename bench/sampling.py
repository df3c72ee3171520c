"""CPU and memory of processes, read one way by every benchmark (bench.stampede and the standalone scripts).

CPU is user + system seconds, cumulative: only the difference between two readings means
something. Memory is resident set size (RSS), in bytes; PSS (shared pages split between
the processes that share them) reads smaps, so it is offered for a process tree only and
taken at a few moments. A process's own figures (`cpu_seconds()`, `rss_bytes()`) are what
a benchmark reads of itself, or of a server child it started; `TreeGauge` sums a process
and its descendants (a gunicorn master and its workers, the floor and its forks). A
descendant that died and was waited for (a gunicorn worker killed, then reaped by its
master) keeps counting: its CPU moved to its parent's children's times, which are summed
too, so the tree's CPU never goes back when a process of it ends.
`others_cpu_s` gauges the rest of a shared machine, to say how disturbed a figure is.
"""

from __future__ import annotations

import time

import psutil

MB = 1024 * 1024


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process, this one by default (every thread; not its exited children).

    This process's is `time.process_time()`: the kernel's exact count, cheap enough to read around
    a single call (a TLS handshake)."""
    if pid is None:
        return time.process_time()
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process, this one by default."""
    return psutil.Process(pid).memory_info().rss


def process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


class TreeGauge:
    """Memory and CPU of one process and its descendants."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def sample(self) -> dict[str, float]:
        """RSS (MiB) and user+system CPU seconds of the tree, now (nothing if it is gone)."""
        try:
            tree = process_tree(self.pid)
        except psutil.NoSuchProcess:
            return {}
        rss = cpu = 0.0
        for process in tree:
            try:
                rss += process.memory_info().rss
                cpu += own_and_reaped_cpu_s(process)
            except psutil.Error:
                continue
        return {"rss_mb": rss / MB, "cpu_s": cpu}

    def pids(self) -> set[int]:
        try:
            return {process.pid for process in process_tree(self.pid)}
        except psutil.NoSuchProcess:
            return set()

    def pss_mb(self) -> float | None:
        """Proportional set size of the tree in MiB, or None where the kernel does not offer it."""
        total = 0.0
        try:
            for process in process_tree(self.pid):
                total += process.memory_full_info().pss
        except (psutil.Error, AttributeError):
            return None
        return total / MB


def own_and_reaped_cpu_s(process: psutil.Process) -> float:
    """A process's CPU seconds and those of its children it has waited for (the kernel adds them at the wait)."""
    times = process.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def others_cpu_s(excluded: set[int]) -> float:
    """CPU seconds the machine has been busy (since boot) outside the `excluded` processes.

    Cumulative, so only the difference between two readings means something:
    how much CPU other people's work took from a window. Steal, idle and I/O
    wait are not busy. Children of the excluded processes that exited and were waited for stay
    excluded (a gunicorn worker killed under load is the server's CPU, not others'); children
    not yet waited for are still processes, and still excluded while the tree lists them.
    """
    times = psutil.cpu_times()
    busy = times.user + times.nice + times.system + getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0)
    for pid in excluded:
        try:
            busy -= own_and_reaped_cpu_s(psutil.Process(pid))
        except psutil.Error:
            continue
    return busy

