"""The archive section (issue 23, SPEC §16): what archiving the ledger to PostgreSQL costs.

Two full-checks gateways (``serve``, one process each) on the lean mock, identical but for
``[archive]``, each on a private redis-server of its own, so neither's ledger is the other's
to archive:

* **archive_off**: no ``[archive]``;
* **archive_on**: ``[archive]`` on a database the bench creates on the machine's PostgreSQL
  (``local_postgres.py``: uniquely named, migrated, dropped at the end), the archiver in
  ``serve`` at its defaults (a pass every second, 1,000 entries a read).

Each round measures both rows at one fixed rate (``--archive-rate``, default 500 req/s) with
the open-loop generator, back to back, the order alternating. Every row carries the
gateway's on-CPU microseconds per request (every thread: the archiver's passes and the lag
follower included) and its Redis's, the achieved rate, p50 and p99. Throughout, /metrics of
*both* gateways is read every ``SAMPLE_INTERVAL_S`` (the same scrape cost on each row), and
archive_on's ``rlgw_archive_lag_seconds`` is kept: per row, its largest and last reading.

At the end, after archive_on's last run: its ledger rows in PostgreSQL then, and again once
the archive holds the whole Redis stream (how long that took), beside the requests it
answered (``rlgw_requests_total``, warm-ups included: one ``charge`` entry each).
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .accounts import create_keys
from .load import fixed_rate_run
from .local_postgres import archive_database
from .local_redis import RedisProcess, free_port, start_redis
from .pair import BENCH_MODEL, gateway_config, rows_in_order
from .processes import CpuMeter, python_module, rss_mib, server_process
from .rows import combine, table
from .runs import ARCHIVE_ROWS, BenchOptions, Run, chat_body

ROUTE = "/v1/chat/completions"
MODEL = BENCH_MODEL
BODY = chat_body(MODEL, stream=False)
ACCOUNT = "bench"  # accounts.create_keys's
SAMPLE_INTERVAL_S = 0.5
CATCH_UP_TIMEOUT_S = 60.0
LAG = "rlgw_archive_lag_seconds"


def archive_config(upstream: str, storage_url: str, port: int, archive_url: str | None) -> str:
    """A full-checks gateway on the mock; with ``archive_url``, archiving to it from serve."""
    config = gateway_config(upstream, storage_url, port)
    if archive_url is not None:
        config += f'\n[archive]\nurl = "{archive_url}"\n'
    return config


def metric_value(exposition: str, name: str, **labels: str) -> float | None:
    """The sum of ``name``'s samples whose labels include ``labels`` (None: no sample)."""
    found = None
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for line in exposition.splitlines():
        if not (line.startswith(name + " ") or line.startswith(name + "{")):
            continue
        series, _, value = line.rpartition(" ")
        if all(w in series for w in wanted):
            found = (found or 0.0) + float(value)
    return found


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        text: str = response.read().decode()
        return text


@dataclass
class MetricsSampler:
    """Reads every gateway's /metrics every ``interval_s`` in a thread; keeps each one's
    archive lag, with when it was read (monotonic)."""

    urls: dict[str, str]  # by row
    interval_s: float = SAMPLE_INTERVAL_S
    samples: list[tuple[float, str, float]] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            for row, url in self.urls.items():
                try:
                    lag = metric_value(scrape(url), LAG)
                except OSError:
                    continue  # a missed reading; the next one is half a second away
                if lag is not None:
                    self.samples.append((time.monotonic(), row, lag))

    def lags(self, row: str, start: float, end: float) -> list[float]:
        return [lag for at, r, lag in self.samples if r == row and start <= at <= end]


def lag_figures(lags: list[float]) -> dict[str, float]:
    """The largest and the last lag read during one run (none if none was read)."""
    if not lags:
        return {}
    return {"lag_max_s": round(max(lags), 3), "lag_last_s": round(lags[-1], 3)}


async def _ledger_rows(archive_url: str) -> dict[str, int]:
    import asyncpg

    conn = await asyncpg.connect(archive_url)
    try:
        found = await conn.fetch(
            "SELECT entry_type, count(*) AS n FROM ledger_entries WHERE account_id = $1 "
            "GROUP BY entry_type",
            ACCOUNT,
        )
    finally:
        await conn.close()
    return {row["entry_type"]: int(row["n"]) for row in found}


