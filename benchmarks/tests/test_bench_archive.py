"""The archive section: the archiver off vs on at a fixed rate. Its config archives only on
archive_on, its summary computes what it says (numbers not judged), and the section runs end
to end, tiny, on the machine's PostgreSQL (never skipped: no server answering fails it)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from benchmarks.__main__ import build_parser
from benchmarks.archive import (
    MODEL,
    archive_config,
    metric_value,
    render_archive,
    summarise_archive,
)
from benchmarks.local_postgres import admin_url
from benchmarks.runs import ARCHIVE_RATE_RPS, ARCHIVE_ROWS, DEFAULT_SECTIONS, BenchOptions, Run
from ratelimit_gw.settings import parse_settings

ROOT = Path(__file__).resolve().parents[2]


def test_only_archive_gets_an_archive_and_the_rows_differ_in_nothing_else() -> None:
    url = "postgresql://postgres@127.0.0.1:5432/rlgw_bench_x"
    off = parse_settings(archive_config("http://127.0.0.1:9", "redis://r:1/0", 8000, None), {})
    on = parse_settings(archive_config("http://127.0.0.1:9", "redis://r:1/0", 8000, url), {})
    assert off.archive is None
    assert on.archive is not None and on.archive.url == url and on.archive.in_serve
    assert set(on.models) == set(off.models) == {MODEL}
    assert on.storage == off.storage and on.server == off.server


def test_the_section_is_asked_for_by_name_and_not_run_by_default() -> None:
    args = build_parser().parse_args(["--only", "archive"])
    assert args.only == "archive" and args.archive_rate == ARCHIVE_RATE_RPS == 500.0
    assert build_parser().parse_args(["--archive-rate", "800"]).archive_rate == 800.0
    # It needs a PostgreSQL server, which the rest of the bench does not.
    assert "archive" not in DEFAULT_SECTIONS and BenchOptions().sections == DEFAULT_SECTIONS


def test_metric_value_sums_the_samples_with_the_labels_asked_for() -> None:
    text = (
        "# HELP rlgw_archive_lag_seconds lag\n"
        "rlgw_archive_lag_seconds 1.25\n"
        'rlgw_requests_total{route="/v1/chat/completions",status="200"} 7.0\n'
        'rlgw_requests_total{route="/admin/accounts",status="200"} 2.0\n'
        'rlgw_requests_total{route="/v1/chat/completions",status="429"} 5.0\n'
    )
    assert metric_value(text, "rlgw_archive_lag_seconds") == 1.25
    assert metric_value(text, "rlgw_requests_total", status="200") == 9.0
    assert metric_value(text, "rlgw_archive_leader") is None


def _run(row: str, cpu: float, redis: float, index: int, lag: float | None = None) -> Run:
    extra = {"round": index, "server_cpu_us": cpu, "redis_cpu_us": redis, "achieved_rps": 499.0}
    extra |= {"generator_lateness_p99_ms": 0.1, "generator_cpu_share": 0.05}
    if lag is not None:
        extra |= {"lag_max_s": lag, "lag_last_s": lag / 2}
    return Run(row, "plain", "fixed-rate", 5000, 500.0, 1.0, 1.5, 3.0, 0, keys=10, extra=extra)


def test_the_summary_takes_the_added_cpu_within_each_round_and_the_worst_lag() -> None:
    # Three rounds, the VM slower in round 1: archiving adds 20, 40 and 30 us.
    fixed = [
        _run("archive_off", 300.0, 100.0, 0),
        _run("archive_on", 320.0, 110.0, 0, lag=1.2),
        _run("archive_on", 640.0, 220.0, 1, lag=2.5),
        _run("archive_off", 600.0, 200.0, 1),
        _run("archive_off", 310.0, 100.0, 2),
        _run("archive_on", 340.0, 105.0, 2, lag=0.9),
    ]
    ledger = {
        "requests_answered": 100,
        "redis_stream_entries": 101,
        "postgres_rows_at_end": 90,
        "postgres_rows": 101,
        "postgres_rows_by_type": {"charge": 100, "topup": 1},
        "caught_up_after_s": 0.4,
    }
    section = summarise_archive(
        fixed, BenchOptions(rounds=3), ledger, {"archive_off": 70.0, "archive_on": 80.0}
    )
    s = section["summary"]
    assert s["server_cpu_us"] == {"archive_off": 310.0, "archive_on": 340.0, "added": 30.0}
    assert s["redis_cpu_us"] == {"archive_off": 100.0, "archive_on": 110.0, "added": 10.0}
    assert s["lag_s"]["max"] == 2.5 and s["lag_s"]["last"] == 0.45  # the last on-run's
    assert s["achieved_rps"] == {"archive_off": 499.0, "archive_on": 499.0}
    assert s["rate_rps"] == ARCHIVE_RATE_RPS and s["ledger"] == ledger
    assert [r["scenario"] for r in section["runs"]] == list(ARCHIVE_ROWS)
    assert len(section["rounds"]) == 6
    text = render_archive(section)
    assert "archiving adds +30.0 us" in text
    assert "max 2.5 s, last 0.45 s" in text
    assert "PostgreSQL 90 rows at the end of the last run, 101 after 0.4 s" in text


async def _bench_databases() -> set[str]:
    conn = await asyncpg.connect(admin_url(), timeout=10)
    try:
        rows = await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE 'rlgw_bench_%'")
    finally:
        await conn.close()
    return {row["datname"] for row in rows}


@pytest.mark.slow  # two redis-servers, the mock and two gateways as subprocesses (~12 s)
def test_the_archive_section_runs_tiny_and_archives_every_request(tmp_path: Path) -> None:
    before = asyncio.run(_bench_databases())  # fails loudly when PostgreSQL does not answer
    output = tmp_path / "bench.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--only",
            "archive",
            "--rounds",
            "1",
            "--fixed-rate-duration",
            "1",
            "--archive-rate",
            "100",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    section = json.loads(output.read_text())["archive"]
    assert [r["scenario"] for r in section["runs"]] == list(ARCHIVE_ROWS)
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in section["runs"])
    s = section["summary"]
    assert s["server_cpu_us"]["archive_off"] > 0 and s["server_cpu_us"]["archive_on"] > 0
    assert s["lag_s"]["max"] is not None and s["lag_s"]["max"] < 30
    ledger = s["ledger"]
    # One charge per request answered, plus the account's opening top-up; all archived.
    assert ledger["postgres_rows_by_type"] == {"charge": ledger["requests_answered"], "topup": 1}
    assert ledger["postgres_rows"] == ledger["redis_stream_entries"]
    assert ledger["caught_up_after_s"] is not None
    assert "archive: full checks" in run.stdout
    # Its database is gone again.
    assert asyncio.run(_bench_databases()) == before
