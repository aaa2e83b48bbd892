"""No overspend under concurrency (§5): many more concurrent requests than the balance can
pay for, on a real Redis, through one gateway and across two gateway processes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from ratelimit_gw.accounts import AccountStore
from ratelimit_gw.money import cost_nano, format_usd
from ratelimit_gw.protocols import input_token_bound
from ratelimit_gw.settings import StorageSettings
from ratelimit_gw.storage import Storage, open_storage

from .conftest import MODELS, Gateway, Upstream, start_gateway
from .processes import gateway_processes, wait_ready
from .redis_process import RedisProcess

pytestmark = pytest.mark.slow  # runs gateway subprocesses under concurrent load

BODY = b'{"model":"gpt-4o-mini","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}'
_, _, IN_USD, OUT_USD = MODELS[0]
IN_NANO, OUT_NANO = int(float(IN_USD) * 1e9), int(float(OUT_USD) * 1e9)
HOLD_NANO = cost_nano(input_token_bound(len(BODY)), 100, IN_NANO, OUT_NANO)
# The mock takes this long to answer, so every request is decided while all holds are live.
UPSTREAM_LATENCY_MS = 3000


async def _fire(urls: list[str], key: str, count: int) -> list[int]:
    headers = {
        "Authorization": f"Bearer {key}",
        "content-type": "application/json",
        "x-mock-latency-ms": str(UPSTREAM_LATENCY_MS),
    }
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> int:
            url = urls[i % len(urls)] + "/v1/chat/completions"
            async with session.post(url, data=BODY, headers=headers) as response:
                await response.read()
                return response.status

        return list(await asyncio.gather(*(one(i) for i in range(count))))


async def _settled(accounts: AccountStore, account: str) -> None:
    deadline = time.monotonic() + 20
    while (await accounts.get_account(account)).holds_live:
        assert time.monotonic() < deadline, "holds were not released"
        await asyncio.sleep(0.05)


async def _assert_books_balance(accounts: AccountStore, account: str, start_nano: int) -> None:
    state = await accounts.get_account(account)
    ledger = await accounts.ledger(account, limit=10_000)
    charges = [e for e in ledger if e.type in ("charge", "release")]
    charged_nano = sum(round(float(e.cost_usd or "0") * 1e9) for e in charges)
    assert not state.balance_usd.startswith("-")
    assert state.held_usd == "0.00"
    assert format_usd(start_nano - charged_nano) == state.balance_usd


@pytest.fixture
async def redis_storage(redis_server: RedisProcess) -> AsyncIterator[Storage]:
    storage = open_storage(StorageSettings(url=redis_server.url))
    await storage.call("FLUSHALL")
    try:
        yield storage
    finally:
        await storage.close()


async def test_balance_for_k_requests_admits_exactly_k_of_many_concurrent(
    upstream: Upstream, redis_storage: Storage
) -> None:
    runner, gateway = await start_gateway(upstream, redis_storage)
    try:
        k = 37
        start_nano = k * HOLD_NANO + HOLD_NANO - 1  # one nano-USD short of a 38th request
        key = await _new_prepaid_key(gateway, start_nano)
        statuses = await _fire([gateway.url], key, 220)
        assert statuses.count(200) == k
        assert statuses.count(402) == 220 - k
        await _settled(gateway.accounts, "acme")
        await _assert_books_balance(gateway.accounts, "acme", start_nano)
    finally:
        await runner.cleanup()


async def _new_prepaid_key(gateway: Gateway, balance_nano: int) -> str:
    await gateway.accounts.create_account("acme", balance_nano=balance_nano)
    return (await gateway.accounts.create_key("acme")).key


def _config(upstream_url: str, storage_url: str) -> str:
    return f"""
[storage]
url = "{storage_url}"

[[providers]]
name = "mock"
protocol = "openai"
base_url = "{upstream_url}"
api_key_env = "RLGW_TEST_UPSTREAM_KEY"

[[models]]
id = "gpt-4o-mini"
provider = "mock"
input_per_mtok = {IN_USD}
output_per_mtok = {OUT_USD}
"""


@pytest.fixture
def two_gateway_processes(
    upstream: Upstream, redis_server: RedisProcess, tmp_path: Path
) -> Iterator[list[str]]:
    config = tmp_path / "gateway.toml"
    config.write_text(_config(upstream.url, redis_server.url))
    with gateway_processes(config, 2, tmp_path / "gateways.log") as urls:
        yield urls


async def test_two_gateway_processes_never_overspend_together(
    two_gateway_processes: list[str], redis_storage: Storage
) -> None:
    await wait_ready(two_gateway_processes)
    accounts = AccountStore(redis_storage)
    k = 41
    start_nano = k * HOLD_NANO + HOLD_NANO - 1
    await accounts.create_account("acme", balance_nano=start_nano)
    key = (await accounts.create_key("acme")).key
    statuses = await _fire(two_gateway_processes, key, 240)
    assert statuses.count(200) == k
    assert statuses.count(402) == 240 - k
    await _settled(accounts, "acme")
    await _assert_books_balance(accounts, "acme", start_nano)
