"""Budget utilisation after settlement (budget_watch.py; docs/limits-and-balance.md
"Watching a budget"): the ``rlgw_budget_spent_ratio`` gauge, only with the account label, and
the ``budget.80`` / ``budget.100`` webhook events, raised once per budget, period and
threshold across instances and delivered to a real receiver.

Spend is steered with the mock upstream's ``x-mock-ignore-cap``/``x-mock-chunks`` (5 output
tokens a chunk, whatever max_tokens says): a settlement may then pass a cap its hold fitted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from ratelimit_gw import webhook_delivery
from ratelimit_gw.money import parse_usd
from ratelimit_gw.services import SERVICES
from ratelimit_gw.storage import Storage

from .conftest import ADMIN_TOKEN, Gateway, Upstream, another_client, start_gateway
from .test_observability import check_expression, promql_documents, scrape
from .test_webhooks import ENV, FAST_DELIVERY, Receiver, admin_call, eventually, receiver, verify

__all__ = ["receiver"]  # the fixture, used by name

RATIO = "rlgw_budget_spent_ratio"
CAP = "0.0001"  # $100k nano: gpt-4o-mini output is $0.6/M, 3000 nano per mock chunk


async def spend(
    http: aiohttp.ClientSession, gw: Gateway, key: str, chunks: int | None = None
) -> int:
    """One chat request; ``chunks``: its answer has 5 × chunks output tokens, cap or not."""
    headers = {"Authorization": f"Bearer {key}"}
    if chunks is not None:
        headers |= {"x-mock-ignore-cap": "1", "x-mock-chunks": str(chunks)}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(
        f"{gw.url}/v1/chat/completions", json={**body, "max_tokens": 1}, headers=headers
    ) as response:
        await response.read()
        return response.status


def ratio(gw: Gateway, scope: str, account: str, key_id: str = "-") -> float | None:
    labels = {"scope": scope, "account": account, "key_id": key_id}
    value: float | None = gw.app[SERVICES].registry.get_sample_value(RATIO, labels)
    return value


async def used(gw: Gateway, account: str) -> float:
    """(spent + held) / cap of the account's budget, as the admin view shows it."""
    budget = (await gw.accounts.get_account(account)).budget
    assert budget is not None
    return (parse_usd(budget.spent_usd) + parse_usd(budget.held_usd)) / parse_usd(budget.usd)


