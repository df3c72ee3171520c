"""What a run leaves: the table on stdout, a Markdown page, a PNG plot (quantized, small) and the JSON.

The full output (JSON with every timeline, the page, the plot, the servers' logs) goes to --out;
`--publish NAME` also puts the page and the plot (small files) under bench/results/.
"""

from __future__ import annotations

import io
from itertools import pairwise
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import orjson
from PIL import Image

from bench.mqtt_peers.figures import ROWS, ratio, standing, verdict
from bench.mqtt_peers.servers import LABELS

PLOT_COLOURS = 32


def rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Header, then one row per figure some server has: its value on each, Warren ÷ RabbitMQ, the verdict."""
    keys = [key for key in LABELS if key in results]
    compare = "warren" in results and "rabbitmq" in results
    table = [["figure", *(LABELS[key] for key in keys), *(["Warren/RabbitMQ", "Warren vs RabbitMQ"] if compare else [])]]
    for row in ROWS:
        values = {key: row.read(results[key]) for key in keys}
        if all(value is None for value in values.values()):
            continue
        line = [row.label, *("-" if values[key] is None else row.fmt.format(values[key]) for key in keys)]
        if compare:
            quotient = ratio(values["warren"], values["rabbitmq"]) if row.better else None
            line += ["-" if quotient is None else f"{quotient:.2f}",
                     verdict(row.better, values["warren"], values["rabbitmq"]) or "-"]
        table.append(line)
    return table


def text_table(results: dict[str, dict[str, Any]]) -> str:
    lines = rows(results)
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    text = ["  ".join(value.ljust(width) if i == 0 else value.rjust(width) for i, (value, width)
                      in enumerate(zip(row, widths))) for row in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(text)


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    lines = rows(results)
    return "\n".join([f"| {' | '.join(lines[0])} |", f"|{' --- |' * len(lines[0])}",
                      *(f"| {' | '.join(row)} |" for row in lines[1:])])


def summary(results: dict[str, dict[str, Any]]) -> str:
    """Where Warren stands against RabbitMQ's MQTT plugin, in two sentences (or why it cannot be said)."""
    if "warren" not in results or "rabbitmq" not in results:
        return "Warren and RabbitMQ MQTT were not both measured: no comparison."
    lines = []
    for view, words in (("alone", "Warren's gunicorn alone"), ("with_broker", "Warren with its RabbitMQ")):
        found = standing(ROWS, results["warren"], results["rabbitmq"], view)
        compared = sum(len(found[key]) for key in ("ahead", "even", "behind"))
        behind = "; ".join(found["behind"]) or "nothing"
        lines.append(f"- {words}: ahead of RabbitMQ MQTT on {len(found['ahead'])} of {compared} figures, "
                     f"even on {len(found['even'])}, behind on {len(found['behind'])} ({behind})"
                     + (f"; not compared (missing): {'; '.join(found['not compared'])}" if found["not compared"] else ""))
    return "\n".join(lines)


