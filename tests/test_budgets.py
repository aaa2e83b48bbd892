"""Budgets per period (SPEC §15, docs/limits-and-balance.md) through admit.lua and settle.lua.

Every test that takes ``storage`` runs on memory:// and on a real Redis. Boundaries are
crossed with the custom period (a few seconds long), never by moving a clock.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import msgspec
import pytest

from ratelimit_gw import budgets
from ratelimit_gw.accounts import AccountStore
from ratelimit_gw.budgets import bounds
from ratelimit_gw.keyspace import AccountKeys
from ratelimit_gw.limiter import AdmissionRequest, Limiter, Settlement
from ratelimit_gw.management import AccountError
from ratelimit_gw.money import parse_usd
from ratelimit_gw.storage import Storage

HOLD = parse_usd("0.013")


@pytest.fixture
def limiter(storage: Storage) -> Limiter:
    return Limiter(storage)


def admission(key_id: str, hold_nano: int = HOLD, account_id: str = "acme") -> AdmissionRequest:
    return AdmissionRequest(
        account_id=account_id,
        key_id=key_id,
        request_id=f"req-{uuid.uuid4().hex}",
        estimated_tokens=10,
        hold_nano=hold_nano,
        ttl_ms=60_000,
    )


def settlement(request: AdmissionRequest, cost_nano: int, outcome: str = "ok") -> Settlement:
    return Settlement(
        account_id=request.account_id,
        key_id=request.key_id,
        request_id=request.request_id,
        estimated_tokens=request.estimated_tokens,
        input_tokens=5,
        output_tokens=5,
        cost_nano=cost_nano,
        model="gpt-4o-mini",
        outcome=outcome,
    )


async def redis_ms(storage: Storage) -> int:
    seconds, micros = await storage.call("TIME")
    return int(seconds) * 1000 + int(micros) // 1000


async def budget(accounts: AccountStore, usd: str, period: str = "day", **more: Any) -> None:
    await accounts.update_account("acme", {"budget_usd": usd, "budget_period": period, **more})


async def spend(storage: Storage, name: str) -> dict[str, str]:
    result: dict[str, str] = await storage.call("HGETALL", name)
    return result


# ---------------------------------------------------------------- periods


def test_calendar_periods_begin_at_midnight_in_the_time_zone() -> None:
    # 2026-03-29 is the day Paris moves to summer time: that day is 23 hours long.
    noon = 1774778400000  # 2026-03-29T10:00:00Z
    start, end = bounds("day", "Europe/Paris", noon)
    assert (start, end) == (1774738800000, 1774821600000)  # 28T23:00Z to 29T22:00Z
    assert end - start == 23 * 3600_000
    week = bounds("week", "UTC", noon)  # a Sunday: its week began on Monday the 23rd
    assert week == (1774224000000, 1774828800000)
    month = bounds("month", "America/New_York", noon)
    assert month == (1772341200000, 1775016000000)  # 1 March 05:00Z to 1 April 04:00Z
    assert bounds("custom:10", "Asia/Tokyo", 1_000_123_456) == (1_000_120_000, 1_000_130_000)


def test_budget_changes_are_checked() -> None:
    assert budgets.budget_changes({"budget_usd": "2.50", "budget_period": "week"}) == (
        ["budget_nano", 2_500_000_000, "budget_period", "week"],
        [],
    )
    assert budgets.budget_changes({"budget_usd": None}) == ([], ["budget_nano", "budget_period"])
    custom = {"budget_usd": "1", "budget_period": "custom", "budget_period_s": 5}
    assert budgets.budget_changes(custom)[0][-1] == "custom:5"
    for bad in (
        {"budget_usd": "1.00"},
        {"budget_period": "day"},
        {"budget_usd": "0", "budget_period": "day"},
        {"budget_usd": "1", "budget_period": "year"},
        {"budget_usd": "1", "budget_period": "custom"},
        {"budget_usd": "1", "budget_period": "day", "budget_period_s": 5},
    ):
        with pytest.raises(AccountError):
            budgets.budget_changes(bad)
    with pytest.raises(AccountError, match="IANA"):
        budgets.check_timezone("Mars/Olympus")


# ---------------------------------------------------------------- admission and settlement


async def test_concurrent_admissions_never_exceed_the_budget(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme")  # metered: a budget is its only cap
    key_id = (await accounts.create_key("acme")).record.id
    await budget(accounts, "1.00")
    requests = [admission(key_id) for _ in range(200)]
    decisions = await asyncio.gather(*(limiter.admit(r) for r in requests))
    admitted = [r for r, d in zip(requests, decisions, strict=True) if d.allowed]
    assert len(admitted) == 76  # 76 × $0.013 = $0.988; one more would pass $1.00
    refused = [d for d in decisions if not d.allowed]
    assert {d.reason for d in refused} == {"budget_exceeded"}
    assert {d.budget_scope for d in refused} == {"account"}
    assert refused[0].budget_cap_nano == parse_usd("1.00")
    await asyncio.gather(*(limiter.settle(settlement(r, HOLD - 1000)) for r in admitted))
    shown = (await accounts.get_account("acme")).budget
    assert shown is not None
    assert shown.spent_usd == "0.987924" and shown.held_usd == "0.00"
    assert shown.usd == "1.00" and shown.period == "day" and shown.timezone == "UTC"
    # What settlement gave back admits one more, and no further.
    again = [await limiter.admit(admission(key_id)) for _ in range(2)]
    assert [d.allowed for d in again] == [False, False]  # 0.987924 + 0.013 > 1.00
    small = await limiter.admit(admission(key_id, hold_nano=parse_usd("0.012")))
    assert small.allowed


async def test_the_tighter_of_key_and_account_budgets_wins(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme", balance_nano=parse_usd("100"))
    tight = (await accounts.create_key("acme")).record.id
    other = (await accounts.create_key("acme")).record.id
    await budget(accounts, "0.10", "month")
    await accounts.update_key(tight, {"budget_usd": "0.05", "budget_period": "week"})
    results = [await limiter.admit(admission(tight)) for _ in range(4)]
    assert [d.allowed for d in results] == [True, True, True, False]
    assert results[-1].budget_scope == "key"
    assert results[-1].budget_used_nano == 3 * HOLD
    # The other key has no budget of its own: the account's caps both.
    results = [await limiter.admit(admission(other)) for _ in range(5)]
    assert [d.allowed for d in results] == [True, True, True, True, False]
    assert results[-1].budget_scope == "account"
    key = await accounts.get_key("acme", tight)
    assert key.budget is not None and key.budget.held_usd == "0.039" and key.budget.period == "week"
    listed = {k.id: k for k in await accounts.list_keys("acme")}
    assert listed[tight].budget == key.budget and listed[other].budget is None
    account = await accounts.get_account("acme")
    assert account.budget is not None and account.budget.held_usd == "0.091"
    assert account.budget.remaining_usd == "0.009"


async def test_a_stale_period_is_refused_and_writes_nothing(
    storage: Storage, accounts: AccountStore
) -> None:
    await accounts.create_account("acme")
    key_id = (await accounts.create_key("acme")).record.id
    await budget(accounts, "1.00", "custom", budget_period_s=60)
    keys = AccountKeys("acme")
    now = await redis_ms(storage)
    start, end = bounds("custom:60", "UTC", now - 120_000)  # two periods ago
    spend_key = keys.account_spend(budgets.spend_name("custom:60", start))
    args = ["admit", "r1", key_id, 10, HOLD, 60_000, "|custom:60|", start, end, 0, 0]
    reply = await storage.run("admit", [*keys.admit_keys(key_id), spend_key], args)
    assert reply[1] == "budget_period_stale"
    assert reply[15] == "|custom:60|" and abs(reply[16] - now) < 5_000
    assert await storage.call("HLEN", keys.holds) == 0
    assert await storage.call("EXISTS", spend_key) == 0
    # A shape the gateway does not know of (no budget passed) is refused as well.
    reply = await storage.run("admit", keys.admit_keys(key_id), args[:6])
    assert reply[1] == "budget_period_stale"
    # Limiter recomputes the bounds for the script's time and is admitted.
    decision = await Limiter(storage).admit(admission(key_id))
    assert decision.allowed


async def test_a_hold_settles_into_the_period_it_was_placed_in(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme", balance_nano=parse_usd("10"))
    key_id = (await accounts.create_key("acme")).record.id
    await budget(accounts, "0.02", "custom", budget_period_s=2)
    # Start right after a boundary, so the period does not end between the two admissions.
    now = await redis_ms(storage)
    await asyncio.sleep((2000 - now % 2000 + 50) / 1000)
    first = admission(key_id)
    assert (await limiter.admit(first)).allowed
    refused = await limiter.admit(admission(key_id))
    assert refused.reason == "budget_exceeded" and 0 < refused.retry_after_ms <= 2000
    old_start = refused.budget_reset_ms - 2000
    await asyncio.sleep(refused.retry_after_ms / 1000 + 0.05)
    # A new period: the full budget again, while the first hold is still live.
    second = admission(key_id)
    assert (await limiter.admit(second)).allowed
    await limiter.settle(settlement(first, parse_usd("0.004")))
    keys = AccountKeys("acme")
    old = await spend(storage, keys.account_spend(f"custom:2:{old_start}"))
    assert old == {"spent_nano": str(parse_usd("0.004")), "held_nano": "0"}
    new = await spend(storage, keys.account_spend(f"custom:2:{old_start + 2000}"))
    assert new == {"held_nano": str(HOLD)}
    ttl = await storage.call("PTTL", keys.account_spend(f"custom:2:{old_start}"))
    assert 0 < ttl <= 2000 + 60_000 + budgets.SPEND_MARGIN_MS


async def test_an_expired_hold_counts_as_spent(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme")
    key_id = (await accounts.create_key("acme")).record.id
    await budget(accounts, "1.00")
    lost = msgspec.structs.replace(admission(key_id), ttl_ms=1)
    assert (await limiter.admit(lost)).allowed
    await asyncio.sleep(0.01)
    decision = await limiter.admit(admission(key_id))
    assert decision.allowed and decision.holds_expired == 1
    shown = (await accounts.get_account("acme")).budget
    assert shown is not None and shown.spent_usd == "0.013" and shown.held_usd == "0.013"


async def test_an_abandoned_admission_gives_its_hold_back(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme")
    key_id = (await accounts.create_key("acme")).record.id
    await budget(accounts, "1.00", "week")
    request = admission(key_id)
    assert (await limiter.admit(request)).allowed
    await limiter.settle(request.abandoned("gpt-4o-mini", ""))
    shown = (await accounts.get_account("acme")).budget
    assert shown is not None and (shown.spent_usd, shown.held_usd) == ("0.00", "0.00")


async def test_without_a_budget_admission_passes_nothing_more(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme")
    key_id = (await accounts.create_key("acme")).record.id
    await budget(accounts, "1.00")
    assert (await limiter.admit(admission(key_id))).allowed
    assert limiter._plans  # it learned the budget
    await accounts.update_account("acme", {"budget_usd": None})
    assert (await limiter.admit(admission(key_id))).allowed
    assert not limiter._plans  # and forgot it with the budget
    assert (await accounts.get_account("acme")).budget is None