async def _stream_length(redis_url: str) -> int:
    from ratelimit_gw.keyspace import AccountKeys
    from ratelimit_gw.settings import StorageSettings
    from ratelimit_gw.storage import open_storage

    storage = open_storage(StorageSettings(url=redis_url))
    try:
        return int(await storage.call("XLEN", AccountKeys(ACCOUNT).ledger))
    finally:
        await storage.close()


def ledger_check(archive_url: str, redis: RedisProcess, answered: int) -> dict[str, Any]:
    """archive_on's rows in PostgreSQL now, and once they hold the whole Redis stream."""
    at_end = asyncio.run(_ledger_rows(archive_url))
    stream = asyncio.run(_stream_length(redis.url))
    started = time.monotonic()
    rows = at_end
    while sum(rows.values()) < stream and time.monotonic() - started < CATCH_UP_TIMEOUT_S:
        time.sleep(0.1)
        rows = asyncio.run(_ledger_rows(archive_url))
    caught_up = sum(rows.values()) >= stream
    return {
        "requests_answered": answered,
        "redis_stream_entries": stream,
        "postgres_rows_at_end": sum(at_end.values()),
        "postgres_rows": sum(rows.values()),
        "postgres_rows_by_type": rows,
        "caught_up_after_s": round(time.monotonic() - started, 2) if caught_up else None,
    }


def run_archive(opts: BenchOptions, work: Path) -> dict[str, Any]:
    """Start the mock, two Redis servers and the two gateways, measure both rows; rows and
    summary."""
    redises: dict[str, RedisProcess] = {}
    try:
        for row in ARCHIVE_ROWS:
            redises[row] = start_redis()
        with archive_database() as archive_url:
            return _measure(opts, work, redises, archive_url)
    finally:
        for redis in redises.values():
            redis.stop()


def _measure(
    opts: BenchOptions, work: Path, redises: dict[str, RedisProcess], archive_url: str
) -> dict[str, Any]:
    upstream_port = free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    ports = {row: free_port() for row in ARCHIVE_ROWS}
    keys = {row: asyncio.run(create_keys(redises[row].url, 10)) for row in ARCHIVE_ROWS}
    commands = {}
    for row in ARCHIVE_ROWS:
        config = work / f"{row}.toml"
        url = archive_url if row == "archive_on" else None
        config.write_text(archive_config(upstream, redises[row].url, ports[row], url))
        commands[row] = [*python_module("ratelimit_gw"), "serve", "--config", str(config)]
    mock = [*python_module("benchmarks.mock_lean"), "--port", str(upstream_port)]
    urls = {row: f"http://127.0.0.1:{port}" for row, port in ports.items()}
    fixed: list[Run] = []
    with (
        server_process(mock, upstream_port),
        server_process(commands["archive_off"], ports["archive_off"]) as off_pid,
        server_process(commands["archive_on"], ports["archive_on"]) as on_pid,
    ):
        pids = {"archive_off": off_pid, "archive_on": on_pid}
        sampler = MetricsSampler({row: f"{url}/metrics" for row, url in urls.items()})
        sampler.start()
        try:
            for index in range(opts.rounds):
                for row in rows_in_order(ARCHIVE_ROWS, index):
                    meter = CpuMeter([pids[row]], redises[row].process.pid)
                    started = time.monotonic()
                    run = fixed_rate_run(
                        urls[row] + ROUTE,
                        BODY,
                        keys[row],
                        opts.archive_rate_rps,
                        opts,
                        row,
                        "plain",
                        meter,
                    )
                    run.extra["round"] = index
                    run.extra["achieved_rps"] = round(run.requests / opts.fixed_rate_duration_s, 1)
                    if row == "archive_on":
                        run.extra |= lag_figures(sampler.lags(row, started, time.monotonic()))
                    fixed.append(run)
        finally:
            sampler.stop()
        metrics = scrape(f"{urls['archive_on']}/metrics")
        answered = int(metric_value(metrics, "rlgw_requests_total", status="200") or 0)
        ledger = ledger_check(archive_url, redises["archive_on"], answered)
        memory_mib = {row: round(rss_mib(pid), 1) for row, pid in pids.items()}
    return summarise_archive(fixed, opts, ledger, memory_mib)