def page(results: dict[str, dict[str, Any]], settings: dict[str, Any], plot_name: str) -> str:
    """The Markdown page: what ran, how Warren stands, the table, the plot, the caveats."""
    servers = "\n".join(f"- {LABELS[key]}: {figures.get('version', '?')} at {figures.get('url', '?')}"
                        + (f" (**failed: {figures['error']}**)" if "error" in figures else "")
                        for key, figures in results.items())
    return f"""# Warren next to RabbitMQ's MQTT plugin and Mosquitto

`{settings['command']}`

{settings['devices']:,} MQTT 3.1.1 devices (keep alive {settings['heartbeat']:g} s) from {settings['processes']}
load processes, QoS 1 events at {settings['event_rate']:g}/s and commands at {settings['command_rate']:g}/s for
{settings['duration']:g} s each, keep-alive window {settings['quiet']:g} s. Machine: {settings['machine']}.

{servers}

{summary(results)}

{markdown_table(results)}

![timelines and latencies]({plot_name})

How to read it: "server alone" is the server's own process tree (Warren: the gunicorn master and its
workers); "with its broker" adds, for Warren only, what the RabbitMQ it publishes through spent meanwhile
(the machine's broker, shared: others' work on it counts too), since the peers do a broker's whole
work in their one process. CPU per event and per command is above the keep-alive rate. Warren
authenticates each device's token; the peers' devices connect as guest/guest (RabbitMQ checks it,
Mosquitto allows anonymous clients). Warren's PUBACK waits for RabbitMQ's publisher confirm;
RabbitMQ MQTT's for its own queue's confirm; Mosquitto's is at once. Nagle is off on the backend's
connection (as py-amqp has it for Warren's) and in Mosquitto (`set_tcp_nodelay true`, as RabbitMQ's
MQTT listener has it by default); on Warren's device sockets too (gunicorn sets TCP_NODELAY on its
listeners, and accepted sockets inherit it). The keep-alive round with its broker counts all
Warren's RabbitMQ spent while only PINGREQs flowed (its queues' own background included). Topics: Warren's devices use
`events/<name>` and `commands/#`, the peers' `devices/<id>/events/<name>` and `devices/<id>/commands/#`;
one backend consumer takes every event and every reply on each server. The noise rows are the
machine's CPU outside the server, its broker and this tool: a figure taken while others were busy is
suspect.
"""


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Sessions up and server CPU over each server's run, and the latency percentiles side by side;
    saved with PLOT_COLOURS colours (the results folder has a size budget)."""
    figure, (sessions, cpu, latency) = plt.subplots(3, 1, figsize=(9, 9))
    for key, figures in results.items():
        timeline = figures.get("timeline") or []
        times = [entry["t"] for entry in timeline]
        sessions.plot(times, [entry["up"] for entry in timeline], label=LABELS[key])
        for gauge, style, label in (("cpu_s", "-", LABELS[key]), ("broker_cpu_s", "--", "Warren's RabbitMQ")):
            samples = [entry for entry in timeline if entry.get(gauge) is not None]
            if samples:
                cpu.plot([entry["t"] for entry in samples[1:]], busy(samples, gauge), style, label=label,
                         color=sessions.lines[-1].get_color())
    sessions.set_ylabel("sessions up")
    sessions.set_title("each server's run: ramp, keep-alive, events, commands, mass drop")
    sessions.legend(loc="lower left")
    cpu.set_ylabel("server CPU (cores)")
    cpu.set_xlabel("seconds since the server's load started")
    cpu.legend(loc="upper right")
    latency_bars(latency, results)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=72)
    plt.close(figure)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.open(buffer).convert("RGB").quantize(colors=PLOT_COLOURS).save(path, optimize=True)


def busy(samples: list[dict[str, Any]], gauge: str) -> list[float]:
    """Cores busy between consecutive samples of a cumulative CPU gauge."""
    return [(b[gauge] - a[gauge]) / max(b["t"] - a["t"], 1e-3) for a, b in pairwise(samples)]


LATENCIES = (("event PUBACK", ("events", "ack_ms")), ("command -> device", ("commands", "delivery_ms")),
             ("command round trip", ("commands", "round_trip_ms")))


def latency_bars(axes: plt.Axes, results: dict[str, dict[str, Any]]) -> None:
    """p50 (solid) and p99 (hatched) of each latency, one bar group per latency, one colour per server."""
    width = 0.8 / max(1, len(results))
    for index, (key, figures) in enumerate(results.items()):
        for group, (_, path) in enumerate(LATENCIES):
            spread = (figures.get(path[0]) or {}).get(path[1]) or {}
            x = group + index * width
            for quantile, hatch in (("p99", "//"), ("p50", None)):
                if spread.get(quantile) is not None:
                    axes.bar(x, spread[quantile], width, color=f"C{index}", hatch=hatch,
                             alpha=0.5 if hatch else 1.0, label=LABELS[key] if quantile == "p50" and group == 0 else None)
    axes.set_xticks([group + 0.4 - width / 2 for group in range(len(LATENCIES))], [name for name, _ in LATENCIES])
    axes.set_ylabel("ms (p50 solid, p99 hatched)")
    axes.set_yscale("log")
    if axes.patches:
        axes.legend(loc="upper left")


def write(results: dict[str, dict[str, Any]], settings: dict[str, Any], out: Path, name: str,
          publish: Path | None) -> list[Path]:
    """The JSON, page and plot as out/NAME.*, and the page and plot under `publish` too; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"]
    written[0].write_bytes(orjson.dumps({"settings": settings, "servers": results}, option=orjson.OPT_INDENT_2))
    written[1].write_text(page(results, settings, f"{name}.png"))
    plot(results, written[2])
    if publish is not None:
        publish.parent.mkdir(parents=True, exist_ok=True)
        written.append(publish.with_suffix(".md"))
        written[-1].write_text(page(results, settings, f"{publish.stem}.png"))
        written.append(publish.with_suffix(".png"))
        written[-1].write_bytes(written[2].read_bytes())
    return written
