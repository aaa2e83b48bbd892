"""`ratelimit-gw bench`: the gateway's cost, measured side by side in one run.

Starts its own mock upstream, private redis-server and gateway processes on loopback, then:

(The upstream is the lean mock, ``mock_lean.py``, unless ``--upstream aiohttp``: it stands
in for a provider on another machine, and what it spends of the shared cores is taken from
the gateway being measured.)

* saturation throughput and latency with ``wrk`` (a C load generator) for (a) the mock
  directly, (b) the gateway as a pass-through with storage disabled, (c) the gateway with
  full checks (auth, rpm, tpm, concurrency, balance hold and settle) on Redis — plain and
  streaming requests. All three servers stay up and each round measures them back to back;
  a row is the median of its rounds, and a ratio the median of the ratios within a round
  (a shared VM's speed drifts over minutes, and rows minutes apart would compare drifts);
* latency at a fixed rate below saturation (half of (c)'s throughput for that kind of
  request, and an unloaded 100 req/s) with an open-loop generator of its own — C
  (``openloop/``, compiled on first use; a Python fallback without a compiler) — for (a),
  (b) and (c), as many rounds as the saturation runs, back to back in each: added
  latency = the median over rounds of (c) − (a), and for streams the added time to first
  byte; (b) − (a) beside it is the relay's share of that (the hop any proxy adds).
  Latency counts from each request's scheduled send time, so queueing is never hidden;
  the generator reports its own lateness and CPU share, which show it kept up;
* (c) with 10 keys and with many keys (the key cache and Redis hold them all);
* in every row, the on-CPU microseconds per request of the server measured (and of Redis
  for (c)): these resolve a few per cent where req/s drifts by tens on a shared VM;
* the gateway worker's memory (RSS).

``--workers N`` runs (b) and (c) as ``serve --workers N``; RSS is then each worker's, the
largest reported.

One table on stdout and a JSON file.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from . import openloop
from .local_redis import free_port, start_redis, wait_for_port

MODEL = "gpt-4o-mini"
IDLE_RATE_RPS = 100.0
PLAIN_BODY = json.dumps(
    {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": "Say hello."}]}
).encode()
STREAM_BODY = json.dumps(
    {
        "model": MODEL,
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": "Say hello."}],
    }
).encode()


@dataclass
class Run:
    scenario: str  # a_mock | b_passthrough | c_full_checks
    kind: str  # plain | stream
    tool: str  # wrk | fixed-rate
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    keys: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class BenchOptions:
    duration_s: float = 4.0  # per wrk run; each scenario runs once per round
    rounds: int = 3
    # Enough to saturate (c): each of its requests waits on Redis, then on the upstream, and
    # on 32 connections the CPU idled between the two hops (-c128 reached ~20 % more).
    connections: int = 128
    upstream: str = "lean"  # mock_lean.py; "aiohttp": the full mock (mock_upstream.py)
    workers: int = 1  # gateway processes for (b) and (c), as `serve --workers N`
    many_keys: int = 100_000
    fixed_rate_duration_s: float = 6.0
    output: Path = Path("bench-results/bench.json")


# --- processes -------------------------------------------------------------------------------


def _python() -> list[str]:
    return [sys.executable, "-m", "ratelimit_gw"]


@contextmanager
def _process(args: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[int]:
    process = subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    try:
        if not wait_for_port(port, 20):
            raise RuntimeError(f"{' '.join(args)} did not start on port {port}")
        yield process.pid
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _gateway_config(upstream: str, storage_url: str, port: int) -> str:
    return f"""
[server]
host = "127.0.0.1"
port = {port}

[storage]
url = "{storage_url}"

[log]
access_log = false

[[providers]]
name = "mock"
protocol = "openai"
base_url = "{upstream}"

