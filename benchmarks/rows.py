"""A section's rounds → its rows: each row the median of its rounds, ratios and differences
taken within a round (a shared VM's speed drifts between rounds), and the table printing them.
"""

from __future__ import annotations

import statistics
from typing import Any

from .processes import CPU_FIGURES
from .runs import Run


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


def find_row(
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


def table(runs: list[dict[str, Any]]) -> list[str]:
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


def met(met: bool) -> str:
    return "met" if met else "NOT MET"