async def test_the_ratio_is_exported_only_with_the_account_label(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key()
    await gateway.accounts.update_account("acme", {"budget_usd": CAP, "budget_period": "day"})
    assert await spend(http, gateway, key, chunks=10) == 200
    await asyncio.sleep(0.2)  # what a reading would have taken
    async with http.get(gateway.url + "/metrics") as response:
        assert RATIO not in await response.text()


async def test_the_ratio_follows_settlements_of_account_and_key_budgets(
    upstream: Upstream, storage: Storage, http: aiohttp.ClientSession
) -> None:
    runner, gw = await start_gateway(upstream, storage, metrics={"account_label": True})
    try:
        key = await gw.new_key()
        plain = await gw.new_key("plain")  # no budget: no series, no reading
        (record,) = await gw.accounts.list_keys("acme")
        await gw.accounts.update_account("acme", {"budget_usd": CAP, "budget_period": "week"})
        await gw.accounts.update_key(record.id, {"budget_usd": "0.001", "budget_period": "day"})
        reads = gw.app[SERVICES].registry
        for chunks, spent_nano in ((10, 30_150), (17, 81_300), (7, 102_450)):
            assert await spend(http, gw, key, chunks) == 200
            await eventually(lambda s=spent_nano: ratio(gw, "account", "acme") == s / 100_000)
            assert await used(gw, "acme") == spent_nano / 100_000
            assert ratio(gw, "key", "acme", record.id) == pytest.approx(spent_nano / 1_000_000)
        pipelines = reads.get_sample_value(
            "rlgw_storage_duration_seconds_count", {"operation": "pipeline"}
        )
        assert await spend(http, gw, plain) == 200
        await asyncio.sleep(0.2)
        assert ratio(gw, "account", "plain") is None
        assert (
            reads.get_sample_value("rlgw_storage_duration_seconds_count", {"operation": "pipeline"})
            == pipelines
        )
        # The dashboard's queries of the gauge, against this exposition.
        m = await scrape(http, gw.url)
        queries = [(w, e) for w, e in promql_documents() if RATIO in e]
        assert queries
        assert [p for w, e in queries for p in check_expression(w, e, m)] == []
        # Over the cap (1.0245): refused, counted by reason.
        assert await spend(http, gw, key) == 429
        assert (
            reads.get_sample_value(
                "rlgw_rejections_total", {"reason": "budget_exceeded", "account": "acme"}
            )
            == 1
        )
    finally:
        await runner.cleanup()


# --- budget.80 and budget.100 -----------------------------------------------------------------


@asynccontextmanager
async def instance(
    upstream: Upstream, storage: Storage, receiver: Receiver
) -> AsyncIterator[Gateway]:
    events = ["budget.80", "budget.100"]
    hook = {"url": receiver.url, "secret_env": "WEBHOOK_SECRET", "events": events}
    runner, gw = await start_gateway(
        upstream, storage, ENV, webhooks=[hook], webhook_delivery=FAST_DELIVERY
    )
    try:
        yield gw
    finally:
        await runner.cleanup()


async def period_begins(period_ms: int) -> int:
    """Sleep to the start of the next custom period; its start (ms)."""
    now = int(time.time() * 1000)
    start = (now // period_ms + 1) * period_ms
    await asyncio.sleep((start - now) / 1000 + 0.05)
    return start


async def test_budget_events_are_raised_once_per_threshold_and_period_across_instances(
    upstream: Upstream,
    storage: Storage,
    receiver: Receiver,
    http: aiohttp.ClientSession,
) -> None:
    period_s = 4
    async with (
        another_client(storage) as other,
        instance(upstream, storage, receiver) as one,
        instance(upstream, other, receiver) as two,
    ):
        key = await one.new_key()
        await one.accounts.update_account(
            "acme", {"budget_usd": CAP, "budget_period": "custom", "budget_period_s": period_s}
        )
        start = await period_begins(period_s * 1000)
        assert await spend(http, one, key, chunks=27) == 200  # 81 %
        (first,) = await receiver.wait_for(1)
        assert await spend(http, two, key) == 200  # still over 80 %, seen by the other one
        assert await spend(http, two, key, chunks=7) == 200  # over 100 %
        await receiver.wait_for(2)
        assert await spend(http, one, key) == 429  # budget_exceeded, as before
        await asyncio.sleep(0.3)
        assert time.time() * 1000 < start + period_s * 1000, "the period ended too soon"
        assert [c.payload["type"] for c in receiver.delivered] == ["budget.80", "budget.100"]
        assert first.id == f"budget.80:acme:account:custom:{period_s}:{start}"
        assert verify(first)
        data = first.payload["data"]
        assert data == {
            "percent": 80,
            "scope": "account",
            "key_id": None,
            "budget_usd": "0.0001",
            "spent_usd": "0.00008115",
            "held_usd": "0.00",
            "period": "custom",
            "period_s": period_s,
            "period_start": data["period_start"],
            "resets_at": data["resets_at"],
        }
        assert receiver.delivered[1].payload["data"]["percent"] == 100
        # The next period: spent from zero, and its own events.
        start = await period_begins(period_s * 1000)
        assert await spend(http, two, key, chunks=27) == 200
        (*_, again) = await receiver.wait_for(3)
        assert again.id == f"budget.80:acme:account:custom:{period_s}:{start}"
        await asyncio.sleep(0.3)
        assert len(receiver.delivered) == 3
        raised = sum(
            gw.app[SERVICES].registry.get_sample_value(
                "rlgw_webhook_events_raised_total", {"type": "budget.80"}
            )
            or 0
            for gw in (one, two)
        )
        assert raised == 2


async def test_a_key_budget_raises_its_own_events(
    upstream: Upstream, storage: Storage, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    async with instance(upstream, storage, receiver) as gw:
        key = await gw.new_key()
        (record,) = await gw.accounts.list_keys("acme")
        await gw.accounts.update_key(record.id, {"budget_usd": CAP, "budget_period": "month"})
        assert await spend(http, gw, key, chunks=40) == 200  # 120 %: both at once
        calls = await receiver.wait_for(2)
        assert sorted(c.payload["type"] for c in calls) == ["budget.100", "budget.80"]
        for call in calls:
            assert call.id.startswith(f"{call.payload['type']}:acme:key:{record.id}:month:")
            assert call.payload["data"]["key_id"] == record.id
            assert call.payload["data"]["scope"] == "key"


def test_budget_events_need_no_threshold_field() -> None:
    from ratelimit_gw.settings.webhooks import EVENT_THRESHOLDS

    assert EVENT_THRESHOLDS["budget.80"] is None and EVENT_THRESHOLDS["budget.100"] is None


async def test_no_webhook_no_gauge_no_reading(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key()
    await gateway.accounts.update_account("acme", {"budget_usd": CAP, "budget_period": "day"})
    registry = gateway.app[SERVICES].registry

    def pipelines() -> Any:
        return registry.get_sample_value(
            "rlgw_storage_duration_seconds_count", {"operation": "pipeline"}
        )

    before = pipelines()
    assert await spend(http, gateway, key, chunks=1) == 200
    await asyncio.sleep(0.2)
    assert pipelines() == before


async def test_an_account_webhook_gets_only_the_budget_events_it_subscribed_to(
    upstream: Upstream,
    storage: Storage,
    receiver: Receiver,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(webhook_delivery, "ENDPOINTS_REFRESH_S", 0.05)
    env = {**ENV, "RLGW_ADMIN_TOKEN": ADMIN_TOKEN}
    runner, gw = await start_gateway(upstream, storage, env, webhook_delivery=FAST_DELIVERY)
    try:
        key = await gw.new_key()
        await gw.accounts.update_account("acme", {"budget_usd": CAP, "budget_period": "day"})
        hook = {"url": receiver.url, "events": ["budget.100"]}
        status, made = await admin_call(http, gw, "PUT", "/admin/accounts/acme/webhook", hook)
        assert status == 200, made
        assert made["webhook"]["events"] == ["budget.100"]
        await asyncio.sleep(0.3)  # every instance knows the webhook
        assert await spend(http, gw, key, chunks=27) == 200  # 81 %: not subscribed
        assert await spend(http, gw, key, chunks=7) == 200  # 102 %
        (call,) = await receiver.wait_for(1)
        assert call.payload["type"] == "budget.100" and call.payload["account"] == "acme"
        assert verify(call, made["webhook"]["secret"])
        await asyncio.sleep(0.3)
        assert len(receiver.delivered) == 1
    finally:
        await runner.cleanup()