[[models]]
id = "{MODEL}"
provider = "mock"
input_per_mtok = 0.15
output_per_mtok = 0.60
"""


def gateway_workers(pid: int, workers: int, timeout_s: float = 20.0) -> list[int]:
    """The processes serving requests: ``pid`` itself, or the ``workers`` children of a
    ``serve --workers N`` supervisor (multiprocessing's resource tracker is not one)."""
    if workers == 1:
        return [pid]
    deadline = time.monotonic() + timeout_s
    while True:
        found = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                try:
                    cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                except FileNotFoundError:  # exited since the listing
                    continue
                if b"resource_tracker" not in cmdline:
                    found.append(int(child))
        if len(found) >= workers:
            return sorted(found)
        if time.monotonic() > deadline:
            raise RuntimeError(f"gateway pool {pid}: {len(found)} of {workers} workers running")
        time.sleep(0.1)


def _process_cpu_clock(pid: int) -> int:
    """Linux's CPU-time clock of another process (clock_getcpuclockid(3) in C: the pid,
    complemented, shifted over the clock type, CPUCLOCK_SCHED = 2)."""
    return (~pid << 3) | 2


def cpu_seconds(pids: list[int]) -> float:
    """Time these processes have spent on a CPU, in seconds: every thread, ended ones too.

    The scheduler's own nanosecond count (where /proc/<pid>/stat rounds to clock ticks, and
    /proc/<pid>/task/*/schedstat forgets threads that have ended)."""
    total_ns = 0
    for pid in pids:
        try:
            total_ns += time.clock_gettime_ns(_process_cpu_clock(pid))
        except OSError as exc:  # EINVAL: no such process any more
            raise RuntimeError(f"process {pid} is gone: it died during the benchmark") from exc
    return total_ns / 1e9


# What a CpuMeter adds to a run's extra: the median over rounds goes in a row.
CPU_FIGURES = ("server_cpu_us", "redis_cpu_us")


class CpuMeter:
    """The on-CPU microseconds per request of the server measured and, for (c), of Redis,
    over one measurement (:meth:`start` after any warm-up). They resolve a few per cent,
    where req/s on a shared VM drifts by tens, and show where a fixed-rate row's time went."""

    def __init__(self, server: list[int], redis: int | None) -> None:
        self._processes = {"server_cpu_us": server}
        if redis is not None:
            self._processes["redis_cpu_us"] = [redis]
        self._before: dict[str, float] = {}

    def start(self) -> None:
        self._before = {name: cpu_seconds(pids) for name, pids in self._processes.items()}

    def per_request(self, requests: int) -> dict[str, float]:
        if not requests:
            return {}
        return {
            name: round((cpu_seconds(pids) - self._before[name]) * 1e6 / requests, 1)
            for name, pids in self._processes.items()
        }


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


# --- accounts and keys -----------------------------------------------------------------------


async def create_keys(storage_url: str, count: int) -> list[str]:
    """One bench account with generous limits (so every check runs and passes), and keys."""
    from .accounts import AccountStore
    from .limits import Limits
    from .settings import StorageSettings
    from .storage import open_storage

    storage = open_storage(StorageSettings(url=storage_url, command_timeout_s=30))
    try:
        store = AccountStore(storage)
        generous = Limits(rpm=10**9, tpm=10**12, concurrency=10**6)
        await store.create_account("bench", balance_nano=10**15, limits=generous)
        return await store.create_keys("bench", count, generous)
    finally:
        await storage.close()


# --- load generators -------------------------------------------------------------------------

_WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open(os.getenv("RLGW_BENCH_BODY"), "rb")
wrk.body = f:read("*a")
f:close()
local keys = {}
for line in io.lines(os.getenv("RLGW_BENCH_KEYS")) do keys[#keys + 1] = line end
local n = #keys
local sequential = os.getenv("RLGW_BENCH_SEQUENTIAL") == "1"
local next_key = 0
math.randomseed(os.time())
request = function()
  local k
  if sequential then
    next_key = next_key % n + 1
    k = keys[next_key]
  else
    k = keys[math.random(n)]
  end
  wrk.headers["Authorization"] = "Bearer " .. k
  return wrk.format()
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %.1f %.1f %.1f %d\\n", summary.requests,
    summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is not installed: `make bench` installs it (Debian package wrk)")
    return found


def run_wrk(
    url: str,
    body: bytes,
    keys: list[str],
    opts: BenchOptions,
    scenario: str,
    kind: str,
    *,
    duration_s: float | None = None,
    sequential: bool = False,
    round_: int | None = None,
) -> Run:
    with tempfile.TemporaryDirectory(prefix="rlgw-wrk-") as tmp:
        script, body_file, keys_file = (Path(tmp) / n for n in ("bench.lua", "body", "keys"))
        script.write_text(_WRK_SCRIPT)
        body_file.write_bytes(body)
        keys_file.write_text("\n".join(keys) + "\n")
        out = subprocess.run(
            [
                wrk_binary(),
                "-t1",
                f"-c{opts.connections}",
                f"-d{duration_s or opts.duration_s:g}s",
                "--timeout",
                "10s",
                "-s",
                str(script),
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
            env={
                **os.environ,
                "RLGW_BENCH_BODY": str(body_file),
                "RLGW_BENCH_KEYS": str(keys_file),
                "RLGW_BENCH_SEQUENTIAL": "1" if sequential else "0",
            },
        ).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    requests, duration_us, p50, p90, p99, errors = line.split()[1:]
    return Run(
        scenario=scenario,
        kind=kind,
        tool="wrk",
        requests=int(requests),
        rps=round(int(requests) / (int(duration_us) / 1e6), 1),
        p50_ms=round(float(p50) / 1000, 3),
        p90_ms=round(float(p90) / 1000, 3),
        p99_ms=round(float(p99) / 1000, 3),
        errors=int(errors),
        keys=len(keys),
        extra={} if round_ is None else {"round": round_},
    )


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


async def fixed_rate(
    url: str, body: bytes, keys: list[str], rate: float, duration_s: float, stream: bool
) -> tuple[list[float], list[float], int]:
    """Open loop: request i starts at t0 + i/rate whatever happened before.

    Returns latencies (ms; time to the first body byte for streams, whole response for
    plain), the generator's lateness against its schedule (ms), and the error count.
    """
    latencies: list[float] = []
    lateness: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int, scheduled: float) -> None:
            nonlocal errors
            started = time.perf_counter()
            lateness.append((started - scheduled) * 1000)
            headers = {
                "Authorization": f"Bearer {keys[i % len(keys)]}",
                "Content-Type": "application/json",
            }
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    if stream:
                        await response.content.readany()
                        latencies.append((time.perf_counter() - started) * 1000)
                        await response.read()
                    else:
                        await response.read()
                        latencies.append((time.perf_counter() - started) * 1000)
                    if response.status != 200:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1

        total = int(rate * duration_s)
        t0 = time.perf_counter() + 0.2
        tasks = []
        for i in range(total):
            scheduled = t0 + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, scheduled)))
        await asyncio.gather(*tasks)
    return sorted(latencies), sorted(lateness), errors


