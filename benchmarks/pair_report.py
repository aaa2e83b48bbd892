"""A two-row section's summary and report (benchmarks/pair.py measures the rows): the other
row against the base one, per kind, beside the section's targets."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from .rows import added_latency, combine, find_row, met, round_ratio, table
from .runs import BenchOptions, Run

# The upstream of every two-row section (benchmarks/pair.py).
FULL_MOCK = "full mock (ratelimit-gw mock-upstream)"


def summarise_pair(
    rounds: list[Run],
    fixed: list[Run],
    rates: dict[str, float],
    memory_mib: float,
    opts: BenchOptions,
    *,
    rows: tuple[str, str],
    head: dict[str, Any],
    throughput_floor: float,
    added_p50_ms: float | None = None,
) -> dict[str, Any]:
    """A two-row section's rows and summary (benchmarks/pair.py), ``rows`` = (base, other):
    per kind, other/base throughput (the median of the ratios within a round) and other - base
    latency at the fixed rate, each beside its target if it has one (targets, not gates: a miss
    never fails the run). ``head``: what the section says of its rows, first in the summary."""
    base, other = rows
    ratio_name = f"throughput_{other}_over_{base}"
    groups: dict[tuple[str, str, str, float], list[Run]] = {}
    for r in rounds + fixed:
        # A saturation row is known by its tool, a fixed-rate one by its rate too.
        rate = r.rps if r.tool == "fixed-rate" else 0.0
        groups.setdefault((r.scenario, r.kind, r.tool, rate), []).append(r)
    runs = [combine(group) for group in groups.values()]
    keys = rounds[0].keys
    targets: dict[str, Any] = {"gates": False, ratio_name: throughput_floor}
    if added_p50_ms is not None:
        targets["added_p50_ms"] = added_p50_ms
    targets["fixed_rate_rps"] = opts.target_rate_rps
    summary: dict[str, Any] = head | {
        "gateway_workers": opts.workers,
        "gateway_rss_mib": round(memory_mib, 1),
        "targets": targets,
    }
    for kind in ("plain", "stream"):
        saturated = {row: find_row(runs, row, kind, "wrk") for row in rows}
        ratio = round_ratio(rounds, (other, kind, keys), (base, kind, keys))
        rate = rates[kind]
        latency = added_latency(fixed, kind, rate, other, base=base)
        for row in rows:
            at_rate = find_row(runs, row, kind, "fixed-rate", rps=rate)
            latency[f"{row}_p50_ms"] = at_rate.p50_ms
            latency[f"{row}_p99_ms"] = at_rate.p99_ms
            if "server_cpu_us" in at_rate.extra:
                latency[f"{row}_cores_busy"] = round(
                    at_rate.rps * at_rate.extra["server_cpu_us"] / 1e6, 2
                )
        cpu: dict[str, float | None] = {}
        for name, figure in (("", "server_cpu_us"), ("_redis", "redis_cpu_us")):
            for row in rows:
                cpu[f"{row}{name}"] = saturated[row].extra.get(figure)
        for row in rows:
            cpu[f"{row}_upstream"] = saturated[row].extra.get("upstream_cpu_us")
        base_cpu, other_cpu = cpu[base], cpu[other]
        if base_cpu is not None and other_cpu is not None:
            cpu[f"{other}_minus_{base}"] = round(other_cpu - base_cpu, 1)
        summary[kind] = {
            f"{base}_rps": saturated[base].rps,
            f"{other}_rps": saturated[other].rps,
            ratio_name: ratio,
            "throughput_target_met": ratio >= throughput_floor,
            "fixed_rate": latency | {"at_target_rate": rate == opts.target_rate_rps},
        }
        if added_p50_ms is not None:
            summary[kind]["added_p50_target_met"] = latency["added_p50_ms"] <= added_p50_ms
        summary[kind]["cpu_us_per_request"] = cpu
    return {
        "runs": [asdict(r) for r in runs],
        "rounds": [asdict(r) for r in rounds + fixed],
        "summary": summary,
    }


def render_pair(section: dict[str, Any], name: str, rows: tuple[str, str], headline: str) -> str:
    """A two-row section (benchmarks/pair.py): its table, targets, and per kind the other
    row against the base one."""
    base, other = rows
    ratio_name = f"throughput_{other}_over_{base}"
    s = section["summary"]
    t = s["targets"]
    if "added_p50_ms" in t:
        added = f"{other} adds p50 <= {t['added_p50_ms']:g} ms over {base}"
    else:
        added = f"the p50 {other} adds over {base} reported (no target)"
    lines = [
        headline,
        *table(section["runs"]),
        f"{name} targets (not gates): {other}/{base} throughput >= {t[ratio_name]:.2f} in the "
        f"same run; {added} at the fixed rate ({t['fixed_rate_rps']:g} req/s, or half of the "
        f"slower row's saturation if lower)",
    ]
    for kind in ("plain", "stream"):
        k = s[kind]
        f = k["fixed_rate"]
        what = "latency" if kind == "plain" else "time to first byte"
        rate = f"{f['rps']:g} req/s" + ("" if f["at_target_rate"] else " (half saturation)")
        p50_target = ""
        if "added_p50_target_met" in k:
            p50_target = f" (target <= {t['added_p50_ms']:g} ms: {met(k['added_p50_target_met'])})"
        lines.append(
            f"{kind}: {other}/{base} throughput {k[ratio_name]:.2f} "
            f"({k[f'{other}_rps']:.0f} vs {k[f'{base}_rps']:.0f} req/s; target >= "
            f"{t[ratio_name]:.2f}: {met(k['throughput_target_met'])}); "
            f"at {rate} {other} adds {what} p50 {f['added_p50_ms']:+.3f} ms{p50_target}, p99 "
            f"{f['added_p99_ms']:+.3f} ms ({f['added_p99_min_ms']:+.3f} to "
            f"{f['added_p99_max_ms']:+.3f}); gateway cores busy {base} "
            f"{f.get(f'{base}_cores_busy', math.nan):.2f}, {other} "
            f"{f.get(f'{other}_cores_busy', math.nan):.2f}"
        )
        cpu = k["cpu_us_per_request"]
        lines.append(
            f"{kind}: on-CPU us per request under wrk, {base} / {other}: gateway "
            f"{cpu[base]} / {cpu[other]} "
            f"({cpu.get(f'{other}_minus_{base}', math.nan):+.1f}), Redis {cpu[f'{base}_redis']} / "
            f"{cpu[f'{other}_redis']}, mock {cpu[f'{base}_upstream']} / {cpu[f'{other}_upstream']}"
        )
    workers = s["gateway_workers"]
    per = "" if workers == 1 else f" (the largest of {workers} workers)"
    lines.append(f"{name} gateway worker RSS after the run: {s['gateway_rss_mib']} MiB{per}")
    return "\n".join(lines)
