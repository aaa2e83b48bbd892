"""`python -m benchmarks` (`make bench`): the gateway's cost, measured side by side in one run.

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
* latency at fixed rates: the target's (``--target-rate``, 1,000 req/s: full checks add
  p50 ≤ 1 ms and p99 ≤ 5 ms over the mock direct, judged in the summary), and as
  information half of (c)'s throughput for that kind of request and an unloaded 100 req/s,
  with an open-loop generator of its own — C
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

The summary also judges the throughput floor: (c) at least 60 % of (b) in the same run.

Then the converter section (``converter.py``): on the full mock, which speaks OpenAI and
Anthropic, an OpenAI caller on ``/openai/v1/chat/completions`` reaching an OpenAI model
(native) and an Anthropic-protocol model (converted, translated both ways), the same body,
back to back: converted/native throughput and the p50 converted adds at a fixed rate, beside
their targets (≥ 0.75, ≤ +1 ms).

Then the pools section (``pools.py``): the same way, a model whose provider holds one upstream
key with its own ceilings against one whose provider holds four: pool_of_4/one_key throughput
beside its target (≥ 0.90) and the p50 the pool adds. ``--only core``, ``--only converter``
or ``--only pools`` runs one section.

Only when asked for (``--only archive``: it needs a PostgreSQL server), the archive section
(``archive.py``): a gateway without ``[archive]`` and one archiving its ledger to PostgreSQL,
at one fixed rate: CPU per request, latency, the archive's lag and rows.

One table per section on stdout and a JSON file.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .accounts import create_keys
from .archive import run_archive
from .converter import run_converter
from .load import fixed_rate_run, run_wrk
from .local_redis import RedisProcess, free_port, start_redis
from .pair import BENCH_MODEL, gateway_config
from .pools import run_pools
from .processes import CpuMeter, gateway_workers, python_module, rss_mib, server_process
from .report import render, summarise
from .rows import is_row
from .runs import IDLE_RATE_RPS, BenchOptions, Run, chat_body

MODEL = BENCH_MODEL
PLAIN_BODY = chat_body(MODEL, stream=False)
STREAM_BODY = chat_body(MODEL, stream=True)


def fixed_rates(saturation_rps: float, target_rps: float) -> dict[str, float]:
    """The fixed rates of one kind of request, by label. A row is known by its rate, so the
    half-saturation one steps aside from the other two should it land on either."""
    half = float(max(10, round(saturation_rps / 2)))
    while half in (target_rps, IDLE_RATE_RPS):
        half += 1
    return {"target": target_rps, "half_saturation": half, "idle": IDLE_RATE_RPS}


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """The sections asked for, one after the other on one private Redis (and one account)."""
    redis = start_redis()
    work = Path(tempfile.mkdtemp(prefix="rlgw-bench-"))
    result: dict[str, Any] = {}
    try:
        keys = asyncio.run(
            create_keys(redis.url, opts.many_keys if "core" in opts.sections else 10)
        )
        if "core" in opts.sections:
            result |= run_core(opts, redis, keys, work)
        if "converter" in opts.sections:
            result["converter"] = run_converter(opts, redis, keys[:10], work)
        if "pools" in opts.sections:
            result["pools"] = run_pools(opts, redis, keys[:10], work)
        if "archive" in opts.sections:
            result["archive"] = run_archive(opts, work)
    finally:
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    options = {k: ",".join(v) if isinstance(v, tuple) else str(v) for k, v in asdict(opts).items()}
    return result | {
        "options": options,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }


def run_core(
    opts: BenchOptions, redis: RedisProcess, keys: list[str], work: Path
) -> dict[str, Any]:
    """(a), (b) and (c): saturation, many keys, fixed rates; rows and summary."""
    upstream_port, passthrough_port, full_port = free_port(), free_port(), free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    rounds: list[Run] = []
    fixed: list[Run] = []
    rates: dict[str, dict[str, float]] = {}
    few = keys[:10]
    if opts.upstream == "lean":
        mock = [*python_module("benchmarks.mock_lean"), "--port", str(upstream_port)]
    else:
        mock = [*python_module("ratelimit_gw"), "mock-upstream", "--port", str(upstream_port)]
        mock.append("--no-request-log")
    passthrough_config = work / "passthrough.toml"
    passthrough_config.write_text(gateway_config(upstream, "memory://", passthrough_port))
    full_config = work / "full.toml"
    full_config.write_text(gateway_config(upstream, redis.url, full_port))
    passthrough = [
        *python_module("ratelimit_gw"),
        "serve",
        "--config",
        str(passthrough_config),
        "--passthrough-for-benchmark",
    ]
    full = [*python_module("ratelimit_gw"), "serve", "--config", str(full_config)]
    for command in (passthrough, full):
        command += ["--workers", str(opts.workers)]
    # All three servers stay up (idle when not measured), so each round can measure
    # (a), (b) and (c) back to back: the ratios compare runs seconds apart, not minutes,
    # which matters on a shared VM whose speed drifts.
    with (
        server_process(mock, upstream_port) as mock_pid,
        server_process(passthrough, passthrough_port) as passthrough_pid,
        server_process(full, full_port) as pid,
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
                    rounds.append(measured_wrk(full_url, body, keys, "c_full_checks", kind, index))
        # The target's fixed rate; half of each kind's own saturation (information: how
        # the added latency grows with load); and an unloaded rate.
        for kind, body in (("plain", PLAIN_BODY), ("stream", STREAM_BODY)):
            saturation = statistics.median(
                [r.rps for r in rounds if is_row(r, "c_full_checks", kind, len(few))]
            )
            rates[kind] = fixed_rates(saturation, opts.target_rate_rps)
            for rate in rates[kind].values():
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
    return summarise(rounds, fixed, rates, memory_mib, opts)


def main(opts: BenchOptions) -> None:
    result = run_bench(opts)
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(result, indent=2))
    print(render(result))
    print(f"\nJSON: {opts.output}")
