"""The benchmark's rounds → its rows, summary (targets included) and printed table."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict
from typing import Any

from .processes import CPU_FIGURES
from .runs import (
    CONVERTER_ADDED_P50_MS,
    CONVERTER_ROWS,
    CONVERTER_THROUGHPUT_FLOOR,
    POOLS_ROWS,
    TARGET_ADDED_P50_MS,
    TARGET_ADDED_P99_MS,
    THROUGHPUT_FLOOR_C_OVER_B,
    BenchOptions,
    Run,
)


def is_row(run: Run, scenario: str, kind: str, keys: int) -> bool:
    return (run.scenario, run.kind, run.keys) == (scenario, kind, keys)


def combine(runs: list[Run]) -> Run:
    """One row for a scenario's rounds: the median of each figure. Its ``extra`` holds the
    range of what varies: req/s for a saturation row; p99 for a fixed-rate row (whose rate
    is set), with the worst of the generator's own figures (they show it kept up)."""
    first = runs[0]
    extra: dict[str, float] = {"rounds": len(runs)}
    if first.tool == "wrk":
        extra.update(rps_min=min(r.rps for r in runs), rps_max=max(r.rps for r in runs))
    else:
        extra.update(
            p99_min_ms=min(r.p99_ms for r in runs),
            p99_max_ms=max(r.p99_ms for r in runs),
        )
        generator = [k for k in first.extra if k != "round" and k not in CPU_FIGURES]
        extra.update({k: max(r.extra[k] for r in runs) for k in generator})
    for k in CPU_FIGURES:
        if all(k in r.extra for r in runs):
            extra[k] = round(statistics.median([r.extra[k] for r in runs]), 1)
    return Run(
        scenario=first.scenario,
        kind=first.kind,
        tool=first.tool,
        requests=sum(r.requests for r in runs),
        rps=round(statistics.median([r.rps for r in runs]), 1),
        p50_ms=round(statistics.median([r.p50_ms for r in runs]), 3),
        p90_ms=round(statistics.median([r.p90_ms for r in runs]), 3),
        p99_ms=round(statistics.median([r.p99_ms for r in runs]), 3),
        errors=sum(r.errors for r in runs),
        keys=first.keys,
        extra=extra,
    )


def added_latency(
    fixed: list[Run],
    kind: str,
    rate: float,
    scenario: str = "c_full_checks",
    base: str = "a_mock",
) -> dict[str, float]:
    """``scenario`` - ``base`` (by default (c) - (a)) at one rate, p50 and p99: the median
    over rounds of each round's difference (measured seconds apart), and the p99
    difference's range."""
    at_rate = [r for r in fixed if r.kind == kind and r.rps == rate]
    p50, p99 = [], []
    for index in sorted({r.extra["round"] for r in at_rate}):
        same = {r.scenario: r for r in at_rate if r.extra["round"] == index}
        a, other = same[base], same[scenario]
        p50.append(other.p50_ms - a.p50_ms)
        p99.append(other.p99_ms - a.p99_ms)
    return {
        "rps": at_rate[0].rps,
        "added_p50_ms": round(statistics.median(p50), 3),
        "added_p99_ms": round(statistics.median(p99), 3),
        "added_p99_min_ms": round(min(p99), 3),
        "added_p99_max_ms": round(max(p99), 3),
    }


def round_ratio(
    rounds: list[Run], top: tuple[str, str, int], bottom: tuple[str, str, int]
) -> float:
    """The median over rounds of one scenario's req/s over another's, from the same round."""
    ratios = []
    for index in sorted({r.extra["round"] for r in rounds}):
        same = [r for r in rounds if r.extra["round"] == index]
        upper = next(r for r in same if is_row(r, *top))
        lower = next(r for r in same if is_row(r, *bottom))
        ratios.append(upper.rps / lower.rps)
    return round(statistics.median(ratios), 3)


def _find(
    runs: list[Run],
    scenario: str,
    kind: str,
    tool: str,
    keys: int | None = None,
    rps: float | None = None,
) -> Run:
    return next(
        r
        for r in runs
        if (r.scenario, r.kind, r.tool) == (scenario, kind, tool)
        and (keys is None or r.keys == keys)
        and (rps is None or r.rps == rps)
    )


