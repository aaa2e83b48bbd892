"""The pools section (issue 21, SPEC §14): what picking among a provider's upstream keys costs.

An OpenAI caller on ``POST /openai/v1/chat/completions`` sends the same body (but for its
``model``) to two models of one full-checks gateway on the bench's Redis, with the same
prices, both OpenAI protocol on the full mock:

* **one_key**: a model whose provider has one upstream key (``[[providers.keys]]``, one
  entry) with its own rpm/tpm ceilings;
* **pool_of_4**: a model whose provider has four such keys.

Every key's ceilings are far above what the bench can send (``KEY_RPM``, ``KEY_TPM``): each
request's pick-and-reserve step runs and always finds room, so the rows differ only in the
pool's size, never in refusals. The keys' secrets are distinct (the config refuses one secret
under two names), set in the gateway's environment only. ``pair.py`` measures the rows.

The summary sets pool_of_4/one_key throughput (the median of the ratios within a round)
against its target (≥ 0.90: reported, never a gate), and reports the p50 the pool adds at
the fixed rate (pool_of_4 − one_key, the median over rounds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .local_redis import RedisProcess
from .pair import KINDS, Pair, PairRuns, gateway_header, measure_pair
from .pair_report import FULL_MOCK, summarise_pair
from .runs import POOLS_ROWS, POOLS_THROUGHPUT_FLOOR, BenchOptions, chat_body

ROUTE = "/openai/v1/chat/completions"
# Each key's own ceilings: high enough never to refuse during the bench.
KEY_RPM = 10**9
KEY_TPM = 10**12
# Each row: its model (the same length of name, so the same body size), its provider, and how
# many upstream keys that provider holds.
MODELS = {
    "one_key": ("gpt-4o-mini-pool1", "mock-one-key", 1),
    "pool_of_4": ("gpt-4o-mini-pool4", "mock-pool-of-4", 4),
}
BODIES = {
    row: {kind: chat_body(model, stream=kind == "stream") for kind in KINDS}
    for row, (model, _, _) in MODELS.items()
}


def key_env_name(provider: str, index: int) -> str:
    """The environment variable holding key ``index`` of ``provider``'s pool."""
    return f"RLGW_BENCH_UPSTREAM_{provider.upper().replace('-', '_')}_{index}"


# The gateway's environment: one distinct secret per key of either provider.
KEY_ENV = {
    key_env_name(provider, index): f"sk-bench-{provider}-{index}"
    for _, provider, count in MODELS.values()
    for index in range(1, count + 1)
}


def pools_config(upstream: str, storage_url: str, port: int) -> str:
    """A full-checks gateway: two OpenAI providers on the one mock, one with one key, one with
    four, every key with its own ceilings."""
    parts = [gateway_header(storage_url, port)]
    for model, provider, count in MODELS.values():
        parts.append(
            f"""
[[providers]]
name = "{provider}"
protocol = "openai"
base_url = "{upstream}"
"""
        )
        for index in range(1, count + 1):
            parts.append(
                f"""
[[providers.keys]]
name = "key-{index}"
api_key_env = "{key_env_name(provider, index)}"
rpm = {KEY_RPM}
tpm = {KEY_TPM}
"""
            )
        parts.append(
            f"""
[[models]]
id = "{model}"
provider = "{provider}"
input_per_mtok = 0.15
output_per_mtok = 0.60
"""
        )
    return "".join(parts)


POOLS = Pair(
    name="pools", rows=POOLS_ROWS, route=ROUTE, bodies=BODIES, config=pools_config, env=KEY_ENV
)


def summarise_pools(runs: PairRuns, opts: BenchOptions) -> dict[str, Any]:
    """The pools section's rows and summary: pool_of_4/one_key throughput beside its target,
    the p50 the pool adds, CPU per request."""
    head = {
        "route": ROUTE,
        "models": {
            row: {"model": model, "provider": provider, "keys": count}
            for row, (model, provider, count) in MODELS.items()
        },
        "key_ceilings": {"rpm": KEY_RPM, "tpm": KEY_TPM},
        "upstream": FULL_MOCK,
    }
    return summarise_pair(
        runs.rounds,
        runs.fixed,
        runs.rates,
        runs.memory_mib,
        opts,
        rows=POOLS_ROWS,
        head=head,
        throughput_floor=POOLS_THROUGHPUT_FLOOR,
    )


def run_pools(
    opts: BenchOptions, redis: RedisProcess, keys: list[str], work: Path
) -> dict[str, Any]:
    """Start the full mock and the gateway, measure both rows; rows and summary."""
    return summarise_pools(measure_pair(POOLS, opts, redis, keys, work), opts)
