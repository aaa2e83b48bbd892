"""Upstream key pools and failover (SPEC §14, docs/upstream-pools.md), over HTTP with the
official SDKs, on ``memory://`` and a real Redis (the ``storage`` fixture).

The mock upstream answers per upstream credential (``MockState.set_key_behaviour``): a key
that always answers 429 with a retry hint, one 401, one slow, one healthy. What each test
checks is what the caller sees and what the upstream received: which credentials it was
sent (the mock's request log), never the gateway's own account of it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from ratelimit_gw.money import cost_nano, parse_usd
from ratelimit_gw.services import SERVICES
from ratelimit_gw.storage import Storage
from ratelimit_gw.testing.mock_keys import KeyBehaviour

from .conftest import MODELS, Gateway, Upstream, start_gateway

MESSAGES: Any = [{"role": "user", "content": "hello there"}]
KEYS = {"k-429": "sk-pool-429", "k-401": "sk-pool-401", "k-slow": "sk-pool-slow", "k-ok": "sk-ok"}
ENV = {f"POOL_{name.upper().replace('-', '_')}": secret for name, secret in KEYS.items()}
SECRET_NAMES = {secret: name for name, secret in KEYS.items()}
_, _, IN_USD, OUT_USD = MODELS[0]


def pool_key(name: str, **ceiling: int) -> dict[str, Any]:
    return {"name": name, "api_key_env": f"POOL_{name.upper().replace('-', '_')}", **ceiling}


def provider(name: str, upstream: Upstream, keys: list[dict[str, Any]], **extra: Any) -> Any:
    return {
        "name": name,
        "protocol": "openai",
        "base_url": upstream.url,
        "keys": keys,
        "timeout_s": 30,
        **extra,
    }


def model(provider_name: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": "gpt-4o-mini",
        "provider": provider_name,
        "input_per_mtok": IN_USD,
        "output_per_mtok": OUT_USD,
        "default_max_output": 1000,
        **extra,
    }


@asynccontextmanager
async def gateways(
    upstream: Upstream,
    storage: Storage,
    providers: list[dict[str, Any]],
    count: int = 1,
    **model_extra: Any,
) -> AsyncIterator[list[Gateway]]:
    """``count`` gateway instances sharing ``storage``: gpt-4o-mini on ``providers[0]``."""
    async with AsyncExitStack() as stack:
        started = []
        for _ in range(count):
            runner, gw = await start_gateway(
                upstream,
                storage,
                ENV,
                providers=providers,
                models=[model(providers[0]["name"], **model_extra)],
            )
            stack.push_async_callback(runner.cleanup)
            started.append(gw)
        yield started


def sent_to(upstream: Upstream, path: str = "/v1/chat/completions") -> Counter[str]:
    """How many requests on ``path`` the upstream received, by pool key name."""
    found: Counter[str] = Counter()
    for request in upstream.state.requests:
        if request.path == path:
            secret = request.headers.get("authorization", "").removeprefix("Bearer ")
            found[SECRET_NAMES.get(secret, secret)] += 1
    return found


@pytest.fixture
async def closing() -> AsyncIterator[AsyncExitStack]:
    """Closes the SDK clients a test made, after it."""
    async with AsyncExitStack() as stack:
        yield stack


async def openai_client(closing: AsyncExitStack, gw: Gateway, key: str) -> openai.AsyncOpenAI:
    client = openai.AsyncOpenAI(api_key=key, base_url=f"{gw.url}/openai/v1", max_retries=0)
    return await closing.enter_async_context(client)


async def anthropic_client(
    closing: AsyncExitStack, gw: Gateway, key: str
) -> anthropic.AsyncAnthropic:
    client = anthropic.AsyncAnthropic(api_key=key, base_url=f"{gw.url}/anthropic", max_retries=0)
    return await closing.enter_async_context(client)


def misbehave(upstream: Upstream, name: str, **behaviour: Any) -> None:
    upstream.state.set_key_behaviour(KEYS[name], KeyBehaviour(**behaviour))


# --- the caller never sees a failed attempt --------------------------------------------------


async def test_requests_succeed_through_the_healthy_key_and_are_charged_once(
    upstream: Upstream, storage: Storage, closing: AsyncExitStack
) -> None:
    misbehave(upstream, "k-429", status=429, retry_after_s=30)
    misbehave(upstream, "k-401", status=401)
    misbehave(upstream, "k-slow", latency_ms=3000)
    keys = [pool_key(name) for name in KEYS]
    pool = provider("pool", upstream, keys, max_attempts=4, timeout_s=0.5)
    async with gateways(upstream, storage, [pool]) as (gw,):
        key = await gw.new_key(balance_usd="10")
        client = await openai_client(closing, gw, key)
        answers = [
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            for _ in range(8)
        ]
        await gw.settled()
        ledger = await gw.accounts.ledger("acme")
        account = await gw.accounts.get_account("acme")
    assert all(answer.choices[0].message.content for answer in answers)
    sent = sent_to(upstream)
    # The 429 key cools down for its hint and the 401 key stays unhealthy: each is tried
    # once. The slow key times out each time it is picked (not a key fault: picked again).
    assert (sent["k-429"], sent["k-401"], sent["k-ok"]) == (1, 1, 8)
    assert sent["k-slow"] >= 1
    charges = [entry for entry in ledger if entry.type == "charge"]
    assert len(charges) == 8  # one per answered request, none for the failed attempts
    assert {entry.outcome for entry in charges} == {"ok"}
    expected = sum(
        cost_nano(
            answer.usage.prompt_tokens,
            answer.usage.completion_tokens,
            parse_usd(IN_USD),
            parse_usd(OUT_USD),
        )
        for answer in answers
        if answer.usage is not None
    )
    assert parse_usd(account.balance_usd) == 10 * 10**9 - expected
    assert account.held_usd in ("0", "0.00")


async def test_streams_fail_over_before_the_first_byte_and_never_after(
    upstream: Upstream, storage: Storage, http: aiohttp.ClientSession, closing: AsyncExitStack
) -> None:
    misbehave(upstream, "k-429", status=503)
    keys = [pool_key("k-429"), pool_key("k-ok")]
    async with gateways(upstream, storage, [provider("pool", upstream, keys)]) as (gw,):
        key = await gw.new_key()
        client = await openai_client(closing, gw, key)
        for _ in range(4):  # whichever key is picked first, every stream is whole
            stream = await client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text.startswith("tok0 tok1")
        assert sent_to(upstream)["k-ok"] == 4
        upstream.state.clear()
        # Cut after its first chunk by the healthy key: the caller has bytes, so no retry.
        async with http.post(
            f"{gw.url}/openai/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
            headers={"Authorization": f"Bearer {key}", "x-mock-error-after-chunks": "1"},
        ) as resp:
            assert resp.status == 200
            body = await resp.read()
        assert b"tok0" in body
        await gw.settled()
    assert sum(sent_to(upstream).values()) == 1 + sent_to(upstream)["k-429"]
    assert sent_to(upstream)["k-ok"] == 1


async def test_a_403_is_the_callers_answer_not_a_key_fault(
    upstream: Upstream, storage: Storage, closing: AsyncExitStack
) -> None:
    misbehave(upstream, "k-429", status=403)
    misbehave(upstream, "k-ok", status=403)
    keys = [pool_key("k-429"), pool_key("k-ok")]
    async with gateways(upstream, storage, [provider("pool", upstream, keys)]) as (gw,):
        client = await openai_client(closing, gw, await gw.new_key())
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert sum(sent_to(upstream).values()) == 1  # relayed as it came: one attempt


# --- when no key can take the request ---------------------------------------------------------


async def test_all_keys_cooling_answers_upstream_quota_with_the_soonest_retry(
    upstream: Upstream, storage: Storage, closing: AsyncExitStack
) -> None:
    misbehave(upstream, "k-429", status=429, retry_after_s=5)
    misbehave(upstream, "k-401", status=429, retry_after_s=8)  # a second rate-limited key
    keys = [pool_key("k-429"), pool_key("k-401")]
    async with gateways(upstream, storage, [provider("pool", upstream, keys)]) as (gw,):
        client = await openai_client(closing, gw, await gw.new_key(balance_usd="1"))
        # Both tried: the caller gets the last upstream answer, in its own envelope.
        with pytest.raises(openai.RateLimitError) as first:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert "mock upstream" in first.value.message
        # Both cooling: the gateway answers itself, with the soonest real wait.
        with pytest.raises(openai.RateLimitError) as second:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        await gw.settled()
        ledger = await gw.accounts.ledger("acme")
    body = second.value.body
    assert isinstance(body, dict) and body["reason"] == "upstream_quota"
    assert "cooling down" in body["message"]
    assert 4_000 < int(second.value.response.headers["retry-after-ms"]) <= 5_000
    assert sent_to(upstream) == {"k-429": 1, "k-401": 1}
    # The first request's hold is released at $0; the second never held anything.
    assert sorted(entry.type for entry in ledger) == ["release", "topup"]


async def test_attempts_run_out_the_caller_gets_the_last_error_in_its_protocol(
    upstream: Upstream, storage: Storage, closing: AsyncExitStack
) -> None:
    misbehave(upstream, "k-429", status=503)
    misbehave(upstream, "k-401", status=502)
    misbehave(upstream, "k-slow", status=500)
    keys = [pool_key("k-429"), pool_key("k-401"), pool_key("k-slow")]
    anthropic_pool = {
        **provider("pool", upstream, keys, max_attempts=2),
        "protocol": "anthropic",
    }
    async with AsyncExitStack() as stack:
        runner, gw = await start_gateway(
            upstream,
            storage,
            ENV,
            providers=[anthropic_pool],
            models=[{**model("pool"), "id": "claude-sonnet-4-6"}],
        )
        stack.push_async_callback(runner.cleanup)
        client = await anthropic_client(closing, gw, await gw.new_key())
        with pytest.raises(anthropic.InternalServerError) as caught:
            await client.messages.create(
                model="claude-sonnet-4-6", max_tokens=16, messages=MESSAGES
            )
    assert caught.value.status_code in (500, 502, 503)
    sent: Counter[str] = Counter()
    for request in upstream.state.requests:
        sent[SECRET_NAMES[request.headers["x-api-key"]]] += 1
    assert sum(sent.values()) == 2 and max(sent.values()) == 1  # two keys, once each


async def test_a_request_larger_than_every_ceiling_is_refused_for_good(
    upstream: Upstream, storage: Storage, http: aiohttp.ClientSession
) -> None:
    keys = [pool_key("k-ok", tpm=500), pool_key("k-429", tpm=800)]
    async with gateways(upstream, storage, [provider("pool", upstream, keys)]) as (gw,):
        key = await gw.new_key()
        async with http.post(
            f"{gw.url}/openai/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 900},
            headers={"Authorization": f"Bearer {key}"},
        ) as resp:
            body = await resp.json()
            assert resp.status == 429
            assert resp.headers["x-should-retry"] == "false"
    assert body["error"]["reason"] == "upstream_quota"
    assert "can ever allow" in body["error"]["message"]
    assert not sent_to(upstream)


async def test_every_key_unhealthy_answers_503_until_a_key_is_healthy(
    upstream: Upstream, storage: Storage, closing: AsyncExitStack
) -> None:
    misbehave(upstream, "k-401", status=401)
    keys = [pool_key("k-401"), pool_key("k-ok", rpm=1000)]
    pool = provider("pool", upstream, keys, probe_interval_s=3600)
    async with gateways(upstream, storage, [pool]) as (gw,):
        client = await openai_client(closing, gw, await gw.new_key())
        svc = gw.app[SERVICES]
        pool_state = svc.config.itineraries.of_model(svc.config.catalog.find("gpt-4o-mini"))
        await svc.pools.mark_unhealthy(pool_state.destinations[0].pool, "k-ok")
        with pytest.raises(openai.APIStatusError) as caught:
            for _ in range(3):  # the first may reach the 401 key once
                await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert caught.value.status_code in (401, 503)
        if caught.value.status_code == 401:
            with pytest.raises(openai.APIStatusError) as caught:
                await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert caught.value.status_code == 503
        body = caught.value.body
        assert isinstance(body, dict) and body["reason"] == "upstream_unavailable"
        assert caught.value.response.headers["retry-after"] == "3600"
        await svc.pools.mark_healthy(pool_state.destinations[0].pool, "k-ok")
        answer = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert answer.choices[0].message.content
    assert sent_to(upstream)["k-401"] == 1


# --- ceilings ---------------------------------------------------------------------------------


async def test_per_key_ceilings_are_exact_under_concurrency_across_instances(
    upstream: Upstream, storage: Storage, http: aiohttp.ClientSession
) -> None:
    keys = [pool_key("k-ok", rpm=3), pool_key("k-429", rpm=2)]
    async with gateways(upstream, storage, [provider("pool", upstream, keys)], count=2) as gws:
        key = await gws[0].new_key()

        async def one(gw: Gateway) -> int:
            async with http.post(
                f"{gw.url}/openai/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 5},
                headers={"Authorization": f"Bearer {key}"},
            ) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one(gws[i % 2]) for i in range(12)))
    assert sorted(statuses) == [200] * 5 + [429] * 7
    assert sent_to(upstream) == {"k-ok": 3, "k-429": 2}


async def test_most_headroom_first_spreads_load_in_proportion_to_ceilings(
    upstream: Upstream, storage: Storage, closing: AsyncExitStack
) -> None:
    keys = [pool_key("k-ok", rpm=60), pool_key("k-429", rpm=30)]
    async with gateways(upstream, storage, [provider("pool", upstream, keys)]) as (gw,):
        client = await openai_client(closing, gw, await gw.new_key())
        for _ in range(30):
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=5
            )
    sent = sent_to(upstream)
    assert sent["k-ok"] + sent["k-429"] == 30
    assert 19 <= sent["k-ok"] <= 21  # 2 : 1, as their ceilings


# --- fallbacks --------------------------------------------------------------------------------


async def test_a_fallback_answers_with_its_own_model_id_at_the_models_price(
    upstream: Upstream, storage: Storage, closing: AsyncExitStack
) -> None:
    misbehave(upstream, "k-429", status=429, retry_after_s=60)
    primary = provider("primary", upstream, [pool_key("k-429")])
    backup = provider("azure-east", upstream, [pool_key("k-ok")])
    fallbacks = [{"provider": "azure-east", "upstream_id": "gpt4o-prod"}]
    async with gateways(upstream, storage, [primary, backup], fallbacks=fallbacks) as (gw,):
        client = await openai_client(closing, gw, await gw.new_key(balance_usd="1"))
        answers = [
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            for _ in range(3)
        ]
        await gw.settled()
        ledger = await gw.accounts.ledger("acme")
    sent = sent_to(upstream)
    assert sent == {"k-429": 1, "k-ok": 3}  # the primary's key cools: straight to the fallback
    bodies = [
        r.json()
        for r in upstream.state.requests
        if r.headers.get("authorization") == "Bearer sk-ok"
    ]
    assert {body["model"] for body in bodies} == {"gpt4o-prod"}
    charges = [entry for entry in ledger if entry.type == "charge"]
    assert [entry.model for entry in charges] == ["gpt-4o-mini"] * 3
    assert all(answer.choices[0].message.content for answer in answers)


# --- converter routes and custom endpoints ------------------------------------------------------


async def test_a_converter_route_fails_over_like_a_native_one(
    upstream: Upstream, storage: Storage, closing: AsyncExitStack
) -> None:
    misbehave(upstream, "k-429", status=429, retry_after_s=60)
    keys = [pool_key("k-429"), pool_key("k-ok")]
    async with gateways(upstream, storage, [provider("pool", upstream, keys)]) as (gw,):
        client = await anthropic_client(closing, gw, await gw.new_key())
        for _ in range(3):
            message = await client.messages.create(
                model="gpt-4o-mini", max_tokens=16, messages=MESSAGES
            )
            assert message.content
    assert sent_to(upstream)["k-ok"] == 3
    assert sent_to(upstream)["k-429"] <= 1


async def test_a_custom_endpoints_pool_skips_a_revoked_key(
    upstream: Upstream, storage: Storage, http: aiohttp.ClientSession
) -> None:
    misbehave(upstream, "k-401", status=401)
    endpoint = {
        "provider_account": "acme-ai",
        "name": "llm",
        "base_url": f"{upstream.url}/v1",
        "accounts": ["*"],
        "price_per_request_usd": "0.001",
        "probe_interval_s": 60,
        "keys": [
            {"name": "revoked", "headers": {"Authorization": "Bearer ${POOL_K_401}"}},
            {"name": "good", "headers": {"Authorization": "Bearer ${POOL_K_OK}"}},
        ],
    }
    async with AsyncExitStack() as stack:
        runner, gw = await start_gateway(upstream, storage, ENV, custom_endpoints=[endpoint])
        stack.push_async_callback(runner.cleanup)
        key = await gw.new_key()
        statuses = []
        for _ in range(4):
            async with http.post(
                f"{gw.url}/proxy-api/acme-ai/llm/chat/completions",
                json={"model": "anything", "messages": MESSAGES},
                headers={"Authorization": f"Bearer {key}"},
            ) as resp:
                await resp.read()
                statuses.append(resp.status)
    assert statuses == [200] * 4
    assert sent_to(upstream) == {"k-401": 1, "k-ok": 4}
