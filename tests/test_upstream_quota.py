"""Shared upstream-key ceilings (§10): ``rpm``/``tpm`` on a provider or custom endpoint, one
ceiling for its whole pool of upstream keys (``upstream_pool.py``; tests/test_upstream_pool.py
checks the script itself).

One upstream key is shared by every account on every gateway instance; the gateway spends
its quota itself and answers 429 ``upstream_quota`` with the real wait before the upstream
would. Exactness is checked where it is observable: what the mock upstream received
(``upstream.state.requests``). A request the ceiling refuses consumes nothing from the
account; a request the account refuses after the ceiling passed gives the ceiling back.

Every test runs on ``memory://`` and on a real Redis (the ``storage`` fixture).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
import openai
import pytest

from ratelimit_gw.keyspace import PoolKeys
from ratelimit_gw.services import SERVICES
from ratelimit_gw.storage import Storage

from .conftest import Gateway, Upstream, gateway_config, start_gateway

PIPESHIFT_KEY = "ps-upstream-secret-abcdef"
CHAT_PATH = "/proxy-api/pipeshift/model/v1/chat/completions"
MESSAGES: Any = [{"role": "user", "content": "hello there"}]
OPEN_BODY = {"model": "zai-org/GLM-5", "messages": MESSAGES}


def pipeshift(upstream: Upstream, **ceiling: Any) -> list[dict[str, Any]]:
    return [
        {
            "provider_account": "pipeshift",
            "name": "model",
            "base_url": upstream.url,
            "headers": {"Authorization": "Bearer ${PIPESHIFT_API_KEY}"},
            **ceiling,
        }
    ]


@asynccontextmanager
async def gateways(
    upstream: Upstream, storage: Storage, count: int = 1, **overrides: Any
) -> AsyncIterator[list[Gateway]]:
    """``count`` gateway instances with one config, sharing ``storage``."""
    async with AsyncExitStack() as stack:
        started = []
        for _ in range(count):
            runner, gw = await start_gateway(
                upstream, storage, {"PIPESHIFT_API_KEY": PIPESHIFT_KEY}, **overrides
            )
            stack.push_async_callback(runner.cleanup)
            started.append(gw)
        yield started


async def call(
    http: aiohttp.ClientSession, gw: Gateway, key: str, body: Any = OPEN_BODY, path: str = ""
) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with http.post(
        f"{gw.url}{path or CHAT_PATH}", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        data = await resp.json(content_type=None)
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, data


def upstream_count(upstream: Upstream) -> int:
    return len([r for r in upstream.state.requests if r.path == "/v1/chat/completions"])


# --- exactness -------------------------------------------------------------------------------


async def test_n_clients_sharing_an_endpoint_never_exceed_its_rpm_ceiling(
    upstream: Upstream, storage: Storage, http: aiohttp.ClientSession
) -> None:
    ceiling = 3
    async with gateways(upstream, storage, custom_endpoints=pipeshift(upstream, rpm=ceiling)) as (
        gw,
    ):
        keys = [await gw.new_key(f"team-{i}") for i in range(4)]
        keys += [await gw.new_key(f"team-{i}", create_account=False) for i in range(4)]
        results = await asyncio.gather(*(call(http, gw, k) for k in keys * 3))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * ceiling + [429] * (len(keys) * 3 - ceiling)
    assert upstream_count(upstream) == ceiling
    for status, headers, body in results:
        if status != 429:
            continue
        error = body["error"]
        assert (error["type"], error["reason"]) == ("rate_limit_error", "upstream_quota")
        assert error["rate_limit"] == {"rpm": 3, "qps": 0.05, "tpm": None}
        assert error["message"].startswith(
            "Shared upstream limit reached: custom endpoint `pipeshift/model` allows 3 "
            "requests per minute for all callers together (approximately 0.05 requests per "
            "second). Please try again in "
        )
        # The real wait: one request refills in 60 s / 3, minus the moments since.
        wait_ms = int(headers["retry-after-ms"])
        assert 19_000 < wait_ms <= 20_000
        assert headers["retry-after"] == str(math.ceil(wait_ms / 1000))
        assert "x-should-retry" not in headers


async def test_two_gateway_instances_share_one_ceiling(
    upstream: Upstream, storage: Storage, http: aiohttp.ClientSession
) -> None:
    async with gateways(upstream, storage, 2, custom_endpoints=pipeshift(upstream, rpm=4)) as (
        gw_a,
        gw_b,
    ):
        key_a = await gw_a.new_key("alpha")
        key_b = await gw_b.new_key("beta")
        results = await asyncio.gather(
            *(call(http, gw_a, key_a) for _ in range(5)),
            *(call(http, gw_b, key_b) for _ in range(5)),
        )
    assert sorted(status for status, _, _ in results) == [200] * 4 + [429] * 6
    assert upstream_count(upstream) == 4
    assert {body["error"]["reason"] for status, _, body in results if status == 429} == {
        "upstream_quota"
    }


async def test_openai_sdk_sees_rate_limit_error_with_the_real_wait(
    upstream: Upstream, storage: Storage
) -> None:
    async with (
        gateways(upstream, storage, custom_endpoints=pipeshift(upstream, rpm=1)) as (gw,),
        openai.DefaultAsyncHttpxClient() as transport,
        openai.AsyncOpenAI(
            base_url=f"{gw.url}/proxy-api/pipeshift/model/v1",
            api_key=await gw.new_key(),
            max_retries=0,
            http_client=transport,
        ) as client,
    ):
        await client.chat.completions.create(model="zai-org/GLM-5", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="zai-org/GLM-5", messages=MESSAGES)
    body = caught.value.body
    assert isinstance(body, dict) and body["reason"] == "upstream_quota"
    assert 59_000 < int(caught.value.response.headers["retry-after-ms"]) <= 60_000
    assert upstream_count(upstream) == 1


# --- nothing consumed on rejection -----------------------------------------------------------


async def test_request_rejected_by_the_ceiling_consumes_nothing_from_the_account(
    upstream: Upstream, storage: Storage, http: aiohttp.ClientSession
) -> None:
    endpoints = pipeshift(upstream, rpm=1, price_per_request_usd="0.01")
    async with gateways(upstream, storage, custom_endpoints=endpoints) as (gw,):
        first = await gw.new_key("first")
        assert (await call(http, gw, first))[0] == 200
        key = await gw.new_key(
            balance_usd="1.00",
            rpm=10,
            tpm=100_000,
            concurrency=3,
            account_rpm=20,
            account_tpm=200_000,
            account_concurrency=5,
        )
        [record] = await gw.accounts.list_keys("acme")
        limiter = gw.app[SERVICES].limiter
        before_account = await gw.accounts.get_account("acme")
        before = await limiter.peek("acme", record.id)

        status, headers, body = await call(http, gw, key)
        assert (status, body["error"]["reason"]) == (429, "upstream_quota")
        # The caller's own buckets, as its headers report them: untouched.
        assert headers["x-ratelimit-remaining-requests"] == "10"
        assert headers["x-ratelimit-remaining-tokens"] == "100000"

        await gw.settled()
        after = await limiter.peek("acme", record.id)
        after_account = await gw.accounts.get_account("acme")
        ledger = await gw.accounts.ledger("acme")
    assert (after.requests, after.tokens) == (before.requests, before.tokens)
    assert after.concurrency_in_use == before.concurrency_in_use == 0
    assert after.available_nano == before.available_nano == 1_000_000_000
    assert after_account == before_account
    assert [e.type for e in ledger] == ["topup"]
    assert upstream_count(upstream) == 1


async def test_account_rejection_after_the_ceiling_passed_gives_the_ceiling_back(
    upstream: Upstream, storage: Storage, http: aiohttp.ClientSession
) -> None:
    endpoints = pipeshift(upstream, rpm=2, price_per_request_usd="0.01")
    async with gateways(upstream, storage, custom_endpoints=endpoints) as (gw,):
        broke = await gw.new_key("broke", balance_usd="0.001")
        limited = await gw.new_key("limited", rpm=1)
        other = await gw.new_key("other")
        for _ in range(3):  # the ceiling passes each time, the balance does not
            status, _, body = await call(http, gw, broke)
            assert (status, body["error"]["reason"]) == (402, "balance_exceeded")
        assert (await call(http, gw, limited))[0] == 200
        status, _, body = await call(http, gw, limited)
        assert (status, body["error"]["reason"]) == (429, "rpm_exceeded")
        # Had any refusal kept its ceiling reservation, this one would be refused.
        assert (await call(http, gw, other))[0] == 200
        status, _, body = await call(http, gw, other)
        assert (status, body["error"]["reason"]) == (429, "upstream_quota")
    assert upstream_count(upstream) == 2
    level = float(
        await storage.call("HGET", PoolKeys("pipeshift/model").script_keys([])[0], "level")
    )
    assert 0 <= level < 0.1  # two spent, and a few ms of refill


# --- tokens per minute -----------------------------------------------------------------------


async def test_tpm_ceiling_reserves_the_estimate_and_settles_to_real_usage(
    upstream: Upstream, storage: Storage, http: aiohttp.ClientSession
) -> None:
    # Each request reserves ~1000 tokens (max_tokens) but uses ~23: without the correction at
    # settlement the third sequential request would find the 2500-token ceiling empty.
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 1000}
    async with gateways(upstream, storage, custom_endpoints=pipeshift(upstream, tpm=2500)) as (gw,):
        key = await gw.new_key()
        for _ in range(4):
            assert (await call(http, gw, key, body))[0] == 200
            await gw.settled()
        level = float(
            await storage.call("HGET", PoolKeys("pipeshift/model").script_keys([])[1], "level")
        )
        assert 2500 - 4 * 30 < level <= 2500
        # A burst is held to the estimate: two fit in 2500, the third does not.
        results = await asyncio.gather(*(call(http, gw, key, body) for _ in range(3)))
    assert sorted(status for status, _, _ in results) == [200, 200, 429]
    [error] = [b["error"] for status, _, b in results if status == 429]
    assert error["reason"] == "upstream_quota"
    assert "allows 2500 tokens per minute for all callers together" in error["message"]
    assert error["rate_limit"] == {"rpm": None, "qps": None, "tpm": 2500}
    assert upstream_count(upstream) == 6


async def test_request_larger_than_the_tpm_ceiling_is_refused_for_good(
    upstream: Upstream, storage: Storage, http: aiohttp.ClientSession
) -> None:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 5000}
    async with gateways(upstream, storage, custom_endpoints=pipeshift(upstream, tpm=2500)) as (gw,):
        status, headers, data = await call(http, gw, await gw.new_key(), body)
    assert (status, data["error"]["reason"]) == (429, "upstream_quota")
    assert headers["x-should-retry"] == "false"
    assert "retry-after" not in headers
    assert "can ever allow" in data["error"]["message"]
    assert upstream_count(upstream) == 0


# --- native routes -----------------------------------------------------------------------------


def providers_with(upstream: Upstream, storage: Storage, **ceiling: Any) -> list[dict[str, Any]]:
    providers: list[dict[str, Any]] = gateway_config(upstream.url, storage.url)["providers"]
    providers[0] = {**providers[0], **ceiling}  # mock-openai
    return providers


async def test_provider_ceiling_applies_to_native_routes_across_accounts(
    upstream: Upstream, storage: Storage, http: aiohttp.ClientSession
) -> None:
    providers = providers_with(upstream, storage, rpm=2)
    chat = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 5}
    async with gateways(upstream, storage, providers=providers) as (gw,):
        keys = [await gw.new_key(f"acct-{i}") for i in range(3)]
        results = await asyncio.gather(
            *(call(http, gw, k, chat, "/v1/chat/completions") for k in keys * 2)
        )
        # Another provider's models are not behind this ceiling.
        claude = {"model": "claude-sonnet-4-6", "messages": MESSAGES, "max_tokens": 5}
        async with http.post(
            f"{gw.url}/v1/messages", json=claude, headers={"x-api-key": keys[0]}
        ) as resp:
            assert resp.status == 200
    assert sorted(status for status, _, _ in results) == [200, 200, 429, 429, 429, 429]
    assert upstream_count(upstream) == 2
    for status, _, body in results:
        if status == 429:
            assert body["error"]["reason"] == "upstream_quota"
            assert "provider `mock-openai` allows 2 requests per minute" in body["error"]["message"]


async def test_provider_tpm_ceiling_is_refunded_when_the_account_refuses(
    upstream: Upstream, storage: Storage, http: aiohttp.ClientSession
) -> None:
    providers = providers_with(upstream, storage, tpm=300)
    chat = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 100}
    async with gateways(upstream, storage, providers=providers) as (gw,):
        poor = await gw.new_key("poor", balance_usd="0")
        for _ in range(5):
            status, _, _ = await call(http, gw, poor, chat, "/v1/chat/completions")
            assert status == 402
        rich = await gw.new_key("rich")
        assert (await call(http, gw, rich, chat, "/v1/chat/completions"))[0] == 200
    assert upstream_count(upstream) == 1