def summarise(
    rounds: list[Run],
    fixed: list[Run],
    rates: dict[str, dict[str, float]],
    memory_mib: float,
    opts: BenchOptions,
) -> dict[str, Any]:
    """Rows from rounds, and the summary. ``rates``: each kind's fixed rates by label
    (``target``, ``half_saturation``, ``idle``); only the target's row is judged."""
    groups: dict[tuple[str, str, int], list[Run]] = {}
    for r in rounds:
        groups.setdefault((r.scenario, r.kind, r.keys), []).append(r)
    fixed_groups: dict[tuple[str, str, float], list[Run]] = {}
    for r in fixed:
        fixed_groups.setdefault((r.scenario, r.kind, r.rps), []).append(r)
    runs = [combine(group) for group in [*groups.values(), *fixed_groups.values()]]
    summary: dict[str, Any] = {
        "gateway_workers": opts.workers,
        "gateway_rss_mib": round(memory_mib, 1),
        "targets": {
            "fixed_rate_rps": opts.target_rate_rps,
            "added_p50_ms": TARGET_ADDED_P50_MS,
            "added_p99_ms": TARGET_ADDED_P99_MS,
            "throughput_c_over_b": THROUGHPUT_FLOOR_C_OVER_B,
        },
    }
    for kind in ("plain", "stream"):
        a, b, c = (("a_mock", kind, 10), ("b_passthrough", kind, 10), ("c_full_checks", kind, 10))
        summary[kind] = {
            "throughput_c_over_a": round_ratio(rounds, c, a),
            "throughput_c_over_b": round_ratio(rounds, c, b),
        }
        summary[kind]["throughput_floor_met"] = (
            summary[kind]["throughput_c_over_b"] >= THROUGHPUT_FLOOR_C_OVER_B
        )
        # On-CPU microseconds per request at saturation: each server's own, and Redis's
        # for (c).
        saturated = {
            name: _find(runs, name, kind, "wrk", 10).extra
            for name in ("a_mock", "b_passthrough", "c_full_checks")
        }
        summary[kind]["cpu_us_per_request"] = {
            **{name: extra.get("server_cpu_us") for name, extra in saturated.items()},
            "c_redis": saturated["c_full_checks"].get("redis_cpu_us"),
        }
        for label, rate in rates[kind].items():
            summary[kind][label] = added_latency(fixed, kind, rate)
            relay = added_latency(fixed, kind, rate, "b_passthrough")
            summary[kind][label] |= {
                "passthrough_added_p50_ms": relay["added_p50_ms"],
                "passthrough_added_p99_ms": relay["added_p99_ms"],
            }
            # How busy (c) was at that rate, in cores: a request costs more CPU when requests
            # come one by one than in wrk's back-to-back stream, so half of wrk's saturation
            # is more than half of a core, and queueing (the p99) grows with this, not with
            # the rate.
            row = _find(runs, "c_full_checks", kind, "fixed-rate", rps=summary[kind][label]["rps"])
            if "server_cpu_us" in row.extra:
                summary[kind][label]["c_cores_busy"] = round(
                    row.rps * row.extra["server_cpu_us"] / 1e6, 2
                )
        target = summary[kind]["target"]
        target["met"] = (
            target["added_p50_ms"] <= TARGET_ADDED_P50_MS
            and target["added_p99_ms"] <= TARGET_ADDED_P99_MS
        )
    few = _find(runs, "c_full_checks", "plain", "wrk", 10)
    many = _find(runs, "c_full_checks", "plain", "wrk", opts.many_keys)
    summary["keys_scaling"] = {
        "keys_10_rps": few.rps,
        f"keys_{opts.many_keys}_rps": many.rps,
        "ratio": round_ratio(
            rounds, ("c_full_checks", "plain", opts.many_keys), ("c_full_checks", "plain", 10)
        ),
    }
    return {
        "runs": [asdict(r) for r in runs],
        "rounds": [asdict(r) for r in rounds + fixed],
        "summary": summary,
    }


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
        saturated = {row: _find(runs, row, kind, "wrk") for row in rows}
        ratio = round_ratio(rounds, (other, kind, keys), (base, kind, keys))
        rate = rates[kind]
        latency = added_latency(fixed, kind, rate, other, base=base)
        for row in rows:
            at_rate = _find(runs, row, kind, "fixed-rate", rps=rate)
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


def summarise_converter(
    rounds: list[Run],
    fixed: list[Run],
    rates: dict[str, float],
    memory_mib: float,
    opts: BenchOptions,
    *,
    route: str,
    models: dict[str, tuple[str, str]],
) -> dict[str, Any]:
    """The converter section's rows and summary: converted/native throughput and the p50
    converted adds, beside their targets."""
    head = {
        "route": route,
        "models": {s: {"model": m, "protocol": p} for s, (m, p) in models.items()},
        "upstream": FULL_MOCK,
    }
    return summarise_pair(
        rounds,
        fixed,
        rates,
        memory_mib,
        opts,
        rows=CONVERTER_ROWS,
        head=head,
        throughput_floor=CONVERTER_THROUGHPUT_FLOOR,
        added_p50_ms=CONVERTER_ADDED_P50_MS,
    )


def _added(figures: dict[str, float]) -> str:
    """One rate's added latency, the pass-through's share of it, and how busy (c) was."""
    return (
        f"at {figures['rps']:g} req/s p50 {figures['added_p50_ms']:+.3f} ms, "
        f"p99 {figures['added_p99_ms']:+.3f} ms "
        f"({figures['added_p99_min_ms']:+.3f} to {figures['added_p99_max_ms']:+.3f}), "
        f"of which the pass-through alone p50 {figures['passthrough_added_p50_ms']:+.3f}, "
        f"p99 {figures['passthrough_added_p99_ms']:+.3f}, (c) using "
        f"{figures.get('c_cores_busy', math.nan):.2f} cores"
    )


