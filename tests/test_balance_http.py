"""Balance protection and RPM policies as callers see them (§4 policies, §5, §6, §7).

402s in every protocol's envelope, the official SDKs not retrying them, exact settlement
charges, and headers and 429 bodies reporting the limit a policy produced.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from ratelimit_gw.money import cost_nano, format_usd, parse_usd
from ratelimit_gw.protocols import input_token_bound

from .conftest import Gateway

CHAT = [{"role": "user", "content": "hello"}]
# Enough for the mock's default answer (20 output tokens) of any model, not for max_tokens=1000.
SMALL_BALANCE = "0.001"


class AttemptLog:
    """Every HTTP attempt an SDK makes, seen from inside its own transport."""

    def __init__(self) -> None:
        self.statuses: list[int] = []

    async def on_response(self, response: Any) -> None:
        self.statuses.append(response.status_code)


async def _settled(gateway: Gateway, account: str = "acme") -> Any:
    deadline = time.monotonic() + 10
    while True:
        state = await gateway.accounts.get_account(account)
        if state.holds_live == 0:
            return state
        assert time.monotonic() < deadline, "the hold was never released"
        await asyncio.sleep(0.02)


async def test_openai_sdk_does_not_retry_a_402(gateway: Gateway) -> None:
    key = await gateway.new_key(balance_usd=SMALL_BALANCE)
    attempts = AttemptLog()
    hooks = {"response": [attempts.on_response]}
    async with openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1",
        api_key=key,
        max_retries=2,
        http_client=openai.DefaultAsyncHttpxClient(event_hooks=hooks),
    ) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=1000)
    assert caught.value.status_code == 402
    assert caught.value.response.headers["x-should-retry"] == "false"
    body = caught.value.body
    assert isinstance(body, dict)
    assert (body["type"], body["reason"], body["code"]) == (
        "insufficient_balance",
        "balance_exceeded",
        "402",
    )
    assert attempts.statuses == [402]
    assert gateway.upstream.state.requests == []


async def test_anthropic_sdk_raises_payment_required_without_retrying(gateway: Gateway) -> None:
    key = await gateway.new_key(balance_usd=SMALL_BALANCE)
    attempts = AttemptLog()
    async with anthropic.AsyncAnthropic(
        base_url=gateway.url,
        api_key=key,
        max_retries=2,
        http_client=anthropic.DefaultAsyncHttpxClient(
            event_hooks={"response": [attempts.on_response]}
        ),
    ) as client:
        with pytest.raises(anthropic.APIStatusError) as caught:
            await client.messages.create(model="claude-sonnet-4-6", max_tokens=1000, messages=CHAT)  # type: ignore[arg-type]
    assert caught.value.status_code == 402
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error"
    assert body["error"]["type"] == "insufficient_balance"
    assert attempts.statuses == [402]
    assert gateway.upstream.state.requests == []


async def test_gemini_sdk_gets_402_resource_exhausted(gateway: Gateway) -> None:
    key = await gateway.new_key(balance_usd=SMALL_BALANCE)
    async with aiohttp.ClientSession() as session:
        client = genai.Client(
            api_key=key,
            http_options=genai_types.HttpOptions(base_url=gateway.url, aiohttp_client=session),
        )
        try:
            with pytest.raises(genai_errors.ClientError) as caught:
                await client.aio.models.generate_content(
                    model="gemini-2.5-flash",
                    contents="hello",
                    config=genai_types.GenerateContentConfig(max_output_tokens=100_000),
                )
        finally:
            await client.aio.aclose()
            client.close()
    assert caught.value.code == 402
    assert caught.value.status == "RESOURCE_EXHAUSTED"
    assert gateway.upstream.state.requests == []


async def test_402_message_states_how_many_output_tokens_the_balance_affords(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key(balance_usd="0.0003")
    body = b'{"model":"gpt-4o-mini","max_tokens":1000,"messages":[{"role":"user","content":"h"}]}'
    input_bound = input_token_bound(len(body))
    async with http.post(
        f"{gateway.url}/v1/chat/completions", data=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        assert response.status == 402
        error = (await response.json())["error"]
    affordable = (300_000 - cost_nano(input_bound, 0, 150_000_000, 0)) * 10**6 // 600_000_000
    assert f"at most {affordable} output tokens" in error["message"]
    # Asking for exactly that many passes; one more would not.
    fitted = body.replace(b"1000", str(affordable).encode())
    async with http.post(
        f"{gateway.url}/v1/chat/completions",
        data=fitted,
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        assert response.status == 200


async def test_settlement_charges_the_reported_usage_exactly(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key(balance_usd="1.00")
    async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=key) as client:
        reply = await client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=50)
    assert reply.usage is not None
    state = await _settled(gateway)
    expected = cost_nano(
        reply.usage.prompt_tokens, reply.usage.completion_tokens, 2_500_000_000, 10_000_000_000
    )
    assert state.balance_usd == format_usd(1_000_000_000 - expected)
    assert state.spent_usd == format_usd(expected)
    (charge, _topup) = await gateway.accounts.ledger("acme")
    assert (charge.type, charge.model, charge.cost_usd) == (
        "charge",
        "gpt-4o",
        format_usd(expected),
    )
    assert (charge.input_tokens, charge.output_tokens) == (
        reply.usage.prompt_tokens,
        reply.usage.completion_tokens,
    )


async def test_upstream_error_releases_the_hold_and_charges_nothing(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key(balance_usd="1.00")
    async with http.post(
        f"{gateway.url}/v1/messages",
        json={"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": CHAT},
        headers={"x-api-key": key, "x-mock-error": "529"},
    ) as response:
        assert response.status == 529
    state = await _settled(gateway)
    assert (state.balance_usd, state.spent_usd) == ("1.00", "0.00")
    (release, _topup) = await gateway.accounts.ledger("acme")
    assert (release.type, release.cost_usd, release.outcome) == (
        "release",
        "0.00",
        "upstream_error",
    )


async def test_an_upstream_ignoring_the_cap_overruns_and_the_next_request_gets_402(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    # Balance pays for the worst case of max_tokens=1 but the upstream sends 200 tokens.
    body = {"model": "gpt-4o", "max_tokens": 1, "messages": CHAT}
    hold = cost_nano(
        input_token_bound(len(aiohttp.JsonPayload(body)._value)),
        1,
        2_500_000_000,
        10_000_000_000,
    )
    key = await gateway.new_key(balance_usd=format_usd(hold))
    async with http.post(
        f"{gateway.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}", "x-mock-ignore-cap": "1", "x-mock-chunks": "40"},
    ) as response:
        assert response.status == 200
    state = await _settled(gateway)
    assert state.balance_usd.startswith("-")
    assert state.overruns == 1
    ledger = await gateway.accounts.ledger("acme")
    assert ledger[0].type == "overrun"
    async with http.post(
        f"{gateway.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        assert response.status == 402


async def test_free_tier_balance_policy_reports_six_rpm_in_headers_and_429_body(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    await gateway.accounts.create_account("acme", rpm_policy="balance")
    key = (await gateway.accounts.create_key("acme")).key
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "gpt-4o-mini", "max_tokens": 5, "messages": CHAT}
    for remaining in range(5, -1, -1):
        async with http.post(
            f"{gateway.url}/v1/chat/completions", json=body, headers=headers
        ) as response:
            assert response.status == 200
            assert response.headers["x-ratelimit-limit-requests"] == "6"
            assert response.headers["x-ratelimit-remaining-requests"] == str(remaining)
    async with http.post(
        f"{gateway.url}/v1/chat/completions", json=body, headers=headers
    ) as response:
        assert response.status == 429
        error = (await response.json())["error"]
    assert error["rate_limit"]["rpm"] == 6
    assert "6 requests per minute" in error["message"]


async def test_tier_policy_follows_total_top_ups_and_override_wins(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    await gateway.accounts.create_account("acme", balance_nano=0, rpm_policy="tier")
    key = (await gateway.accounts.create_key("acme")).key
    body = {"model": "gpt-4o-mini", "max_tokens": 5, "messages": CHAT}

    async def limit() -> str:
        async with http.post(
            f"{gateway.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
        ) as response:
            assert response.status in (200, 402)
            return response.headers["x-ratelimit-limit-requests"]

    assert await limit() == "6"
    await gateway.accounts.topup("acme", 50_000_000_000, "t1")
    assert await limit() == "120"
    await gateway.accounts.topup("acme", 950_000_000_000, "t2")
    assert await limit() == "600"
    await gateway.accounts.update_account("acme", {"rpm_override": 42})
    assert await limit() == "42"


async def test_a_reused_client_request_id_is_charged_every_time(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key(balance_usd="1.00")
    headers = {"Authorization": f"Bearer {key}", "x-request-id": "my-fixed-id"}
    body = {"model": "gpt-4o-mini", "max_tokens": 5, "messages": CHAT}
    for _ in range(3):
        async with http.post(
            f"{gateway.url}/v1/chat/completions", json=body, headers=headers
        ) as response:
            assert response.status == 200
            assert response.headers["x-request-id"] == "my-fixed-id"  # still echoed
    state = await _settled(gateway)
    charges = [e for e in await gateway.accounts.ledger("acme") if e.type == "charge"]
    assert len(charges) == 3
    assert {e.request_id for e in charges} == {"my-fixed-id"}
    assert len({e.settlement_id for e in charges}) == 3
    each = parse_usd(charges[0].cost_usd or "0")
    assert each > 0
    assert state.spent_usd == format_usd(3 * each)
