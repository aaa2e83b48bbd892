"""The load generators: ``wrk`` at saturation, and open loop at a fixed rate (the C
generator in ``openloop/``, else a Python fallback)."""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from . import openloop
from .processes import CpuMeter
from .runs import BenchOptions, Run

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