def fixed_rate_run(
    url: str,
    body: bytes,
    keys: list[str],
    rate: float,
    opts: BenchOptions,
    scenario: str,
    kind: str,
    meter: CpuMeter | None = None,
) -> Run:
    """One open-loop run at ``rate``, after a 1 s warm-up (connections, caches); ``meter``
    starts after the warm-up.

    The C generator (openloop.c, ~10 % of a core at 2,000 req/s) where a compiler exists,
    else the Python one, which needs most of a core itself and so inflates the tail of
    whatever it measures on a 2-core machine. ``extra["generator"]`` says which ran."""
    stream = kind == "stream"
    if openloop.available():
        target = urlsplit(url)
        host, port = target.hostname or "127.0.0.1", target.port or 80
        openloop.run(host, port, target.path, body, keys, rate, 1.0, stream)  # warm-up
        if meter is not None:
            meter.start()
        result = openloop.run(
            host, port, target.path, body, keys, rate, opts.fixed_rate_duration_s, stream
        )
        latencies, lateness, errors = result.latencies_ms, result.lateness_ms, result.errors
        generator = {"generator_cpu_share": round(result.cpu_s / opts.fixed_rate_duration_s, 3)}
    else:
        asyncio.run(fixed_rate(url, body, keys, rate, 1.0, stream))
        if meter is not None:
            meter.start()
        latencies, lateness, errors = asyncio.run(
            fixed_rate(url, body, keys, rate, opts.fixed_rate_duration_s, stream)
        )
        generator = {"generator_python": 1.0}
    if meter is not None:
        generator |= meter.per_request(len(latencies))
    return Run(
        scenario=scenario,
        kind=kind,
        tool="fixed-rate",
        requests=len(latencies),
        rps=rate,
        p50_ms=round(_percentile(latencies, 0.50), 3),
        p90_ms=round(_percentile(latencies, 0.90), 3),
        p99_ms=round(_percentile(latencies, 0.99), 3),
        errors=errors,
        keys=len(keys),
        extra={"generator_lateness_p99_ms": round(_percentile(lateness, 0.99), 3), **generator},
    )


