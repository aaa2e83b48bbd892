"""The core section's summary (its targets included), what the converter and pools sections say
of their rows, and the printed report of every section (the archive's from archive.py)."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from .archive import render_archive
from .pair_report import FULL_MOCK, render_pair, summarise_pair
from .rows import added_latency, combine, find_row, round_ratio, table
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
            name: find_row(runs, name, kind, "wrk", 10).extra
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
            row = find_row(
                runs, "c_full_checks", kind, "fixed-rate", rps=summary[kind][label]["rps"]
            )
            if "server_cpu_us" in row.extra:
                summary[kind][label]["c_cores_busy"] = round(
                    row.rps * row.extra["server_cpu_us"] / 1e6, 2
                )
        target = summary[kind]["target"]
        target["met"] = (
            target["added_p50_ms"] <= TARGET_ADDED_P50_MS
            and target["added_p99_ms"] <= TARGET_ADDED_P99_MS
        )
    few = find_row(runs, "c_full_checks", "plain", "wrk", 10)
    many = find_row(runs, "c_full_checks", "plain", "wrk", opts.many_keys)
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
    if "archive" in result:
        parts.append(render_archive(result["archive"]))
    return "\n\n".join(parts)


def _render_core(result: dict[str, Any]) -> str:
    lines = table(result["runs"])
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


def _render_converter(section: dict[str, Any]) -> str:
    s = section["summary"]
    native, converted = s["models"]["native"], s["models"]["converted"]
    headline = (
        f"converter: an OpenAI caller on POST {s['route']}, the same body to native = "
        f"{native['model']} ({native['protocol']} protocol, relayed as is) and converted = "
        f"{converted['model']} ({converted['protocol']} protocol, translated both ways); "
        f"full checks on Redis, upstream the {s['upstream']}"
    )
    return render_pair(section, "converter", CONVERTER_ROWS, headline)


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
        f"(set never to be reached: every pick finds room); full checks on Redis, upstream the "
        f"{s['upstream']}"
    )
    return render_pair(section, "pools", POOLS_ROWS, headline)
