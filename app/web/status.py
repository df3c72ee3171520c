"""The operators' status page: `GET /` (HTML) and `GET /status.json` (its numbers).

The numbers come from the same place as `/metrics`: the multiprocess registry
that every worker of the instance writes to (prometheus_client's
MultiProcessCollector), so any worker answers for the whole instance. The page
is self-contained (inline CSS and JS, no CDN): it polls `/status.json` every
2 seconds, keeps the history in the browser, draws the sessions chart itself
and turns counters into rates from one poll to the next. It also looks up one
device (`GET /devices/<device>`: online, where, since when; `#device=<id>` in its
address looks it up at once) and kicks it, asking for the API token to do so.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import Metric

from app import metrics

QUANTILES = (0.5, 0.9, 0.99)
HISTOGRAMS = {
    "event_confirm": "warren_event_confirm_seconds",
    "command_device": "warren_command_device_seconds",
    "command_api": "warren_command_api_seconds",
}


def collect() -> list[Metric]:
    """Every metric family of the instance (all workers in multiprocess mode)."""
    return list(metrics.instance_registry().collect())


def snapshot(families: list[Metric] | None = None) -> dict[str, Any]:
    """The status page's figures: current values, cumulative counters, round-trip percentiles."""
    families = collect() if families is None else families
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in families:
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))

    def total(name: str) -> float:
        return sum(value for _, value in samples.get(name, ()))

    def by(name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for labels, value in samples.get(name, ()):
            out[labels.get(label, "")] += value
        return dict(sorted(out.items()))

    # Every process that imports app.metrics has a sample, gunicorn's master (our parent) too.
    master = str(os.getppid())
    workers = sorted(({"pid": int(labels["pid"]), "sessions": int(value)}
                      for labels, value in samples.get("warren_worker_sessions", ())
                      if labels.get("pid", master) != master),
                     key=lambda worker: worker["pid"])
    broker = by("warren_broker_connected", "link")
    return {
        "time": time.time(),
        "workers": int(total("warren_workers")),
        "sessions": int(total("warren_sessions")),
        "sessions_by_transport": {k: int(v) for k, v in by("warren_sessions", "transport").items()},
        "sessions_by_worker": workers,
        "connections": int(total("warren_connections")),
        "accepted": int(total("warren_sessions_opened_total")),
        "closed": {k: int(v) for k, v in by("warren_sessions_closed_total", "reason").items()},
        "hello_failures": {k: int(v) for k, v in by("warren_hello_failures_total", "code").items()},
        "errors": {k: int(v) for k, v in by("warren_errors_sent_total", "code").items()},
        "events": {k: int(v) for k, v in by("warren_events_total", "outcome").items()},
        "commands": {k: int(v) for k, v in by("warren_commands_total", "outcome").items()},
        "round_trips": {key: _percentiles(samples.get(f"{name}_bucket", ()))
                        for key, name in HISTOGRAMS.items()},
        "broker": {"publisher": int(broker.get("publisher", 0)), "consumer": int(broker.get("consumer", 0)),
                   "blocked": int(total("warren_broker_blocked"))},
        "accept_paused": int(total("warren_accept_paused")),
        "supervisor": {
            "restarts": {k: int(v) for k, v in by("warren_supervisor_restarts_total", "supervisor").items()},
            "crashes": {k: int(v) for k, v in by("warren_crashes_total", "supervisor").items()},
            "gave_up": {k: int(v) for k, v in by("warren_supervisor_gave_up_total", "supervisor").items()},
        },
    }


def _percentiles(buckets: Any) -> dict[str, float | int | None]:
    """Quantiles from cumulative histogram buckets, interpolated as Prometheus' histogram_quantile."""
    counts: dict[float, float] = defaultdict(float)
    for labels, value in buckets:
        counts[float(labels["le"])] += value
    bounds = sorted(counts.items())
    count = bounds[-1][1] if bounds else 0
    out: dict[str, float | int | None] = {"count": int(count)}
    for q in QUANTILES:
        out[f"p{round(q * 100)}"] = _quantile(q, bounds) if count else None
    return out


def _quantile(q: float, bounds: list[tuple[float, float]]) -> float:
    rank = q * bounds[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for upper, cumulative in bounds:
        if cumulative >= rank:
            if math.isinf(upper):
                return lower_bound  # beyond the last finite bucket: its bound is all we know
            if cumulative == lower_count:
                return upper
            return lower_bound + (upper - lower_bound) * (rank - lower_count) / (cumulative - lower_count)
        lower_bound, lower_count = upper, cumulative
    return lower_bound


# The page itself lives beside this module, as HTML: read once, served as is.
PAGE = (Path(__file__).parent / "status.html").read_text(encoding="utf-8")