def summarise_archive(
    fixed: list[Run], opts: BenchOptions, ledger: dict[str, Any], memory_mib: dict[str, float]
) -> dict[str, Any]:
    """Each row the median of its rounds; what archiving adds to the gateway's CPU per request
    (the median of the differences within a round); the lag; the ledger's rows."""
    rows = []
    for name in ARCHIVE_ROWS:
        runs = [r for r in fixed if r.scenario == name]
        row = combine(runs)
        row.extra["achieved_rps"] = statistics.median(r.extra["achieved_rps"] for r in runs)
        rows.append(row)
    by_round: dict[int, dict[str, Run]] = {}
    for run in fixed:
        by_round.setdefault(int(run.extra["round"]), {})[run.scenario] = run

    def added(figure: str) -> float:
        return round(
            statistics.median(
                pair["archive_on"].extra[figure] - pair["archive_off"].extra[figure]
                for pair in by_round.values()
            ),
            1,
        )

    on_runs = [r for r in fixed if r.scenario == "archive_on" and "lag_max_s" in r.extra]
    off, on = rows
    summary = {
        "route": ROUTE,
        "rate_rps": opts.archive_rate_rps,
        "duration_s": opts.fixed_rate_duration_s,
        "rounds": opts.rounds,
        "server_cpu_us": {
            "archive_off": off.extra["server_cpu_us"],
            "archive_on": on.extra["server_cpu_us"],
            "added": added("server_cpu_us"),
        },
        "redis_cpu_us": {
            "archive_off": off.extra["redis_cpu_us"],
            "archive_on": on.extra["redis_cpu_us"],
            "added": added("redis_cpu_us"),
        },
        "achieved_rps": {r.scenario: r.extra["achieved_rps"] for r in rows},
        "lag_s": {
            "max": max((r.extra["lag_max_s"] for r in on_runs), default=None),
            "last": on_runs[-1].extra["lag_last_s"] if on_runs else None,
            "sample_interval_s": SAMPLE_INTERVAL_S,
        },
        "ledger": ledger,
        "gateway_rss_mib": memory_mib,
    }
    return {
        "runs": [asdict(r) for r in rows],
        "rounds": [asdict(r) for r in fixed],
        "summary": summary,
    }


def render_archive(section: dict[str, Any]) -> str:
    s = section["summary"]
    cpu, redis, lag, ledger = s["server_cpu_us"], s["redis_cpu_us"], s["lag_s"], s["ledger"]
    lines = [
        f"archive: full checks on a private Redis each, lean mock, POST {s['route']} at "
        f"{s['rate_rps']:.0f} req/s for {s['duration_s']:g} s x {s['rounds']} rounds; "
        "archive_on archives its ledger to PostgreSQL from serve (default [archive])",
        *table(section["runs"]),
        f"gateway CPU per request: off {cpu['archive_off']} us, on {cpu['archive_on']} us, "
        f"archiving adds {cpu['added']:+} us (median of per-round differences); Redis: off "
        f"{redis['archive_off']} us, on {redis['archive_on']} us ({redis['added']:+} us)",
        f"achieved: off {s['achieved_rps']['archive_off']} req/s, on "
        f"{s['achieved_rps']['archive_on']} req/s",
        f"archive lag while archive_on ran (every {lag['sample_interval_s']} s): max "
        f"{lag['max']} s, last {lag['last']} s",
        f"ledger: archive_on answered {ledger['requests_answered']} requests; Redis stream "
        f"{ledger['redis_stream_entries']} entries; PostgreSQL {ledger['postgres_rows_at_end']} "
        f"rows at the end of the last run, {ledger['postgres_rows']} after "
        f"{ledger['caught_up_after_s']} s ({ledger['postgres_rows_by_type']})",
    ]
    return "\n".join(lines)