# --- the run ---------------------------------------------------------------------------------


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    redis = start_redis()
    upstream_port, passthrough_port, full_port = free_port(), free_port(), free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    rounds: list[Run] = []
    fixed: list[Run] = []
    work = Path(tempfile.mkdtemp(prefix="rlgw-bench-"))
    try:
        keys = asyncio.run(create_keys(redis.url, opts.many_keys))
        few = keys[:10]
        mock = [*_python(), "mock-upstream", "--port", str(upstream_port), "--no-request-log"]
        if opts.upstream == "lean":
            mock.append("--lean")
        passthrough_config = work / "passthrough.toml"
        passthrough_config.write_text(_gateway_config(upstream, "memory://", passthrough_port))
        full_config = work / "full.toml"
        full_config.write_text(_gateway_config(upstream, redis.url, full_port))
        passthrough = [
            *_python(),
            "serve",
            "--config",
            str(passthrough_config),
            "--passthrough-for-benchmark",
        ]
        full = [*_python(), "serve", "--config", str(full_config)]
        for command in (passthrough, full):
            command += ["--workers", str(opts.workers)]
        # All three servers stay up (idle when not measured), so each round can measure
        # (a), (b) and (c) back to back: the ratios compare runs seconds apart, not minutes,
        # which matters on a shared VM whose speed drifts.
        with (
            _process(mock, upstream_port) as mock_pid,
            _process(passthrough, passthrough_port) as passthrough_pid,
            _process(full, full_port) as pid,
        ):
            full_workers = gateway_workers(pid, opts.workers)
            # Whose CPU each scenario spends (a pool's supervisor too: it stays idle).
            servers = {
                "a_mock": [mock_pid],
                "b_passthrough": sorted(
                    {passthrough_pid, *gateway_workers(passthrough_pid, opts.workers)}
                ),
                "c_full_checks": sorted({pid, *full_workers}),
            }

            def meter(scenario: str) -> CpuMeter:
                storage = redis.process.pid if scenario == "c_full_checks" else None
                return CpuMeter(servers[scenario], storage)

            def measured_wrk(
                url: str, body: bytes, keys: list[str], scenario: str, kind: str, index: int
            ) -> Run:
                cpu = meter(scenario)
                cpu.start()
                run = run_wrk(url, body, keys, opts, scenario, kind, round_=index)
                run.extra |= cpu.per_request(run.requests)
                return run

            urls = {
                "a_mock": f"{upstream}/v1/chat/completions",
                "b_passthrough": f"http://127.0.0.1:{passthrough_port}/v1/chat/completions",
                "c_full_checks": f"http://127.0.0.1:{full_port}/v1/chat/completions",
            }
            full_url = urls["c_full_checks"]
            # Steady state with many keys: first let every key be used once (a key's first
            # request costs one extra lookup), then measure.
            probe = run_wrk(full_url, PLAIN_BODY, few, opts, "warm-up", "plain", duration_s=2)
            # Each worker keeps its own key cache and the kernel picks the worker, so with
            # more workers every key needs more uses before each has seen it.
            warm_s = math.ceil(len(keys) / max(probe.rps, 1.0) * 2.5 * opts.workers) + 1
            run_wrk(
                full_url,
                PLAIN_BODY,
                keys,
                opts,
                "warm-up",
                "plain",
                duration_s=warm_s,
                sequential=True,
            )
            for index in range(opts.rounds):
                for kind, body in (("plain", PLAIN_BODY), ("stream", STREAM_BODY)):
                    for scenario, url in urls.items():
                        rounds.append(measured_wrk(url, body, few, scenario, kind, index))
                    if kind == "plain":
                        rounds.append(
                            measured_wrk(full_url, body, keys, "c_full_checks", kind, index)
                        )
            # The target's condition (half of each kind's own saturation), and an unloaded
            # rate.
            for kind, body in (("plain", PLAIN_BODY), ("stream", STREAM_BODY)):
                saturation = statistics.median(
                    [r.rps for r in rounds if _is(r, "c_full_checks", kind, len(few))]
                )
                for rate in (max(10.0, round(saturation / 2)), IDLE_RATE_RPS):
                    # Rounds here too: one episode of VM noise (a stall of a few hundred ms)
                    # decides a 6 s run's p99, so a row is the median of its rounds, and the
                    # added latency the median of (c) - (a) within each round.
                    # (b) too, at the same rates: it splits what (c) adds into the relay's
                    # share (the extra hop any proxy costs) and the checks' share.
                    for index in range(opts.rounds):
                        for scenario in ("a_mock", "b_passthrough", "c_full_checks"):
                            run = fixed_rate_run(
                                urls[scenario],
                                body,
                                few,
                                rate,
                                opts,
                                scenario,
                                kind,
                                meter(scenario),
                            )
                            run.extra["round"] = index
                            fixed.append(run)
            memory_mib = max(rss_mib(p) for p in full_workers)
    finally:
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    return summarise(rounds, fixed, memory_mib, opts)