def render(result: dict[str, Any]) -> str:
    """The sections the run measured, each as a table and its summary lines."""
    parts = []
    if "summary" in result:
        parts.append(_render_core(result))
    if "converter" in result:
        parts.append(_render_converter(result["converter"]))
    if "pools" in result:
        parts.append(_render_pools(result["pools"]))
    return "\n\n".join(parts)


def _table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"{'scenario':<15} {'kind':<7} {'tool':<11} {'keys':>7} {'req/s':>9} "
        f"{'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>6}  range over rounds",
    ]
    for r in runs:
        spread = ""
        if "rps_min" in r["extra"]:
            spread = f"  {r['extra']['rps_min']:.0f}-{r['extra']['rps_max']:.0f}"
        elif "p99_min_ms" in r["extra"]:
            spread = f"  p99 {r['extra']['p99_min_ms']:.3f}-{r['extra']['p99_max_ms']:.3f}"
        lines.append(
            f"{r['scenario']:<15} {r['kind']:<7} {r['tool']:<11} {r['keys']:>7} {r['rps']:>9.1f} "
            f"{r['p50_ms']:>8.3f} {r['p90_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['errors']:>6}{spread}"
        )
    return lines


def _render_core(result: dict[str, Any]) -> str:
    lines = _table(result["runs"])
    s = result["summary"]
    t = s["targets"]
    lines.append(
        f"targets: at a fixed {t['fixed_rate_rps']:g} req/s, full checks add p50 <= "
        f"{t['added_p50_ms']:g} ms and p99 <= {t['added_p99_ms']:g} ms over the mock direct "
        f"(plain latency, streaming time to first byte); throughput (c)/(b) >= "
        f"{t['throughput_c_over_b']:.2f} in the same run"
    )
    for kind in ("plain", "stream"):
        k = s[kind]
        what = "latency" if kind == "plain" else "time to first byte"
        lines.append(
            f"{kind}: target: added {what} {_added(k['target'])}: "
            f"{'met' if k['target']['met'] else 'NOT MET'}"
        )
        floor = "met" if k["throughput_floor_met"] else "NOT MET"
        information = "; ".join(f"{_added(k[label])}" for label in ("half_saturation", "idle"))
        lines.append(
            f"{kind}: throughput (c)/(a) {k['throughput_c_over_a']:.2f}, (c)/(b) "
            f"{k['throughput_c_over_b']:.2f} (floor {t['throughput_c_over_b']:.2f}: {floor}); "
            f"information, added {what} at half of (c)'s saturation and unloaded: {information}"
        )
        cpu = k["cpu_us_per_request"]
        lines.append(
            f"{kind}: on-CPU us per request under wrk: mock {cpu['a_mock']}, pass-through "
            f"{cpu['b_passthrough']}, full checks {cpu['c_full_checks']} + Redis {cpu['c_redis']}"
        )
    ks = s["keys_scaling"]
    lines.append(f"keys: {' vs '.join(f'{k} {v}' for k, v in ks.items())}")
    workers = s["gateway_workers"]
    per = "" if workers == 1 else f" (the largest of {workers} workers)"
    lines.append(f"gateway worker RSS after the run: {s['gateway_rss_mib']} MiB{per}")
    return "\n".join(lines)


def _met(met: bool) -> str:
    return "met" if met else "NOT MET"


def _render_converter(section: dict[str, Any]) -> str:
    s = section["summary"]
    native, converted = s["models"]["native"], s["models"]["converted"]
    headline = (
        f"converter: an OpenAI caller on POST {s['route']}, the same body to native = "
        f"{native['model']} ({native['protocol']} protocol, relayed as is) and converted = "
        f"{converted['model']} ({converted['protocol']} protocol, translated both ways); "
        f"full checks on Redis, upstream the {s['upstream']}"
    )
    return _render_pair(section, "converter", CONVERTER_ROWS, headline)


def _render_pools(section: dict[str, Any]) -> str:
    s = section["summary"]
    rows = [
        f"{row} = {m['model']} (provider {m['provider']}: {m['keys']} upstream "
        f"key{'' if m['keys'] == 1 else 's'})"
        for row, m in s["models"].items()
    ]
    ceilings = s["key_ceilings"]
    headline = (
        f"pools: an OpenAI caller on POST {s['route']}, the same body to {' and '.join(rows)}, "
        f"every key with its own ceilings rpm {ceilings['rpm']:,}, tpm {ceilings['tpm']:,} "
        f"(never reached: the pick runs, never refuses); full checks on Redis, upstream the "
        f"{s['upstream']}"
    )
    return _render_pair(section, "pools", POOLS_ROWS, headline)


def _render_pair(section: dict[str, Any], name: str, rows: tuple[str, str], headline: str) -> str:
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
        *_table(section["runs"]),
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
            p50_target = f" (target <= {t['added_p50_ms']:g} ms: {_met(k['added_p50_target_met'])})"
        lines.append(
            f"{kind}: {other}/{base} throughput {k[ratio_name]:.2f} "
            f"({k[f'{other}_rps']:.0f} vs {k[f'{base}_rps']:.0f} req/s; target >= "
            f"{t[ratio_name]:.2f}: {_met(k['throughput_target_met'])}); "
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
