"""No overspend under concurrency (§5): many more concurrent requests than the balance can
pay for, on a real Redis, through one gateway and across two gateway processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ratelimit_gw.accounts import AccountStore
from ratelimit_gw.money import cost_nano, format_usd
from ratelimit_gw.protocols import input_token_bound
from ratelimit_gw.storage import Storage

from .concurrent_admission import fire, gateway_processes_on, holds_released
from .conftest import MODELS, Gateway, Upstream, start_gateway
from .processes import wait_ready
from .redis_process import RedisProcess

pytestmark = pytest.mark.slow  # runs gateway subprocesses under concurrent load

BODY = b'{"model":"gpt-4o-mini","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}'
_, _, IN_USD, OUT_USD = MODELS[0]
IN_NANO, OUT_NANO = int(float(IN_USD) * 1e9), int(float(OUT_USD) * 1e9)
HOLD_NANO = cost_nano(input_token_bound(len(BODY)), 100, IN_NANO, OUT_NANO)
# The mock takes this long to answer, so every request is decided while all holds are live.
UPSTREAM_LATENCY_MS = 3000


async def _assert_books_balance(accounts: AccountStore, account: str, start_nano: int) -> None:
    state = await accounts.get_account(account)
    ledger = await accounts.ledger(account, limit=10_000)
    charges = [e for e in ledger if e.type in ("charge", "release")]
    charged_nano = sum(round(float(e.cost_usd or "0") * 1e9) for e in charges)
    assert not state.balance_usd.startswith("-")
    assert state.held_usd == "0.00"
    assert format_usd(start_nano - charged_nano) == state.balance_usd


async def test_balance_for_k_requests_admits_exactly_k_of_many_concurrent(
    upstream: Upstream, redis_storage: Storage
) -> None:
    runner, gateway = await start_gateway(upstream, redis_storage)
    try:
        k = 37
        start_nano = k * HOLD_NANO + HOLD_NANO - 1  # one nano-USD short of a 38th request
        key = await _new_prepaid_key(gateway, start_nano)
        statuses = await fire([gateway.url], key, 220, BODY, latency_ms=UPSTREAM_LATENCY_MS)
        assert statuses.count(200) == k
        assert statuses.count(402) == 220 - k
        await holds_released(gateway.accounts, "acme")
        await _assert_books_balance(gateway.accounts, "acme", start_nano)
    finally:
        await runner.cleanup()


async def _new_prepaid_key(gateway: Gateway, balance_nano: int) -> str:
    await gateway.accounts.create_account("acme", balance_nano=balance_nano)
    return (await gateway.accounts.create_key("acme")).key


@pytest.fixture
def two_gateway_processes(
    upstream: Upstream, redis_server: RedisProcess, tmp_path: Path
) -> Iterator[list[str]]:
    with gateway_processes_on(tmp_path, upstream.url, redis_server.url) as urls:
        yield urls


async def test_two_gateway_processes_never_overspend_together(
    two_gateway_processes: list[str], redis_storage: Storage
) -> None:
    urls = two_gateway_processes
    await wait_ready(urls)
    accounts = AccountStore(redis_storage)
    k = 41
    start_nano = k * HOLD_NANO + HOLD_NANO - 1
    await accounts.create_account("acme", balance_nano=start_nano)
    key = (await accounts.create_key("acme")).key
    statuses = await fire(urls, key, 240, BODY, latency_ms=UPSTREAM_LATENCY_MS)
    assert statuses.count(200) == k
    assert statuses.count(402) == 240 - k
    await holds_released(accounts, "acme")
    await _assert_books_balance(accounts, "acme", start_nano)
