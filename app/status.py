"""The operators' status page: `GET /` (HTML) and `GET /status.json` (its numbers).

The numbers come from the same place as `/metrics`: the multiprocess registry
that every worker of the instance writes to (prometheus_client's
MultiProcessCollector), so any worker answers for the whole instance. The page
is self-contained (inline CSS and JS, no CDN): it polls `/status.json` every
2 seconds, keeps the history in the browser, draws the sessions chart itself
and turns counters into rates from one poll to the next.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
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


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Warren status</title>
<style>
  :root { --fg:#1d2433; --muted:#6b7385; --line:#e3e6ec; --accent:#2f6fde; --bad:#c8322e; --ok:#23884a; }
  * { box-sizing: border-box; }
  body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color:var(--fg);
         background:#f6f7f9; }
  header { display:flex; align-items:baseline; gap:16px; padding:14px 24px; background:#1d2433; color:#fff; }
  header h1 { margin:0; font-size:18px; }
  header .muted { color:#aab2c5; }
  main { display:grid; grid-template-columns: repeat(4, 1fr); gap:14px; padding:18px 24px; }
  .card { background:#fff; border:1px solid var(--line); border-radius:8px; padding:12px 14px; }
  .wide { grid-column: span 3; } .full { grid-column: 1 / -1; } .half { grid-column: span 2; }
  .card h2 { margin:0 0 8px; font-size:12px; text-transform:uppercase; letter-spacing:.05em;
             color:var(--muted); font-weight:600; }
  .big { font-size:40px; font-weight:700; font-variant-numeric: tabular-nums; }
  .unit { color:var(--muted); font-size:13px; }
  table { width:100%; border-collapse:collapse; font-variant-numeric: tabular-nums; }
  td, th { padding:3px 6px; border-bottom:1px solid var(--line); text-align:right; }
  td:first-child, th:first-child { text-align:left; }
  th { color:var(--muted); font-weight:600; font-size:12px; }
  .ok { color:var(--ok); font-weight:600; } .bad { color:var(--bad); font-weight:600; }
  svg { width:100%; height:180px; display:block; }
  .empty { color:var(--muted); font-style:italic; }
</style>
</head>
<body>
<header><h1>Warren</h1><span class="muted">gateway status</span>
  <span class="muted" id="updated">waiting for /status.json</span></header>
<main>
  <section class="card">
    <h2>Sessions now</h2>
    <div class="big" id="sessions-now" data-value="">–</div>
    <div class="unit" id="sessions-transport"></div>
    <div class="unit">workers: <span id="workers-now" data-value="">–</span>,
      connections: <span id="connections-now" data-value="">–</span></div>
  </section>
  <section class="card wide">
    <h2>Sessions over the last minutes</h2>
    <svg id="chart" viewBox="0 0 600 180" preserveAspectRatio="none" role="img"
         aria-label="sessions over time"></svg>
  </section>
  <section class="card">
    <h2>Sessions per worker</h2>
    <table id="workers"><thead><tr><th>worker pid</th><th>sessions</th></tr></thead><tbody></tbody></table>
  </section>
  <section class="card">
    <h2>Accepts</h2>
    <div class="big" id="accept-rate" data-value="">–</div><div class="unit">sessions opened / s</div>
    <div class="unit">total: <span id="accepted-total" data-value="">–</span></div>
  </section>
  <section class="card">
    <h2>Errors</h2>
    <div class="big" id="error-rate" data-value="">–</div><div class="unit">error frames / s</div>
    <table id="errors"><tbody></tbody></table>
  </section>
  <section class="card">
    <h2>Broker (RabbitMQ)</h2>
    <table>
      <tr><td>publisher links up</td><td id="broker-publisher" data-value="">–</td></tr>
      <tr><td>consumer links up</td><td id="broker-consumer" data-value="">–</td></tr>
      <tr><td>blocked by RabbitMQ</td><td id="broker-blocked" data-value="">–</td></tr>
      <tr><td>accept paused (full)</td><td id="accept-paused" data-value="">–</td></tr>
    </table>
    <div id="broker-state" class="unit"></div>
  </section>
  <section class="card half">
    <h2>Round trips (since start)</h2>
    <table id="rtt"><thead><tr><th></th><th>count</th><th>p50</th><th>p90</th><th>p99</th></tr></thead>
      <tbody></tbody></table>
  </section>
  <section class="card half">
    <h2>Supervisor restarts and crashes</h2>
    <table id="supervisor"><thead><tr><th>supervisor</th><th>restarts</th><th>crashes</th><th>gave up</th>
      <th>in view</th></tr></thead><tbody></tbody></table>
  </section>
  <section class="card full">
    <h2>Sessions closed, events, commands (totals)</h2>
    <table id="outcomes"><tbody></tbody></table>
  </section>
</main>
<script>
"use strict";
const POLL_MS = 2000, KEEP_MS = 5 * 60 * 1000;
const history = [];           // {t, sessions, accepted, errors}, newest last
let first = null;             // the first snapshot this page saw: "in view" deltas
const $ = (id) => document.getElementById(id);
const sum = (o) => Object.values(o || {}).reduce((a, b) => a + b, 0);
function esc(s) { return String(s).replace(/[&<>"]/g, (c) => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"})[c]); }
function show(id, value, text) { const el = $(id); el.dataset.value = value; el.textContent = text ?? value; }
function ms(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  return seconds < 1 ? (seconds * 1000).toFixed(1) + " ms" : seconds.toFixed(2) + " s";
}
function rows(tbody, list) {
  tbody.innerHTML = list.length ? list.map((r) => "<tr>" + r.map((c) => "<td>" + esc(c) + "</td>").join("") + "</tr>").join("")
    : '<tr><td class="empty" colspan="5">none</td></tr>';
}
function rate(key) {
  if (history.length < 2) return null;
  const a = history[Math.max(0, history.length - 6)], b = history[history.length - 1];
  const dt = (b.t - a.t) / 1000;
  return dt > 0 ? Math.max(0, (b[key] - a[key]) / dt) : null;
}
function chart() {
  const svg = $("chart"), W = 600, H = 180, pad = 22;
  if (!history.length) return;
  const now = history[history.length - 1].t, t0 = now - KEEP_MS;
  const max = Math.max(1, ...history.map((p) => p.sessions));
  const x = (t) => pad + (W - 2 * pad) * (t - t0) / KEEP_MS, y = (v) => H - pad - (H - 2 * pad) * v / max;
  const pts = history.map((p) => x(p.t).toFixed(1) + "," + y(p.sessions).toFixed(1)).join(" ");
  const last = history[history.length - 1];
  let grid = "";
  for (let i = 0; i <= 4; i++) {
    const v = max * i / 4, yy = y(v).toFixed(1);
    grid += `<line x1="${pad}" x2="${W - pad}" y1="${yy}" y2="${yy}" stroke="#e3e6ec"/>` +
            `<text x="2" y="${yy}" font-size="10" fill="#6b7385">${Math.round(v)}</text>`;
  }
  svg.innerHTML = grid +
    `<text x="${pad}" y="${H - 4}" font-size="10" fill="#6b7385">-5 min</text>` +
    `<text x="${W - pad - 20}" y="${H - 4}" font-size="10" fill="#6b7385">now</text>` +
    `<polyline points="${pts}" fill="none" stroke="#2f6fde" stroke-width="2"/>` +
    `<circle cx="${x(last.t)}" cy="${y(last.sessions)}" r="3" fill="#2f6fde"/>`;
}
function render(s) {
  const t = s.time * 1000;  // the server's clock: rates stay right however late a poll runs
  if (!first) first = s;
  history.push({t, sessions: s.sessions, accepted: s.accepted, errors: sum(s.errors)});
  while (history.length && history[0].t < t - KEEP_MS) history.shift();
  show("sessions-now", s.sessions);
  $("sessions-transport").textContent = Object.entries(s.sessions_by_transport).map(([k, v]) => k + ": " + v).join(", ");
  show("workers-now", s.workers); show("connections-now", s.connections);
  rows($("workers").tBodies[0], s.sessions_by_worker.map((w) => [w.pid, w.sessions]));
  const ar = rate("accepted"), er = rate("errors");
  show("accept-rate", ar === null ? "" : ar.toFixed(2), ar === null ? "–" : ar.toFixed(1));
  show("error-rate", er === null ? "" : er.toFixed(2), er === null ? "–" : er.toFixed(1));
  show("accepted-total", s.accepted);
  rows($("errors").tBodies[0], Object.entries(s.errors).map(([k, v]) => [k, v]));
  show("broker-publisher", s.broker.publisher); show("broker-consumer", s.broker.consumer);
  show("broker-blocked", s.broker.blocked); show("accept-paused", s.accept_paused);
  const up = s.workers > 0 && s.broker.publisher >= s.workers && s.broker.consumer >= s.workers && !s.broker.blocked;
  $("broker-state").innerHTML = up ? '<span class="ok">connected</span>' : '<span class="bad">degraded</span>';
  const names = {event_confirm: "event → RabbitMQ confirm", command_device: "command → device reply",
                 command_api: "HTTP command API"};
  rows($("rtt").tBodies[0], Object.entries(s.round_trips).map(([k, r]) => [names[k] || k, r.count, ms(r.p50), ms(r.p90), ms(r.p99)]));
  const sup = s.supervisor, all = new Set([...Object.keys(sup.restarts), ...Object.keys(sup.crashes), ...Object.keys(sup.gave_up)]);
  rows($("supervisor").tBodies[0], [...all].sort().map((n) => {
    const seen = (sup.restarts[n] || 0) + (sup.crashes[n] || 0) - (first.supervisor.restarts[n] || 0) - (first.supervisor.crashes[n] || 0);
    return [n, sup.restarts[n] || 0, sup.crashes[n] || 0, sup.gave_up[n] || 0, "+" + seen];
  }));
  const fmt = (o) => Object.entries(o).map(([k, v]) => k + " " + v).join(", ") || "none";
  rows($("outcomes").tBodies[0], [["sessions closed", fmt(s.closed)], ["hello failures", fmt(s.hello_failures)],
       ["events", fmt(s.events)], ["commands", fmt(s.commands)]]);
  $("updated").textContent = "updated " + new Date(s.time * 1000).toISOString().slice(11, 19) + " UTC";
  chart();
}
async function poll() {
  try {
    const response = await fetch("status.json", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
  } catch (e) {
    $("updated").textContent = "status.json unavailable: " + e.message;
  }
  setTimeout(poll, POLL_MS);
}
poll();
</script>
</body>
</html>
"""
