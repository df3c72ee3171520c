"""What a bans run leaves behind: figures printed for a person, a JSON file and one small PNG.

The PNG is quantized to a palette (PIL) so that bench/results stays small.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import orjson
from PIL import Image


def summary(results: dict[str, Any]) -> str:
    """The targets of issue 20, one paragraph each, from whatever parts ran."""
    figures, lines = results["figures"], [f"bans benchmark: {results['devices']:,} devices; {results['machine_note']}"]
    if reach := figures.get("reach"):
        ms = reach["reach_ms"]
        lines += ["", (f"1. reach: {reach['bans']} bans through instance A's API of devices held on B "
                      f"({reach['ban_concurrency']} at a time), {ms['n']} sessions ended `banned`"),
                  (f"   200 -> device reads banned: p50 {ms['p50']} ms, p90 {ms['p90']} ms, p99 {ms['p99']} ms, "
                  f"max {ms['max']} ms (min {ms['min']}); target p99 <= {reach['target_p99_ms']:g} ms: "
                  f"{'met' if reach['meets_target'] else 'NOT met'}"),
                  (f"   from the PUT sent: p50 {reach['reach_from_put_sent_ms']['p50']} ms, p99 "
                  f"{reach['reach_from_put_sent_ms']['p99']} ms; PUT -> 200: p50 {reach['put_to_200_ms']['p50']} ms, "
                  f"p99 {reach['put_to_200_ms']['p99']} ms"),
                  f"   others' CPU meanwhile {reach['other_cpu_cores']} cores; API answers {reach['api_statuses']}"]
    if force := figures.get("in_force"):
        cpu, memory = force["cpu_us_per_setup"], force["memory"]
        lines += ["", (f"2. in force: {force['bans_in_force']:,} bans (all read: {force['all_read']}), "
                      f"{force['devices']:,} devices not banned, {len(force['rounds'])} ramps alternated"),
                  *(f"   {r['deployment']:>4} round {r['round']}: {r['cpu_us_per_setup']} µs CPU per set-up, "
                    f"{r['sessions_per_s']:,}/s, others' CPU {r['other_cpu_cores']} cores" for r in force["rounds"]),
                  (f"   mean CPU per set-up: none {cpu['none']} µs, bans {cpu['bans']} µs, ratio "
                  f"{force['ratio_bans_to_none']} (target <= {force['target_ratio_max']}: "
                  f"{'met' if force['meets_target'] else 'NOT met'})"),
                  (f"   memory per ban: {memory['bytes_per_ban']} B RSS over the gateway tree "
                  f"({memory['bytes_per_ban_per_worker']} B per worker; idle RSS {memory['rss_mb']} MiB); "
                  f"tracemalloc of one BanList: {memory['tracemalloc_bytes_per_ban_one_banlist']} B per ban")]
    if flap := figures.get("flapping"):
        lines += ["", ("3. flapping: gateway CPU while 1 device in "
                      f"{round(1 / max(results['flap_share'], 1e-9))} reconnects every second")]
        for label in ("off", "on"):
            if one := flap.get(label, {}).get("flapping"):
                lines.append(f"   {label:>3} {one['settings']}: {one['cpu_cores']} cores over {one['seconds']} s "
                             f"(idle {one['idle_cpu_cores']}, above idle {one['cpu_cores_above_idle']}), "
                             f"{one['flappers']} flappers, {one['sessions_started']:,} sessions started, "
                             f"{one['hellos_refused_banned']:,} hellos refused banned, "
                             f"{one['flapping_bans_issued']} flapping bans issued; "
                             f"others' CPU {one['other_cpu_cores']} cores")
        if flap.get("comparison"):
            lines.append(f"   on/off: CPU {flap['comparison']['cpu_cores_on_to_off']}×, "
                         f"above idle {flap['comparison']['above_idle_on_to_off']}×")
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))


def plot(results: dict[str, Any], path: Path) -> None:
    """Reach as a distribution, CPU per set-up by ramp, and gateway CPU over the flapping windows."""
    figures, timelines = results["figures"], results["timelines"]
    figure, (reach_axes, setup_axes, flap_axes) = plt.subplots(3, 1, figsize=(9, 10))
    figure.suptitle(f"bans: {results['devices']:,} devices ({results.get('revision') or 'unknown revision'})")
    if reach := figures.get("reach"):
        samples = sorted(reach["samples_ms"])
        reach_axes.plot(samples, [100 * (i + 1) / len(samples) for i in range(len(samples))], drawstyle="steps-post")
        reach_axes.axvline(reach["target_p99_ms"], color="grey", linestyle=":", label="target (p99)")
        reach_axes.set_xlabel("API 200 -> device reads banned, on the other instance (ms)")
        reach_axes.set_ylabel("bans (%)")
        reach_axes.legend(loc="lower right")
    else:
        reach_axes.text(0.5, 0.5, "reach not measured", ha="center", transform=reach_axes.transAxes)
    if force := figures.get("in_force"):
        rounds = force["rounds"]
        colours = {"none": "tab:blue", "bans": "tab:orange"}
        setup_axes.bar([f"{r['deployment']} {r['round']}" for r in rounds],
                       [r["cpu_us_per_setup"] or 0 for r in rounds], color=[colours[r["deployment"]] for r in rounds])
        setup_axes.set_ylabel("gateway CPU per set-up (µs)")
        setup_axes.set_title(f"{force['bans_in_force']:,} bans in force vs none: ratio {force['ratio_bans_to_none']}")
    else:
        setup_axes.text(0.5, 0.5, "in-force not measured", ha="center", transform=setup_axes.transAxes)
    if flap := figures.get("flapping"):
        for label in ("off", "on"):
            one, timeline = flap.get(label, {}).get("flapping"), timelines.get(f"flap-{label}")
            if not one or not timeline:
                continue
            samples = [e for e in timeline if e.get("cpu_s") is not None]
            busy = [(b["cpu_s"] - a["cpu_s"]) / max(b["t"] - a["t"], 1e-3) for a, b in pairwise(samples)]
            flap_axes.plot([e["t"] - one["flap_start_t"] for e in samples[1:]], busy,
                           label=f"flapping detection {label}: {one['cpu_cores']} cores, "
                                 f"{one['flapping_bans_issued']} bans")
        flap_axes.axvline(0, color="grey", linestyle=":")
        flap_axes.set_xlabel("seconds since the flapping began")
        flap_axes.set_ylabel("gateway CPU (cores)")
        flap_axes.legend(loc="upper right", fontsize="small")
    else:
        flap_axes.text(0.5, 0.5, "flapping not measured", ha="center", transform=flap_axes.transAxes)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=70)
    plt.close(figure)
    Image.open(path).convert("RGB").quantize(colors=32).save(path, optimize=True)
