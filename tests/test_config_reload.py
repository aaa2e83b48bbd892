"""Reloading the configuration of a running gateway (SIGHUP, the admin API), on real
`ratelimit-gw serve` processes and in-process gateways: under a steady load no request fails,
requests after the reload are charged at the new price, may use the new model and provider and
go to a key added to the pool,
a stream started before it settles at the old price, an invalid file changes nothing, and one
SIGHUP to a `--workers` pool reloads every worker."""

from __future__ import annotations

import asyncio
import hashlib
import re
import signal
import subprocess
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from benchmarks.local_redis import free_port
from ratelimit_gw.services import SERVICES
from ratelimit_gw.storage import Storage

from .conftest import (
    ADMIN_TOKEN,
    UPSTREAM_KEY,
    Upstream,
    gateway_config,
    start_gateway,
    toml_document,
)
from .processes import (
    fresh_account_key,
    serve_env,
    start_serve,
    stop,
    until_each_worker_answers,
    wait_ready,
)
from .redis_process import RedisProcess

# The tests that run `serve` subprocesses on a real Redis are marked slow one by one.

OLD_PRICES = (Decimal("0.15"), Decimal("0.60"))  # USD per Mtok: input, output
NEW_PRICES = (Decimal("1.50"), Decimal("6.00"))
SECOND_KEY = "sk-second-upstream-key-0123456789"  # in the environment from the start
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CHAT = {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


def config_toml(
    upstream_url: str,
    storage_url: str,
    prices: tuple[Decimal, Decimal],
    *,
    extra: str = "",
    added_key: bool = False,
) -> str:
    """gpt-4o-mini at ``prices`` on the mock; ``added_key``: its provider is a pool of two
    upstream keys (the first file's, and the second key) instead of one."""
    credential = POOL_OF_TWO if added_key else 'api_key_env = "RLGW_TEST_UPSTREAM_KEY"'
    return f"""
[storage]
url = "{storage_url}"

[[providers]]
name = "mock"
protocol = "openai"
base_url = "{upstream_url}"
{credential}

[[models]]
id = "gpt-4o-mini"
provider = "mock"
input_per_mtok = "{prices[0]}"
output_per_mtok = "{prices[1]}"
{extra}"""


# A provider with a key the first file did not use, and a model on it.
POOL_OF_TWO = """
[[providers.keys]]
name = "first"
api_key_env = "RLGW_TEST_UPSTREAM_KEY"
[[providers.keys]]
name = "added"
api_key_env = "RLGW_TEST_SECOND_KEY"
"""
SECOND_PROVIDER = """
[[providers]]
name = "mock-second"
protocol = "openai"
base_url = "{upstream_url}"
api_key_env = "RLGW_TEST_SECOND_KEY"

[[models]]
id = "gpt-4o"
provider = "mock-second"
input_per_mtok = "2.50"
output_per_mtok = "10.00"
"""


def metric(exposition: str, name: str, labels: str) -> float:
    pattern = re.compile(rf"^{name}\{{([^}}]*)\}} ([0-9.e+]+)$", re.M)
    return sum(float(v) for found, v in pattern.findall(exposition) if labels in found)


class Load:
    """A few callers sending chat requests back to back (bounded: one request each at a time)
    until stopped; every answer kept as (request id, sent at, answered at, status)."""

    def __init__(self, http: aiohttp.ClientSession, base: str, key: str) -> None:
        self._http, self._base, self._key = http, base, key
        self._stop = asyncio.Event()
        self.answers: list[tuple[str, float, float, int]] = []
        self._tasks = [asyncio.create_task(self._caller()) for _ in range(4)]

    async def _caller(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            async with self._http.post(
                f"{self._base}/v1/chat/completions",
                json=CHAT,
                headers={"Authorization": f"Bearer {self._key}"},
            ) as response:
                await response.read()
                status, request_id = response.status, response.headers["x-request-id"]
            self.answers.append((request_id, sent, time.monotonic(), status))

    async def stop(self) -> None:
        """Stop the callers (each after its request in flight); a caller's error is raised."""
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def __aenter__(self) -> Load:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:  # on a failure: no caller outlives the test
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def reloads(http: aiohttp.ClientSession, base: str, outcome: str) -> float:
    async with http.get(f"{base}/metrics") as response:
        return metric(await response.text(), "rlgw_config_reloads_total", f'outcome="{outcome}"')


async def until_reloads(
    http: aiohttp.ClientSession, base: str, outcome: str, count: float
) -> float:
    """Wait until ``count`` reloads with ``outcome`` are counted; the time it was seen."""
    deadline = time.monotonic() + 10
    while await reloads(http, base, outcome) < count:
        assert time.monotonic() < deadline, f"no {outcome} reload counted"
        await asyncio.sleep(0.05)
    return time.monotonic()


async def charges(
    http: aiohttp.ClientSession, base: str, request_ids: list[str]
) -> dict[str, dict[str, Any]]:
    """The account's settlements by request id, from the admin API's ledger, once those of
    ``request_ids`` are all there (a request settles just after its answer)."""
    deadline = time.monotonic() + 10
    while True:
        async with http.get(f"{base}/admin/accounts/acme/ledger?limit=10000", headers=ADMIN) as r:
            assert r.status == 200
            entries = (await r.json())["data"]
        settled = {e["request_id"]: e for e in entries if e.get("cost_usd") is not None}
        missing = set(request_ids) - set(settled)
        if not missing:
            return settled
        assert time.monotonic() < deadline, f"not settled: {sorted(missing)}"
        await asyncio.sleep(0.1)


def charged_at(entry: dict[str, Any], prices: tuple[Decimal, Decimal]) -> bool:
    expected = (entry["input_tokens"] * prices[0] + entry["output_tokens"] * prices[1]) / 10**6
    return abs(Decimal(entry["cost_usd"]) - expected) <= Decimal("0.000000001")


def start(config: Path, log: Path, *args: str, port: int) -> subprocess.Popen[Any]:
    env = serve_env(pool=bool(args), RLGW_ADMIN_TOKEN=ADMIN_TOKEN, RLGW_TEST_SECOND_KEY=SECOND_KEY)
    with log.open("wb") as out:
        return start_serve(config, *args, port=port, env=env, stdout=out, stderr=out)


@pytest.mark.slow
async def test_a_reload_under_load_changes_prices_and_models_and_fails_no_request(
    upstream: Upstream, redis_server: RedisProcess, tmp_path: Path
) -> None:
    key = await fresh_account_key(redis_server.url)
    config = tmp_path / "gateway.toml"
    config.write_text(config_toml(upstream.url, redis_server.url, OLD_PRICES))
    log, port = tmp_path / "serve.log", free_port()
    process = start(config, log, port=port)
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ready([base], process=process, log=log)
        async with aiohttp.ClientSession() as http:
            async with Load(http, base, key) as load:
                # A stream that starts on the old configuration and ends after the reload.
                stream = await http.post(
                    f"{base}/v1/chat/completions",
                    json={**CHAT, "stream": True, "stream_options": {"include_usage": True}},
                    headers={
                        "Authorization": f"Bearer {key}",
                        "x-mock-chunks": "5",
                        "x-mock-chunk-delay-ms": "300",
                    },
                )
                await stream.content.readline()  # its first bytes: it has started
                await asyncio.sleep(0.5)

                config.write_text(
                    config_toml(
                        upstream.url,
                        redis_server.url,
                        NEW_PRICES,
                        extra=SECOND_PROVIDER.format(upstream_url=upstream.url),
                        added_key=True,
                    )
                )
                signalled = time.monotonic()
                process.send_signal(signal.SIGHUP)
                applied = await until_reloads(http, base, "ok", 1)
                await asyncio.sleep(0.5)

                # The key added to the pool takes its turn (ties rotate between the two).
                upstream.state.clear()
                await asyncio.sleep(0.3)
                credentials = {
                    r.headers["authorization"]
                    for r in upstream.state.requests
                    if r.json()["model"] == "gpt-4o-mini"
                }
                assert credentials == {f"Bearer {UPSTREAM_KEY}", f"Bearer {SECOND_KEY}"}

                # The new model on the new provider, with the key the first file did not use.
                upstream.state.clear()
                async with http.post(
                    f"{base}/v1/chat/completions",
                    json={**CHAT, "model": "gpt-4o"},
                    headers={"Authorization": f"Bearer {key}"},
                ) as response:
                    assert response.status == 200, await response.text()
                [sent] = [r for r in upstream.state.requests if r.json()["model"] == "gpt-4o"]
                assert sent.headers["authorization"] == f"Bearer {SECOND_KEY}"

                await stream.read()
                assert stream.status == 200
                stream_id = stream.headers["x-request-id"]
                stream.release()

                # An invalid file: nothing changes, the failure is counted and names the field.
                config.write_text(
                    config_toml(upstream.url, redis_server.url, (Decimal("-1"), Decimal(0)))
                )
                process.send_signal(signal.SIGHUP)
                await until_reloads(http, base, "failed", 1)
                async with http.post(f"{base}/admin/config/reload", headers=ADMIN) as response:
                    refused = await response.json()
                    assert response.status == 400, refused
                assert refused["error"]["reason"] == "invalid_config"
                assert "models[0].input_per_mtok" in refused["error"]["message"]
                assert await reloads(http, base, "failed") == 2
                after_invalid = time.monotonic()
                await asyncio.sleep(0.5)
                await load.stop()

            ledger = await charges(http, base, [rid for rid, *_ in load.answers] + [stream_id])
    finally:
        stop(process)
    output = log.read_text(errors="replace")
    assert "config reload failed: models[0].input_per_mtok" in output
    assert SECOND_KEY not in output and "sk-upstream" not in output

    statuses = [status for *_, status in load.answers]
    assert statuses and set(statuses) == {200}, statuses
    old = [rid for rid, _, answered, _ in load.answers if answered < signalled]
    new = [rid for rid, sent, _, _ in load.answers if sent > applied]
    kept = [rid for rid, sent, _, _ in load.answers if sent > after_invalid]
    assert old and new and kept
    assert all(charged_at(ledger[rid], OLD_PRICES) for rid in old)
    assert all(charged_at(ledger[rid], NEW_PRICES) for rid in new)  # the invalid file included
    assert charged_at(ledger[stream_id], OLD_PRICES)  # started before the reload
    assert ledger[stream_id]["output_tokens"] > 0


@pytest.mark.slow
async def test_the_admin_endpoint_reloads_and_says_what_changed(
    upstream: Upstream, redis_server: RedisProcess, tmp_path: Path
) -> None:
    key = await fresh_account_key(redis_server.url)
    config = tmp_path / "gateway.toml"
    config.write_text(config_toml(upstream.url, redis_server.url, OLD_PRICES))
    log, port = tmp_path / "serve.log", free_port()
    process = start(config, log, port=port)
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ready([base], process=process, log=log)
        async with aiohttp.ClientSession() as http:
            async with Load(http, base, key) as load:
                await asyncio.sleep(0.3)
                config.write_text(
                    config_toml(
                        upstream.url,
                        redis_server.url,
                        NEW_PRICES,
                        extra=SECOND_PROVIDER.format(upstream_url=upstream.url)
                        + "\n[server]\nport = 1\n",
                    )
                )
                async with http.post(f"{base}/admin/config/reload", headers=ADMIN) as response:
                    answer = await response.json()
                    assert response.status == 200, answer
                applied = time.monotonic()
                await asyncio.sleep(0.5)
                await load.stop()
            async with http.get(f"{base}/metrics") as response:
                exposition = await response.text()
            ledger = await charges(http, base, [rid for rid, *_ in load.answers])
    finally:
        stop(process)
    assert answer["added"] == ["providers/mock-second", "models/gpt-4o"]
    assert answer["changed"] == ["models/gpt-4o-mini"]
    assert answer["removed"] == []
    assert answer["needs_restart"] == ["server.port"]  # still serving on its port, above
    assert answer["digest"] != answer["previous_digest"]
    assert metric(exposition, "rlgw_config_info", f'digest="{answer["digest"]}"') == 1
    assert metric(exposition, "rlgw_config_info", f'digest="{answer["previous_digest"]}"') == 0
    assert "server.port changed in the file but needs a restart" in log.read_text()
    assert {status for *_, status in load.answers} == {200}
    new = [rid for rid, sent, _, _ in load.answers if sent > applied]
    assert new and all(charged_at(ledger[rid], NEW_PRICES) for rid in new)


@pytest.mark.slow
@pytest.mark.parametrize("trigger", ["sighup", "admin_api"])
async def test_one_reload_of_a_worker_pool_reloads_every_worker(
    upstream: Upstream, redis_server: RedisProcess, tmp_path: Path, trigger: str
) -> None:
    """One SIGHUP to the parent, or one admin call that a single worker answers."""
    key = await fresh_account_key(redis_server.url)
    port = free_port()
    config = tmp_path / "gateway.toml"
    server = f"\n[server]\nport = {port}\n"
    config.write_text(config_toml(upstream.url, redis_server.url, OLD_PRICES, extra=server))
    log = tmp_path / "pool.log"
    pool = start(config, log, "--workers", "2", port=port)
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ready([base], 30, process=pool, log=log)
        # A new connection per request lets the kernel spread them over both workers.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            workers = await until_each_worker_answers(http, base, pool.pid)
            new_file = config_toml(upstream.url, redis_server.url, NEW_PRICES, extra=server)
            config.write_text(new_file)
            if trigger == "sighup":
                pool.send_signal(signal.SIGHUP)
                await until_reloads(http, base, "ok", 2)  # the pool's sum: both workers
            else:
                async with http.post(f"{base}/admin/config/reload", headers=ADMIN) as response:
                    assert response.status == 200, await response.text()
                    assert (await response.json())["changed"] == ["models/gpt-4o-mini"]
                # The answering worker, then the SIGHUP its parent sent to both (a no-op on
                # the one that already runs the file).
                await until_reloads(http, base, "ok", 3)
            async with http.get(f"{base}/metrics") as response:
                exposition = await response.text()
            request_ids = []
            for _ in range(20):
                async with http.post(
                    f"{base}/v1/chat/completions",
                    json=CHAT,
                    headers={"Authorization": f"Bearer {key}"},
                ) as response:
                    assert response.status == 200
                    request_ids.append(response.headers["x-request-id"])
            ledger = await charges(http, base, request_ids)
    finally:
        stop(pool, 20)
    assert pool.returncode == 0  # the SIGHUP ended neither the pool nor a worker
    # Each worker runs on the new file: its digest is 1 in its own series.
    digest = hashlib.sha256(new_file.encode()).hexdigest()[:12]
    for pid in workers:
        assert metric(exposition, "rlgw_config_info", f'digest="{digest}",pid="{pid}"') == 1
    assert all(charged_at(ledger[rid], NEW_PRICES) for rid in request_ids)


async def test_an_invalid_file_keeps_the_running_config_and_names_the_field(
    upstream: Upstream, storage: Storage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config_file = tmp_path / "gateway.toml"
    env = {"RLGW_ADMIN_TOKEN": ADMIN_TOKEN}
    runner, gw = await start_gateway(upstream, storage, env, config_file=config_file)
    svc = gw.app[SERVICES]
    running = svc.config
    try:
        config = gateway_config(upstream.url, storage.url)
        config["models"][1]["output_per_mtok"] = "ten dollars"
        config_file.write_text(toml_document(config))
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{gw.url}/admin/config/reload", headers=ADMIN) as response,
        ):
            refused = await response.json()
        assert response.status == 400
        assert svc.config is running
        assert refused["error"]["reason"] == "invalid_config"
        assert "models[1].output_per_mtok" in refused["error"]["message"]
        [failure] = [r for r in caplog.records if r.levelname == "ERROR"]
        assert failure.getMessage().startswith("config reload failed: models[1].output_per_mtok")
        async with aiohttp.ClientSession() as http, http.get(f"{gw.url}/metrics") as response:
            exposition = await response.text()
        assert metric(exposition, "rlgw_config_reloads_total", 'outcome="failed"') == 1
        assert metric(exposition, "rlgw_config_reloads_total", 'outcome="ok"') == 0
    finally:
        await runner.cleanup()


async def test_a_reload_replaces_the_config_whole_and_leaves_the_old_one_as_it_was(
    upstream: Upstream, storage: Storage, tmp_path: Path
) -> None:
    config_file = tmp_path / "gateway.toml"
    env = {"RLGW_ADMIN_TOKEN": ADMIN_TOKEN}
    runner, gw = await start_gateway(upstream, storage, env, config_file=config_file)
    svc = gw.app[SERVICES]
    started = svc.config  # what a request that started before the reload holds
    try:
        config = gateway_config(upstream.url, storage.url)
        config["models"][0]["input_per_mtok"] = "1.50"
        del config["models"][1]
        config_file.write_text(toml_document(config))
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{gw.url}/admin/config/reload", headers=ADMIN) as response,
        ):
            answer = await response.json()
        assert response.status == 200, answer
    finally:
        await runner.cleanup()
    assert (answer["changed"], answer["removed"], answer["added"]) == (
        ["models/gpt-4o-mini"],
        ["models/gpt-4o"],
        [],
    )
    assert svc.config.settings.models["gpt-4o-mini"].input_nano_usd_per_mtok == 1_500_000_000
    assert svc.config.catalog.find("gpt-4o-mini") is svc.config.settings.models["gpt-4o-mini"]
    assert started.settings.models["gpt-4o-mini"].input_nano_usd_per_mtok == 150_000_000
    assert started.catalog.find("gpt-4o").id == "gpt-4o"
    # The port the gateway listens on was 0 in the file and still is: nothing to restart.
    assert answer["needs_restart"] == []
