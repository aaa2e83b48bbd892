"""Two rows through one full-checks gateway, measured side by side: the machinery the converter
and pools sections share.

A :class:`Pair` says what differs between its two rows (each row's body, so its model, and the
gateway's config and environment); :func:`measure_pair` does the rest the same way for every
such section, on the bench's Redis and the *full* mock (``ratelimit-gw mock-upstream``):

* every key, both rows and both kinds (plain, streaming) used once, then rounds: each
  measures the two rows back to back with ``wrk`` at saturation, the order alternating from
  round to round, so neither row is always the one measured right after the other (on a
  warmer or a more tired machine);
* then, per kind, latency at one fixed rate with the open-loop generator, the rows back to
  back in each round again: the target's rate, or half of the slower row's saturation if that
  is lower (a rate both sustain: at half of ``wrk``'s saturation a gateway is already ~0.8
  busy, and queueing would decide the p50);
* every measurement carries the on-CPU microseconds per request of the gateway, Redis and the
  mock (which shares the cores, and may do different work for the two rows).

What the rows mean, and what is judged, is the section's (``pair_report.summarise_pair``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .load import fixed_rate_run, run_wrk
from .local_redis import RedisProcess, free_port
from .processes import CpuMeter, gateway_workers, python_module, rss_mib, server_process
from .rows import is_row
from .runs import BenchOptions, Run

KINDS = ("plain", "stream")


@dataclass(frozen=True)
class Pair:
    """A two-row section: ``rows`` is (base, other), ``other`` judged against ``base``."""

    name: str  # the section's: its config file is <name>.toml
    rows: tuple[str, str]
    route: str
    bodies: dict[str, dict[str, bytes]]  # by row, then by kind
    # The gateway's TOML from (the mock's base URL, the Redis URL, the gateway's port).
    config: Callable[[str, str, int], str]
    # Set in the gateway process's environment (the upstream keys its config names).
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class PairRuns:
    """What :func:`measure_pair` measured: every round of both rows, and the fixed rates."""

    rounds: list[Run]  # wrk, saturation
    fixed: list[Run]  # open loop, one rate per kind
    rates: dict[str, float]  # by kind
    memory_mib: float  # the largest gateway worker's RSS at the end


BENCH_MODEL = "gpt-4o-mini"  # the one model of the gateways the bench starts


def gateway_header(storage_url: str, port: int) -> str:
    """The part of a pair's gateway config that is not about providers and models."""
    return f"""
[server]
host = "127.0.0.1"
port = {port}

[storage]
url = "{storage_url}"

[log]
access_log = false
"""


def gateway_config(upstream: str, storage_url: str, port: int) -> str:
    """A full-checks gateway on the mock upstream (one model at the test prices)."""
    return (
        gateway_header(storage_url, port)
        + f"""
[[providers]]
name = "mock"
protocol = "openai"
base_url = "{upstream}"

[[models]]
id = "{BENCH_MODEL}"
provider = "mock"
input_per_mtok = 0.15
output_per_mtok = 0.60
"""
    )


def rows_in_order(rows: tuple[str, str], index: int) -> tuple[str, str]:
    """Round ``index``'s order: as given in even rounds, reversed in odd ones."""
    return rows if index % 2 == 0 else (rows[1], rows[0])


def pair_rate(slower_saturation_rps: float, target_rps: float) -> float:
    """The fixed rate of one kind: the target's, unless half of the slower row's saturation
    is lower (a rate both rows sustain without queueing deciding the p50)."""
    return float(min(target_rps, max(10, round(slower_saturation_rps / 2))))


def measure_pair(
    pair: Pair, opts: BenchOptions, redis: RedisProcess, keys: list[str], work: Path
) -> PairRuns:
    """Start the full mock and the gateway, measure both rows of ``pair``."""
    upstream_port, gateway_port = free_port(), free_port()
    config = work / f"{pair.name}.toml"
    config.write_text(pair.config(f"http://127.0.0.1:{upstream_port}", redis.url, gateway_port))
    mock = [*python_module("ratelimit_gw"), "mock-upstream", "--port", str(upstream_port)]
    mock.append("--no-request-log")
    gateway = [*python_module("ratelimit_gw"), "serve", "--config", str(config)]
    gateway += ["--workers", str(opts.workers)]
    url = f"http://127.0.0.1:{gateway_port}{pair.route}"
    rounds: list[Run] = []
    fixed: list[Run] = []
    rates: dict[str, float] = {}
    with (
        server_process(mock, upstream_port) as mock_pid,
        server_process(gateway, gateway_port, env=pair.env) as pid,
    ):
        workers = gateway_workers(pid, opts.workers)
        servers = sorted({pid, *workers})

        def meter() -> CpuMeter:
            return CpuMeter(servers, redis.process.pid, mock_pid)

        # Every key, both rows' models and their upstream connections used once, then
        # measure.
        for kind in KINDS:
            for row in pair.rows:
                run_wrk(url, pair.bodies[row][kind], keys, opts, "warm-up", kind, duration_s=1)
        for index in range(opts.rounds):
            for kind in KINDS:
                for row in rows_in_order(pair.rows, index):
                    cpu = meter()
                    cpu.start()
                    run = run_wrk(url, pair.bodies[row][kind], keys, opts, row, kind, round_=index)
                    run.extra |= cpu.per_request(run.requests)
                    rounds.append(run)
        for kind in KINDS:
            saturation = [
                statistics.median([r.rps for r in rounds if is_row(r, row, kind, len(keys))])
                for row in pair.rows
            ]
            rates[kind] = pair_rate(min(saturation), opts.target_rate_rps)
            for index in range(opts.rounds):
                for row in rows_in_order(pair.rows, index):
                    body = pair.bodies[row][kind]
                    run = fixed_rate_run(url, body, keys, rates[kind], opts, row, kind, meter())
                    run.extra["round"] = index
                    fixed.append(run)
        memory_mib = max(rss_mib(p) for p in workers)
    return PairRuns(rounds, fixed, rates, memory_mib)