def _is(run: Run, scenario: str, kind: str, keys: int) -> bool:
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
    fixed: list[Run], kind: str, rate: float | None, scenario: str = "c_full_checks"
) -> dict[str, float]:
    """``scenario`` - (a) at one rate (None: the half-saturation one), p50 and p99: the median
    over rounds of each round's difference (measured seconds apart), and the p99 difference's
    range."""
    at_rate = [
        r
        for r in fixed
        if r.kind == kind and (r.rps == rate if rate is not None else r.rps != IDLE_RATE_RPS)
    ]
    p50, p99 = [], []
    for index in sorted({r.extra["round"] for r in at_rate}):
        same = {r.scenario: r for r in at_rate if r.extra["round"] == index}
        a, other = same["a_mock"], same[scenario]
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
        upper = next(r for r in same if _is(r, *top))
        lower = next(r for r in same if _is(r, *bottom))
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
    rounds: list[Run], fixed: list[Run], memory_mib: float, opts: BenchOptions
) -> dict[str, Any]:
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
    }
    for kind in ("plain", "stream"):
        a, b, c = (("a_mock", kind, 10), ("b_passthrough", kind, 10), ("c_full_checks", kind, 10))
        summary[kind] = {
            "throughput_c_over_a": round_ratio(rounds, c, a),
            "throughput_c_over_b": round_ratio(rounds, c, b),
        }
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
        for label, rate in (("half_saturation", None), ("idle", IDLE_RATE_RPS)):
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
        "options": {k: str(v) for k, v in asdict(opts).items()},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        f"{'scenario':<15} {'kind':<7} {'tool':<11} {'keys':>7} {'req/s':>9} "
        f"{'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>6}  range over rounds",
    ]
    for r in result["runs"]:
        spread = ""
        if "rps_min" in r["extra"]:
            spread = f"  {r['extra']['rps_min']:.0f}-{r['extra']['rps_max']:.0f}"
        elif "p99_min_ms" in r["extra"]:
            spread = f"  p99 {r['extra']['p99_min_ms']:.3f}-{r['extra']['p99_max_ms']:.3f}"
        lines.append(
            f"{r['scenario']:<15} {r['kind']:<7} {r['tool']:<11} {r['keys']:>7} {r['rps']:>9.1f} "
            f"{r['p50_ms']:>8.3f} {r['p90_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['errors']:>6}{spread}"
        )
    s = result["summary"]
    for kind in ("plain", "stream"):
        k = s[kind]
        what = "latency" if kind == "plain" else "time to first byte"
        added = "; ".join(
            f"at {k[label]['rps']:g} req/s p50 {k[label]['added_p50_ms']:+.3f} ms, "
            f"p99 {k[label]['added_p99_ms']:+.3f} ms "
            f"({k[label]['added_p99_min_ms']:+.3f} to {k[label]['added_p99_max_ms']:+.3f}), "
            f"of which the pass-through alone p50 {k[label]['passthrough_added_p50_ms']:+.3f}, "
            f"p99 {k[label]['passthrough_added_p99_ms']:+.3f}, (c) using "
            f"{k[label].get('c_cores_busy', math.nan):.2f} cores"
            for label in ("half_saturation", "idle")
        )
        lines.append(
            f"{kind}: throughput (c)/(a) {k['throughput_c_over_a']:.2f}, (c)/(b) "
            f"{k['throughput_c_over_b']:.2f}; added {what}: {added}"
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


def main(opts: BenchOptions) -> None:
    result = run_bench(opts)
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(result, indent=2))
    print(render(result))
    print(f"\nJSON: {opts.output}")
