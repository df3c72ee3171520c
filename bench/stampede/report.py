"""What a run leaves behind: a table on stdout, a JSON file and a PNG plot."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import orjson

from bench.stampede import units


def flatten(figures: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested figures as dotted names -> scalars (lists such as time series are left out)."""
    flat: dict[str, Any] = {}
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and "p50" not in value and all(map(is_number, value.values())):
            flat[name] = ", ".join(f"{k} {v}" for k, v in sorted(value.items())) or "none"
        elif isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif value is not None and not isinstance(value, list):
            flat[name] = value
    return flat


def ratios(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{"RUN/REFERENCE": every numeric figure of RUN divided by REFERENCE's} for each of units.comparisons."""
    flat = {label: flatten(figures) for label, figures in runs.items()}
    result = {}
    for label, reference in units.comparisons(list(runs)):
        base = flat[reference]
        result[f"{label}/{reference}"] = {name: round(value / base[name], 2)
                                          for name, value in flat[label].items()
                                          if is_number(value) and is_number(base.get(name)) and base[name]}
    return result


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def rows(results: dict[str, Any]) -> list[list[str]]:
    """Header, then one row per figure: its value in every run, then the ratios to the floor."""
    runs = results["runs"]
    labels = list(runs)
    flat = {label: flatten(runs[label]) for label in labels}
    names = list(dict.fromkeys(name for label in labels for name in flat[label]))
    ratio_labels = list(results.get("ratios", {}))
    table = [["figure", *labels, *ratio_labels]]
    for name in names:
        row = [name, *(cell(flat[label].get(name)) for label in labels)]
        row += [cell(results["ratios"][label].get(name)) for label in ratio_labels]
        table.append(row)
    return table


def table(results: dict[str, Any]) -> str:
    """A plain-text table for the terminal."""
    lines = rows(results)
    widths = [min(60, max(len(row[i]) for row in lines)) for i in range(len(lines[0]))]
    text = ["  ".join(value[:60].ljust(width) for value, width in zip(row, widths)) for row in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    return (f"scenario: {results['scenario']}\n\n{units.table(results['per_unit'])}\n\n"
            + "\n".join(text))


def markdown(results: dict[str, Any]) -> str:
    """The same table in Markdown, for BENCHMARKS.md."""
    lines = rows(results)
    text = [f"| {' | '.join(lines[0])} |", f"|{'---|' * len(lines[0])}"]
    text += [f"| {' | '.join(row)} |" for row in lines[1:]]
    return "\n".join(text)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) >= 1 or value == 0 else f"{value:.3g}"
    if is_number(value):
        return f"{value:,}"
    return str(value)


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))


def plot(results: dict[str, Any], timelines: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Sessions up, server CPU and command round-trip percentiles over time, for every run."""
    figure, (sessions, cpu, round_trips) = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    for label, timeline in timelines.items():
        sessions.plot([e["t"] for e in timeline], [e["up"] for e in timeline], label=label)
    sessions.set_ylabel("sessions up")
    sessions.set_title(f"stampede: {results['scenario']}, {results['devices']:,} devices")
    sessions.legend(loc="lower right")
    plot_cpu(cpu, timelines, results.get("per_unit", {}))
    for label, figures in results["runs"].items():
        for series in round_trip_series(figures):
            times = [window["t"] for window in series]
            for quantile, style in (("p50", "-"), ("p99", "--"), ("p99_9", ":")):
                round_trips.plot(times, [window[quantile] for window in series], style,
                                 label=f"{label} {quantile.replace('_', '.')}")
    round_trips.set_ylabel("command round trip (ms)")
    round_trips.set_xlabel("seconds since the run started")
    if round_trips.lines:
        round_trips.set_yscale("log")
        round_trips.legend(loc="best")
    else:
        round_trips.text(0.5, 0.5, "no commands in this run", ha="center", transform=round_trips.transAxes)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    plot_recovery(results, path.with_name(f"{path.stem}-recovery.png"))


# A fault scenario's figures -> its two series (part, what it is) and what happened at 0.
RECOVERIES = {
    "node_loss": ((("sampled", "random devices"), ("sweep", "sweep of every device")), "a RabbitMQ node was killed"),
    "worker_kill": ((("other_workers", "the other workers' devices"),
                     ("killed_worker", "the dead worker's devices (random and probes)")),
                    "a gateway worker was SIGKILLed"),
    "mass_reconnect": ((("reconnected", "every device (random, and on its welcome)"), ("sweep", "sweep of every device")),
                       "every device's connection was cut"),
}


def plot_recovery(results: dict[str, Any], path: Path) -> None:
    """A node-loss or worker-kill run: the share of commands answered per half second by when they were
    sent, 0 being the fault."""
    runs = [(label, name, figures[name]) for label, figures in results["runs"].items()
            for name in RECOVERIES if figures.get(name)]
    if not runs:
        return
    figure, axes = plt.subplots(figsize=(9, 4))
    for label, name, fault in runs:
        for (part, what), style in zip(RECOVERIES[name][0], ("-", "--")):
            bins = fault[part].get("answered_share_over_time", [])
            axes.step([b["t"] for b in bins], [100 * b["share"] for b in bins], style, where="post",
                      label=f"{label}: {what}")
    event = RECOVERIES[runs[0][1]][1]
    axes.axvline(0, color="grey", linestyle=":", label=event)
    axes.set_xlabel(f"seconds since {event} (by send time)")
    axes.set_ylabel("commands answered (%)")
    axes.set_title(f"{results['scenario']}: {results['devices']:,} devices held, commands to random devices")
    axes.set_ylim(0, 105)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def plot_cpu(axes: plt.Axes, timelines: dict[str, list[dict[str, Any]]],
             summary: dict[str, dict[str, Any]]) -> None:
    """Server CPU (cores busy) per second, each run's per-unit figures in its legend entry."""
    for label, timeline in timelines.items():
        samples = [e for e in timeline if e.get("cpu_s") is not None]
        busy = [(b["cpu_s"] - a["cpu_s"]) / max(b["t"] - a["t"], 1e-3) for a, b in pairwise(samples)]
        axes.plot([e["t"] for e in samples[1:]], busy, label=f"{label}: {legend(summary.get(label, {}))}")
    axes.set_ylabel("server CPU (cores)")
    if axes.lines:
        axes.legend(loc="upper right", fontsize="small")


def legend(figures: dict[str, Any]) -> str:
    """Per-unit CPU in a few words: set-up, heartbeat, command, event (µs)."""
    names = (("setup_cpu_us", "set-up"), ("heartbeat_cpu_us", "heartbeat"),
             ("command_cpu_us", "command"), ("event_cpu_us", "event"))
    words = [f"{name} {figures[key]:,.0f} µs" for key, name in names if figures.get(key) is not None]
    return ", ".join(words) or "CPU"


def round_trip_series(figures: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """Every non-empty `round_trip_over_time` found in a run's figures."""
    found = []
    for value in figures.values():
        if isinstance(value, dict):
            series = value.get("round_trip_over_time")
            if series:
                found.append(series)
            found += round_trip_series(value)
    return found
