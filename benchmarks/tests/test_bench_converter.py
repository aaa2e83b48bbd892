"""The converter section: an OpenAI caller, native vs an Anthropic-protocol model, on the full
mock; it runs end to end (numbers not judged), and its summary computes what it says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import build_parser
from benchmarks.bench import PLAIN_BODY, STREAM_BODY
from benchmarks.converter import (
    BODIES,
    MODELS,
    ROUTE,
    converter_config,
    converter_rate,
    round_order,
)
from benchmarks.report import render, summarise_converter
from benchmarks.runs import DEFAULT_SECTIONS, SECTIONS, BenchOptions, Run
from ratelimit_gw.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_the_converter_section_runs_and_reports_both_rows_side_by_side(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    run = subprocess.run(
        [
            *(sys.executable, "-m", "benchmarks", "--only", "converter"),
            *("--duration", "1", "--rounds", "2", "--connections", "8"),
            *("--fixed-rate-duration", "1", "--output", str(output)),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(output.read_text())
    # Only the section asked for: no (a), (b), (c).
    assert set(result) == {"converter", "options", "machine"}
    assert result["options"]["sections"] == "converter"
    section = result["converter"]
    rows = {(r["scenario"], r["kind"], r["tool"]) for r in section["runs"]}
    assert rows == {
        (scenario, kind, tool)
        for scenario in ("native", "converted")
        for kind in ("plain", "stream")
        for tool in ("wrk", "fixed-rate")
    }
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in section["runs"])
    assert all(r["extra"]["rounds"] == 2 and r["keys"] == 10 for r in section["runs"])
    # Every row: the gateway's, Redis's and the mock's CPU per request.
    for r in section["runs"]:
        for figure in ("server_cpu_us", "redis_cpu_us", "upstream_cpu_us"):
            assert r["extra"][figure] > 0
    # Each round measured both rows back to back, the order alternating.
    wrk_rounds = [r for r in section["rounds"] if r["tool"] == "wrk"]
    assert len(wrk_rounds) == 2 * 2 * 2
    for index in (0, 1):
        order = [r["scenario"] for r in wrk_rounds if r["extra"]["round"] == index]
        first = "native" if index == 0 else "converted"
        assert order[0] == first and sorted(order) == ["converted"] * 2 + ["native"] * 2
    fixed_rounds = [r for r in section["rounds"] if r["tool"] == "fixed-rate"]
    assert len(fixed_rounds) == 2 * 2 * 2
    summary = section["summary"]
    assert summary["route"] == "/openai/v1/chat/completions"
    assert summary["models"] == {
        "native": {"model": "gpt-4o-mini", "protocol": "openai"},
        "converted": {"model": "claude-sonnet-4-6", "protocol": "anthropic"},
    }
    assert summary["targets"] == {
        "gates": False,
        "throughput_converted_over_native": 0.75,
        "added_p50_ms": 1.0,
        "fixed_rate_rps": 1000.0,
    }
    for kind in ("plain", "stream"):
        k = summary[kind]
        assert k["throughput_target_met"] == (k["throughput_converted_over_native"] >= 0.75)
        f = k["fixed_rate"]
        assert k["added_p50_target_met"] == (f["added_p50_ms"] <= 1.0)
        # Both rows at one rate, which both sustain: the target's, or half of the slower
        # row's saturation.
        slower = min(k["native_rps"], k["converted_rps"])
        assert f["rps"] == converter_rate(slower, 1000.0)
        assert f["at_target_rate"] == (f["rps"] == 1000.0)
        assert {r["rps"] for r in fixed_rounds if r["kind"] == kind} == {f["rps"]}
        assert f["native_cores_busy"] > 0 and f["converted_cores_busy"] > 0
        cpu = k["cpu_us_per_request"]
        assert cpu["converted_minus_native"] == round(cpu["converted"] - cpu["native"], 1)
    assert summary["gateway_workers"] == 1 and summary["gateway_rss_mib"] > 0
    assert "converter: an OpenAI caller on POST /openai/v1/chat/completions" in run.stdout
    assert "converter targets (not gates)" in run.stdout
    assert "plain: converted/native throughput" in run.stdout
    assert "stream: converted/native throughput" in run.stdout
    assert "converted adds time to first byte p50" in run.stdout
    assert "targets: at a fixed" not in run.stdout  # the core section did not run


def test_both_rows_send_the_core_body_but_for_the_model() -> None:
    assert BODIES["native"] == {"plain": PLAIN_BODY, "stream": STREAM_BODY}
    for kind in ("plain", "stream"):
        native = json.loads(BODIES["native"][kind])
        converted = json.loads(BODIES["converted"][kind])
        assert converted.pop("model") == "claude-sonnet-4-6"
        assert native.pop("model") == "gpt-4o-mini"
        assert native == converted
        assert native.get("stream") is (True if kind == "stream" else None)


def test_the_gateway_config_has_one_model_per_protocol_at_the_same_prices(
    tmp_path: Path,
) -> None:
    path = tmp_path / "converter.toml"
    path.write_text(converter_config("http://127.0.0.1:9", "memory://", 8000))
    settings = load_settings(path)
    protocols = {model.id: model.provider.protocol for model in settings.models.values()}
    assert protocols == dict(MODELS.values())
    prices = {
        (m.input_nano_usd_per_mtok, m.output_nano_usd_per_mtok) for m in settings.models.values()
    }
    assert len(prices) == 1
    assert {p.base_url for p in settings.providers.values()} == {"http://127.0.0.1:9"}
    assert ROUTE == "/openai/v1/chat/completions"


def test_the_fixed_rate_is_the_targets_unless_half_the_slower_saturation_is_lower() -> None:
    assert converter_rate(5000.0, 1000.0) == 1000.0
    assert converter_rate(2000.0, 1000.0) == 1000.0
    assert converter_rate(1500.0, 1000.0) == 750.0
    assert converter_rate(5.0, 1000.0) == 10.0
    assert round_order(0) == ("native", "converted")
    assert round_order(1) == ("converted", "native")


def test_only_picks_a_section() -> None:
    assert build_parser().parse_args([]).only is None
    assert build_parser().parse_args(["--only", "converter"]).only == "converter"
    assert SECTIONS == ("core", "converter", "pools", "archive")
    assert DEFAULT_SECTIONS == ("core", "converter", "pools")  # the archive needs PostgreSQL


def test_only_refuses_an_unknown_section(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--only", "gemini"])
    assert "invalid choice: 'gemini'" in capsys.readouterr().err


def _run(scenario: str, kind: str, tool: str, rps: float, p50: float, p99: float, i: int) -> Run:
    extra = {"round": i, "server_cpu_us": 200.0 if scenario == "native" else 260.0}
    extra |= {"redis_cpu_us": 80.0, "upstream_cpu_us": 40.0}
    if tool == "fixed-rate":
        extra |= {"generator_lateness_p99_ms": 0.1, "generator_cpu_share": 0.05}
    return Run(scenario, kind, tool, 1000, rps, p50, p50, p99, 0, keys=10, extra=extra)


def test_the_summary_compares_rows_of_the_same_round_against_the_targets() -> None:
    # Native then converted, two rounds; the VM twice as fast in round 1 as in round 0.
    rounds = []
    fixed = []
    for i, speed in enumerate((1.0, 2.0)):
        for kind, share in (("plain", 0.8), ("stream", 0.7)):
            rounds.append(_run("native", kind, "wrk", 2000 * speed, 5, 9, i))
            rounds.append(_run("converted", kind, "wrk", 2000 * speed * share, 6, 9, i))
    for kind, rate, added in (("plain", 1000.0, (0.5, 0.7)), ("stream", 700.0, (1.2, 1.6))):
        for i in (0, 1):
            fixed.append(_run("native", kind, "fixed-rate", rate, 2.0 + i, 4.0, i))
            converted_p50 = 2.0 + i + added[i]
            fixed.append(_run("converted", kind, "fixed-rate", rate, converted_p50, 5.0 + i, i))
    opts = BenchOptions()
    section = summarise_converter(
        rounds,
        fixed,
        {"plain": 1000.0, "stream": 700.0},
        80.0,
        opts,
        route=ROUTE,
        models=MODELS,
    )
    summary = section["summary"]
    plain, stream = summary["plain"], summary["stream"]
    # Ratios within a round, whatever the VM did between rounds.
    assert plain["throughput_converted_over_native"] == 0.8 and plain["throughput_target_met"]
    assert stream["throughput_converted_over_native"] == 0.7
    assert not stream["throughput_target_met"]
    assert plain["native_rps"] == 3000.0 and plain["converted_rps"] == 2400.0
    # Added p50: the median of the rounds' differences (two rounds: their mean).
    assert plain["fixed_rate"]["added_p50_ms"] == 0.6 and plain["added_p50_target_met"]
    assert stream["fixed_rate"]["added_p50_ms"] == 1.4 and not stream["added_p50_target_met"]
    assert plain["fixed_rate"]["added_p99_min_ms"] == 1.0
    assert plain["fixed_rate"]["added_p99_max_ms"] == 2.0
    assert plain["fixed_rate"]["at_target_rate"] and not stream["fixed_rate"]["at_target_rate"]
    assert plain["fixed_rate"]["converted_cores_busy"] == 0.26
    assert plain["cpu_us_per_request"] == {
        "native": 200.0,
        "converted": 260.0,
        "native_redis": 80.0,
        "converted_redis": 80.0,
        "native_upstream": 40.0,
        "converted_upstream": 40.0,
        "converted_minus_native": 60.0,
    }
    # Eight rows: two rows, two kinds, two tools; the rounds kept in the JSON.
    assert len(section["runs"]) == 8 and len(section["rounds"]) == 16
    text = render({"converter": section})
    assert "converter targets (not gates)" in text
    assert "plain: converted/native throughput 0.80" in text
    assert "target >= 0.75: met" in text and "target >= 0.75: NOT MET" in text
    assert "at 1000 req/s converted adds latency p50 +0.600 ms (target <= 1 ms: met)" in text
    assert "at 700 req/s (half saturation) converted adds time to first byte p50 +1.400 ms" in text
    assert "(target <= 1 ms: NOT MET)" in text
