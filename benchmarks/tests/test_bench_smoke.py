"""The benchmark runs end to end and reports every row it promises (numbers not judged)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import build_parser

ROOT = Path(__file__).resolve().parents[2]


def _added_over_two_rounds(
    by_round: dict[int, dict[str, dict[str, float]]], scenario: str, percentile: str
) -> float:
    """What ``scenario`` adds to (a) at one percentile: the median of two rounds' differences."""
    diffs = [x[scenario][percentile] - x["a_mock"][percentile] for x in by_round.values()]
    return round(sum(diffs) / 2, 3)


@pytest.mark.slow  # runs the whole benchmark as a subprocess (~90 s)
def test_bench_reports_every_scenario_side_by_side(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--duration",
            "1",
            "--rounds",
            "2",
            "--connections",
            "8",
            "--keys",
            "200",
            "--fixed-rate-duration",
            "1",
            # The converter section has a smoke test of its own (test_bench_converter.py):
            # both in one run would pass the test timeout.
            "--only",
            "core",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(output.read_text())
    assert result["options"]["upstream"] == "lean"  # the benchmark's own mock by default
    assert "converter" not in result and result["options"]["sections"] == "core"
    rows = {(r["scenario"], r["kind"], r["tool"], r["keys"]) for r in result["runs"]}
    for kind in ("plain", "stream"):
        for scenario in ("a_mock", "b_passthrough", "c_full_checks"):
            assert (scenario, kind, "wrk", 10) in rows
        for scenario in ("a_mock", "b_passthrough", "c_full_checks"):
            assert (scenario, kind, "fixed-rate", 10) in rows
    assert ("c_full_checks", "plain", "wrk", 200) in rows
    # Each round measured (a), (b), (c) and the many-keys run back to back; a row is the
    # median of its rounds.
    wrk_rounds = [r for r in result["rounds"] if r["tool"] == "wrk"]
    per_round = [(r["scenario"], r["kind"], r["keys"]) for r in wrk_rounds]
    assert sorted({r["extra"]["round"] for r in wrk_rounds}) == [0, 1]
    assert len(per_round) == 2 * 7 and len(set(per_round)) == 7
    # The fixed-rate runs take rounds too: (a), (b) and (c) at three rates per kind (the
    # target's, half of saturation, unloaded), twice each.
    fixed_rounds = [r for r in result["rounds"] if r["tool"] == "fixed-rate"]
    assert len(fixed_rounds) == 3 * 3 * 2 * 2
    assert sorted({r["extra"]["round"] for r in fixed_rounds}) == [0, 1]
    wrk_rows = [r for r in result["runs"] if r["tool"] == "wrk"]
    assert all(r["extra"]["rounds"] == 2 for r in wrk_rows)
    assert all(r["extra"]["rps_min"] <= r["rps"] <= r["extra"]["rps_max"] for r in wrk_rows)
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in result["runs"])
    # The fixed-rate runs use the C generator (a compiler is part of the test setup), which
    # keeps its schedule: the Python fallback would eat the core the gateway needs.
    fixed = [r for r in result["runs"] if r["tool"] == "fixed-rate"]
    assert len(fixed) == 18 and all(r["extra"]["rounds"] == 2 for r in fixed)
    assert all(r["extra"]["p99_min_ms"] <= r["p99_ms"] <= r["extra"]["p99_max_ms"] for r in fixed)
    assert all("generator_cpu_share" in r["extra"] for r in fixed)
    # Its lateness is reported for the reader to judge (a figure, not a gate: a loaded
    # machine makes any generator late, and speed is judged by `make bench`, not by tests).
    assert all(r["extra"]["generator_lateness_p99_ms"] >= 0 for r in fixed)
    # Streams are measured at half of their own saturation, not of plain requests'.
    stream_rates = {r["rps"] for r in fixed if r["kind"] == "stream"}
    plain_rates = {r["rps"] for r in fixed if r["kind"] == "plain"}
    assert stream_rates != plain_rates
    summary = result["summary"]
    assert set(summary) == {
        "gateway_workers",
        "gateway_rss_mib",
        "targets",
        "plain",
        "stream",
        "keys_scaling",
    }
    # The target: a fixed open-loop rate of 1,000 req/s, p50 and p99 added over the mock
    # direct; and the throughput floor, (c) at least 60 % of (b) in the same run.
    assert summary["targets"] == {
        "fixed_rate_rps": 1000.0,
        "added_p50_ms": 1.0,
        "added_p99_ms": 5.0,
        "throughput_c_over_b": 0.6,
    }
    for kind in ("plain", "stream"):
        target = summary[kind]["target"]
        assert target["rps"] == 1000.0
        assert target["met"] == (target["added_p50_ms"] <= 1.0 and target["added_p99_ms"] <= 5.0)
        floor_met = summary[kind]["throughput_c_over_b"] >= 0.6
        assert summary[kind]["throughput_floor_met"] == floor_met
        # Half of saturation is information beside the target, at a rate of its own.
        assert summary[kind]["half_saturation"]["rps"] not in (1000.0, 100.0)
    assert summary["gateway_workers"] == 1 and summary["gateway_rss_mib"] > 0
    # Added latency: the median over rounds of (c) - (a) measured in the same round, and
    # beside it (b) - (a), the pass-through's share.
    for kind in ("plain", "stream"):
        for label in ("target", "half_saturation", "idle"):
            figures = summary[kind][label]
            assert (figures["rps"] == 100.0) == (label == "idle")
            same_rate = [
                r for r in fixed_rounds if r["kind"] == kind and r["rps"] == figures["rps"]
            ]
            by_round: dict[int, dict[str, dict[str, float]]] = {}
            for r in same_rate:
                by_round.setdefault(r["extra"]["round"], {})[r["scenario"]] = r
            assert all(len(x) == 3 for x in by_round.values())

            diffs = sorted(
                x["c_full_checks"]["p99_ms"] - x["a_mock"]["p99_ms"] for x in by_round.values()
            )
            assert figures["rps"] == same_rate[0]["rps"]
            assert figures["added_p99_ms"] == _added_over_two_rounds(
                by_round, "c_full_checks", "p99_ms"
            )
            assert figures["added_p99_min_ms"] == round(diffs[0], 3)
            assert figures["added_p99_max_ms"] == round(diffs[-1], 3)
            assert figures["passthrough_added_p50_ms"] == _added_over_two_rounds(
                by_round, "b_passthrough", "p50_ms"
            )
            assert figures["passthrough_added_p99_ms"] == _added_over_two_rounds(
                by_round, "b_passthrough", "p99_ms"
            )
            c_row = next(
                r
                for r in fixed
                if (r["scenario"], r["kind"], r["rps"]) == ("c_full_checks", kind, figures["rps"])
            )
            busy = c_row["rps"] * c_row["extra"]["server_cpu_us"] / 1e6
            assert figures["c_cores_busy"] == round(busy, 2) and busy > 0
    # Each row says what its server spent on a CPU per request, and (c) what Redis spent.
    for r in result["runs"]:
        assert r["extra"]["server_cpu_us"] > 0
        assert ("redis_cpu_us" in r["extra"]) == (r["scenario"] == "c_full_checks")
    c_rows = [r for r in result["runs"] if r["scenario"] == "c_full_checks"]
    assert all(r["extra"]["redis_cpu_us"] > 0 for r in c_rows)
    for kind in ("plain", "stream"):
        cpu = summary[kind]["cpu_us_per_request"]
        assert set(cpu) == {"a_mock", "b_passthrough", "c_full_checks", "c_redis"}
        wrk_row = {
            r["scenario"]: r["extra"]
            for r in result["runs"]
            if r["tool"] == "wrk" and r["kind"] == kind and r["keys"] == 10
        }
        assert cpu["c_full_checks"] == wrk_row["c_full_checks"]["server_cpu_us"]
        assert cpu["c_redis"] == wrk_row["c_full_checks"]["redis_cpu_us"]
        # The full checks do all the pass-through does and more; the mock, far less.
        assert cpu["a_mock"] < cpu["b_passthrough"] < cpu["c_full_checks"]
    assert "on-CPU us per request under wrk" in run.stdout and "cores" in run.stdout
    assert "throughput (c)/(a)" in run.stdout and "(c)/(b)" in run.stdout
    assert "of which the pass-through alone" in run.stdout
    assert "targets: at a fixed 1000 req/s" in run.stdout
    assert "plain: target: added latency at 1000 req/s" in run.stdout
    assert "stream: target: added time to first byte at 1000 req/s" in run.stdout
    assert "converter" not in run.stdout


def test_workers_below_one_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--workers", "0"])
    assert "argument --workers: must be at least 1" in capsys.readouterr().err
