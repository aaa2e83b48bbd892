"""The pools section: one upstream key with ceilings vs a pool of four, on the full mock. Its
config and environment give the gateway what the section says, a gateway started with them
answers both rows, and its summary computes what it says (numbers not judged)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import pytest

from benchmarks.__main__ import build_parser
from benchmarks.accounts import create_keys
from benchmarks.bench import PLAIN_BODY, STREAM_BODY
from benchmarks.local_redis import free_port, start_redis
from benchmarks.pair import PairRuns, pair_rate, rows_in_order
from benchmarks.pools import (
    BODIES,
    KEY_ENV,
    KEY_RPM,
    KEY_TPM,
    MODELS,
    POOLS,
    ROUTE,
    pools_config,
    summarise_pools,
)
from benchmarks.processes import python_module, server_process
from benchmarks.report import render
from benchmarks.runs import SECTIONS, BenchOptions, Run
from ratelimit_gw.settings import ConfigError, parse_settings
from ratelimit_gw.upstream_pool import PoolKey, pool_of


def test_one_key_and_a_pool_of_four_every_key_with_ceilings_at_the_same_prices() -> None:
    settings = parse_settings(pools_config("http://127.0.0.1:9", "memory://", 8000), KEY_ENV)
    ceilings = (KEY_RPM, KEY_TPM)
    for row, count in (("one_key", 1), ("pool_of_4", 4)):
        model, provider_name, keys = MODELS[row]
        assert keys == count
        provider = settings.models[model].provider
        assert (provider.name, provider.protocol) == (provider_name, "openai")
        assert provider.base_url == "http://127.0.0.1:9"
        # The pool's own ceilings are the keys'; the provider sets none of its own.
        pool = pool_of(provider)
        names = tuple(f"key-{i}" for i in range(1, count + 1))
        assert pool.keys == tuple(PoolKey(n, *ceilings) for n in names)
        assert (pool.provider, pool.rpm, pool.tpm) == (provider_name, None, None)
        # Even the one key's pool is picked from on storage: it has a ceiling.
        assert pool.needs_storage
    # Ceilings the bench never reaches: the pick runs and never refuses.
    assert KEY_RPM >= 10**9 and KEY_TPM >= 10**12
    prices = {
        (m.input_nano_usd_per_mtok, m.output_nano_usd_per_mtok) for m in settings.models.values()
    }
    assert len(prices) == 1 and len(settings.models) == 2


def test_every_key_has_its_own_secret_set_only_in_the_gateways_environment() -> None:
    settings = parse_settings(pools_config("http://127.0.0.1:9", "memory://", 8000), KEY_ENV)
    sent = [key.headers for provider in settings.providers.values() for key in provider.keys]
    assert len(sent) == 5 == len(KEY_ENV) == len(set(KEY_ENV.values()))
    assert sorted(h["Authorization"] for h in sent) == sorted(
        f"Bearer {secret}" for secret in KEY_ENV.values()
    )
    assert POOLS.env == KEY_ENV
    # Without them the gateway would not start: the config names each variable.
    missing = dict(KEY_ENV)
    name = missing.popitem()[0]
    with pytest.raises(ConfigError, match=f"environment variable {name} is not set"):
        parse_settings(pools_config("http://127.0.0.1:9", "memory://", 8000), missing)


def test_both_rows_send_the_core_body_but_for_the_model() -> None:
    for kind, core in (("plain", PLAIN_BODY), ("stream", STREAM_BODY)):
        one, pool, base = (
            json.loads(b) for b in (BODIES["one_key"][kind], BODIES["pool_of_4"][kind], core)
        )
        assert one.pop("model") == "gpt-4o-mini-pool1"
        assert pool.pop("model") == "gpt-4o-mini-pool4"
        base.pop("model")
        assert one == pool == base
    # The same size of body, so the same bytes to read and relay.
    assert len(BODIES["one_key"]["plain"]) == len(BODIES["pool_of_4"]["plain"])
    assert POOLS.rows == ("one_key", "pool_of_4") and POOLS.route == ROUTE


def test_only_picks_the_pools_section() -> None:
    assert build_parser().parse_args(["--only", "pools"]).only == "pools"
    assert "pools" in SECTIONS
    assert rows_in_order(POOLS.rows, 0) == ("one_key", "pool_of_4")
    assert rows_in_order(POOLS.rows, 1) == ("pool_of_4", "one_key")
    assert pair_rate(1500.0, 1000.0) == 750.0


def _post(url: str, key: str, body: bytes) -> bytes:
    request = urllib.request.Request(url, data=body, method="POST")
    request.add_header("Authorization", f"Bearer {key}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        answer: bytes = response.read()
        return answer


@pytest.mark.slow  # a redis-server, the full mock and a gateway as subprocesses (~5 s)
def test_a_gateway_with_the_sections_config_and_environment_answers_both_rows(
    tmp_path: Path,
) -> None:
    redis = start_redis()
    try:
        key = asyncio.run(create_keys(redis.url, 1))[0]
        upstream_port, gateway_port = free_port(), free_port()
        config = tmp_path / "pools.toml"
        config.write_text(
            pools_config(f"http://127.0.0.1:{upstream_port}", redis.url, gateway_port)
        )
        mock = [*python_module("ratelimit_gw"), "mock-upstream", "--port", str(upstream_port)]
        gateway = [*python_module("ratelimit_gw"), "serve", "--config", str(config)]
        with (
            server_process(mock, upstream_port),
            server_process(gateway, gateway_port, env=KEY_ENV),
        ):
            # Each body twice: four requests a row, enough for the pool to use several keys.
            for row in POOLS.rows:
                for kind in ("plain", "stream", "plain", "stream"):
                    answer = _post(
                        f"http://127.0.0.1:{gateway_port}{ROUTE}", key, BODIES[row][kind]
                    )
                    assert (b"data: " in answer) == (kind == "stream")
            with urllib.request.urlopen(f"http://127.0.0.1:{upstream_port}/mock/requests") as r:
                logged = json.loads(r.read())
    finally:
        redis.stop()
    sent = {}
    for request in logged:
        model = json.loads(request["body"])["model"]
        sent.setdefault(model, set()).add(request["headers"]["authorization"])
    # Each row's requests reached the mock with its own provider's keys; the pool's with
    # more than one of them (the one with the most headroom each time, ties in turn).
    for model, provider, count in MODELS.values():
        secrets = {f"Bearer sk-bench-{provider}-{i}" for i in range(1, count + 1)}
        assert sent[model] <= secrets
        assert len(sent[model]) == 1 if count == 1 else len(sent[model]) > 1


def _run(row: str, kind: str, tool: str, rps: float, p50: float, p99: float, i: int) -> Run:
    extra = {"round": i, "server_cpu_us": 200.0 if row == "one_key" else 210.0}
    extra |= {"redis_cpu_us": 80.0 if row == "one_key" else 90.0, "upstream_cpu_us": 40.0}
    if tool == "fixed-rate":
        extra |= {"generator_lateness_p99_ms": 0.1, "generator_cpu_share": 0.05}
    return Run(row, kind, tool, 1000, rps, p50, p50, p99, 0, keys=10, extra=extra)


def test_the_summary_compares_the_pool_with_one_key_in_the_same_round() -> None:
    # Two rounds, the order alternating, the VM twice as fast in round 1 as in round 0.
    rounds = []
    fixed = []
    for i, speed in enumerate((1.0, 2.0)):
        for kind, share in (("plain", 0.95), ("stream", 0.85)):
            rows = [
                _run("one_key", kind, "wrk", 2000 * speed, 5, 9, i),
                _run("pool_of_4", kind, "wrk", 2000 * speed * share, 5, 9, i),
            ]
            rounds += rows if i == 0 else rows[::-1]
    for kind, rate, added in (("plain", 1000.0, (0.1, 0.3)), ("stream", 700.0, (-0.2, 0.0))):
        for i in (0, 1):
            fixed.append(_run("one_key", kind, "fixed-rate", rate, 2.0 + i, 4.0, i))
            fixed.append(_run("pool_of_4", kind, "fixed-rate", rate, 2.0 + i + added[i], 5.0, i))
    runs = PairRuns(rounds, fixed, {"plain": 1000.0, "stream": 700.0}, 75.0)
    section = summarise_pools(runs, BenchOptions())
    summary = section["summary"]
    assert summary["route"] == "/openai/v1/chat/completions"
    assert summary["models"] == {
        "one_key": {"model": "gpt-4o-mini-pool1", "provider": "mock-one-key", "keys": 1},
        "pool_of_4": {"model": "gpt-4o-mini-pool4", "provider": "mock-pool-of-4", "keys": 4},
    }
    assert summary["key_ceilings"] == {"rpm": 10**9, "tpm": 10**12}
    # A throughput target only; the added p50 is reported without one.
    assert summary["targets"] == {
        "gates": False,
        "throughput_pool_of_4_over_one_key": 0.9,
        "fixed_rate_rps": 1000.0,
    }
    plain, stream = summary["plain"], summary["stream"]
    # Ratios within a round, whatever the VM did between rounds.
    assert plain["throughput_pool_of_4_over_one_key"] == 0.95 and plain["throughput_target_met"]
    assert stream["throughput_pool_of_4_over_one_key"] == 0.85
    assert not stream["throughput_target_met"]
    assert plain["one_key_rps"] == 3000.0 and plain["pool_of_4_rps"] == 2850.0
    assert "added_p50_target_met" not in plain
    # Added p50: the median of the rounds' differences (two rounds: their mean).
    assert plain["fixed_rate"]["added_p50_ms"] == 0.2
    assert stream["fixed_rate"]["added_p50_ms"] == -0.1
    assert plain["fixed_rate"]["at_target_rate"] and not stream["fixed_rate"]["at_target_rate"]
    assert plain["fixed_rate"]["pool_of_4_cores_busy"] == 0.21
    assert plain["cpu_us_per_request"] == {
        "one_key": 200.0,
        "pool_of_4": 210.0,
        "one_key_redis": 80.0,
        "pool_of_4_redis": 90.0,
        "one_key_upstream": 40.0,
        "pool_of_4_upstream": 40.0,
        "pool_of_4_minus_one_key": 10.0,
    }
    # Eight rows: two rows, two kinds, two tools; the rounds kept in the JSON.
    assert len(section["runs"]) == 8 and len(section["rounds"]) == 16
    text = render({"pools": section})
    assert "pools: an OpenAI caller on POST /openai/v1/chat/completions" in text
    assert "pool_of_4 = gpt-4o-mini-pool4 (provider mock-pool-of-4: 4 upstream keys)" in text
    assert "one_key = gpt-4o-mini-pool1 (provider mock-one-key: 1 upstream key)" in text
    assert "pools targets (not gates): pool_of_4/one_key throughput >= 0.90" in text
    assert (
        "plain: pool_of_4/one_key throughput 0.95 (2850 vs 3000 req/s; target >= 0.90: met)" in text
    )
    assert "stream: pool_of_4/one_key throughput 0.85" in text and "NOT MET" in text
    assert "at 1000 req/s pool_of_4 adds latency p50 +0.200 ms, p99" in text
    assert "at 700 req/s (half saturation) pool_of_4 adds time to first byte p50 -0.100 ms" in text
    assert "gateway 200.0 / 210.0 (+10.0), Redis 80.0 / 90.0" in text
    assert "pools gateway worker RSS after the run: 75.0 MiB" in text
    assert "converter" not in text
