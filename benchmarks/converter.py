"""The converter section (issue 19, docs/converters.md): what translation costs a caller.

An OpenAI SDK caller on ``POST /openai/v1/chat/completions`` sends the same body (but for its
``model``) to two models of one full-checks gateway on the bench's Redis, with the same
prices:

* **native**: an OpenAI-protocol model, relayed as on the native route (bytes unchanged);
* **converted**: an Anthropic-protocol model: the request is translated into a Messages
  request, and the answer, whole or streamed, back into a chat completion.

Both go to the *full* mock upstream (``ratelimit-gw mock-upstream``: the lean mock speaks
only chat completions), which then answers in each model's protocol; ``pair.py`` measures
them (plain and streaming, ``wrk`` rounds in alternating order, one fixed rate, CPU per
request). The mock does different work for the two rows, on the same cores: its CPU per
request is in every row.

The summary sets converted/native throughput (the median of the ratios within a round) and
the p50 converted adds at the fixed rate (converted − native, the median over rounds) against
their targets (≥ 0.75, ≤ +1 ms), which are reported, never gates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .local_redis import RedisProcess
from .pair import KINDS, Pair, gateway_header, measure_pair, pair_rate, rows_in_order
from .report import summarise_converter
from .runs import CONVERTER_ROWS, BenchOptions, chat_body

ROUTE = "/openai/v1/chat/completions"
# Two models of the full mock at the same prices: one per protocol.
MODELS = {"native": ("gpt-4o-mini", "openai"), "converted": ("claude-sonnet-4-6", "anthropic")}
SCENARIOS = CONVERTER_ROWS
BODIES = {
    scenario: {kind: chat_body(model, stream=kind == "stream") for kind in KINDS}
    for scenario, (model, _) in MODELS.items()
}


def converter_config(upstream: str, storage_url: str, port: int) -> str:
    """A full-checks gateway: one provider per protocol, both on the one mock."""
    parts = [gateway_header(storage_url, port)]
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


CONVERTER = Pair(
    name="converter", rows=SCENARIOS, route=ROUTE, bodies=BODIES, config=converter_config
)


def round_order(index: int) -> tuple[str, ...]:
    """Native first in even rounds, converted first in odd ones."""
    return rows_in_order(SCENARIOS, index)


# The fixed rate of one kind: the target's, or half of the slower row's saturation if lower.
converter_rate = pair_rate


def run_converter(
    opts: BenchOptions, redis: RedisProcess, keys: list[str], work: Path
) -> dict[str, Any]:
    """Start the full mock and the gateway, measure both rows; rows and summary."""
    runs = measure_pair(CONVERTER, opts, redis, keys, work)
    return summarise_converter(
        runs.rounds, runs.fixed, runs.rates, runs.memory_mib, opts, route=ROUTE, models=MODELS
    )
