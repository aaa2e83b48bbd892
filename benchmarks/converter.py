"""The converter section (issue 19, docs/converters.md): what translation costs a caller.

An OpenAI SDK caller on ``POST /openai/v1/chat/completions`` sends the same body (but for its
``model``) to two models of one full-checks gateway on the bench's Redis, with the same
prices:

* **native**: an OpenAI-protocol model, relayed as on the native route (bytes unchanged);
* **converted**: an Anthropic-protocol model: the request is translated into a Messages
  request, and the answer, whole or streamed, back into a chat completion.

Both go to the *full* mock upstream (``ratelimit-gw mock-upstream``: the lean mock speaks
only chat completions), which then answers in each model's protocol. Plain and streaming,
each round measures the two back to back, the order alternating from round to round:

* saturation with ``wrk``: a row is the median of its rounds, converted/native the median of
  the ratios within a round;
* latency at one fixed rate with the open-loop generator (streams: time to first byte): the
  target's rate (``--target-rate``), or half of the slower row's saturation if that is lower
  (a rate both sustain: at half of ``wrk``'s saturation a gateway is already ~0.8 busy);
  converted − native, the median over rounds of each round's difference.

Every row has its on-CPU microseconds per request: the gateway's, Redis's, and the mock's,
which does different work for the two rows and shares the cores. The summary sets
converted/native throughput and the added p50 against their targets (≥ 0.75, ≤ +1 ms),
which are reported, never gates.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .load import fixed_rate_run, run_wrk
from .local_redis import RedisProcess, free_port
from .processes import CpuMeter, gateway_workers, python_module, rss_mib, server_process
from .report import is_row, summarise_converter
from .runs import BenchOptions, Run, chat_body

ROUTE = "/openai/v1/chat/completions"
# Two models of the full mock at the same prices: one per protocol.
MODELS = {"native": ("gpt-4o-mini", "openai"), "converted": ("claude-sonnet-4-6", "anthropic")}
SCENARIOS = tuple(MODELS)
KINDS = ("plain", "stream")
BODIES = {
    scenario: {kind: chat_body(model, stream=kind == "stream") for kind in KINDS}
    for scenario, (model, _) in MODELS.items()
}


def converter_config(upstream: str, storage_url: str, port: int) -> str:
    """A full-checks gateway: one provider per protocol, both on the one mock."""
    parts = [
        f"""
[server]
host = "127.0.0.1"
port = {port}

[storage]
url = "{storage_url}"

[log]
access_log = false
"""
    ]
    for model, protocol in MODELS.values():
        parts.append(
            f"""
[[providers]]
name = "mock-{protocol}"
protocol = "{protocol}"
base_url = "{upstream}"

[[models]]
id = "{model}"
provider = "mock-{protocol}"
input_per_mtok = 0.15
output_per_mtok = 0.60
"""
        )
    return "".join(parts)


def round_order(index: int) -> tuple[str, ...]:
    """Native first in even rounds, converted first in odd ones: neither row is always the
    one measured right after the other (on a warmer or a more tired machine)."""
    return SCENARIOS if index % 2 == 0 else SCENARIOS[::-1]


def converter_rate(slower_saturation_rps: float, target_rps: float) -> float:
    """The fixed rate of one kind: the target's, unless half of the slower row's saturation
    is lower (a rate both rows sustain without queueing deciding the p50)."""
    return float(min(target_rps, max(10, round(slower_saturation_rps / 2))))


def run_converter(
    opts: BenchOptions, redis: RedisProcess, keys: list[str], work: Path
) -> dict[str, Any]:
    """Start the full mock and the gateway, measure both rows; rows and summary."""
    upstream_port, gateway_port = free_port(), free_port()
    config = work / "converter.toml"
    config.write_text(
        converter_config(f"http://127.0.0.1:{upstream_port}", redis.url, gateway_port)
    )
    mock = [*python_module("ratelimit_gw"), "mock-upstream", "--port", str(upstream_port)]
    mock.append("--no-request-log")
    gateway = [*python_module("ratelimit_gw"), "serve", "--config", str(config)]
    gateway += ["--workers", str(opts.workers)]
    url = f"http://127.0.0.1:{gateway_port}{ROUTE}"
    rounds: list[Run] = []
    fixed: list[Run] = []
    rates: dict[str, float] = {}
    with (
        server_process(mock, upstream_port) as mock_pid,
        server_process(gateway, gateway_port) as pid,
    ):
        workers = gateway_workers(pid, opts.workers)
        servers = sorted({pid, *workers})

        def meter() -> CpuMeter:
            return CpuMeter(servers, redis.process.pid, mock_pid)

        # Every key and both upstream protocols used once (the key cache, the pooled
        # upstream connections), then measure.
        for kind in KINDS:
            for scenario in SCENARIOS:
                run_wrk(url, BODIES[scenario][kind], keys, opts, "warm-up", kind, duration_s=1)
        for index in range(opts.rounds):
            for kind in KINDS:
                for scenario in round_order(index):
                    cpu = meter()
                    cpu.start()
                    run = run_wrk(
                        url, BODIES[scenario][kind], keys, opts, scenario, kind, round_=index
                    )
                    run.extra |= cpu.per_request(run.requests)
                    rounds.append(run)
        for kind in KINDS:
            saturation = [
                statistics.median([r.rps for r in rounds if is_row(r, s, kind, len(keys))])
                for s in SCENARIOS
            ]
            rates[kind] = converter_rate(min(saturation), opts.target_rate_rps)
            for index in range(opts.rounds):
                for scenario in round_order(index):
                    body = BODIES[scenario][kind]
                    run = fixed_rate_run(
                        url, body, keys, rates[kind], opts, scenario, kind, meter()
                    )
                    run.extra["round"] = index
                    fixed.append(run)
        memory_mib = max(rss_mib(p) for p in workers)
    return summarise_converter(rounds, fixed, rates, memory_mib, opts, route=ROUTE, models=MODELS)
