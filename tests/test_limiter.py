"""admit.lua, settle.lua and topup.lua through Limiter and AccountStore (§2, §4, §5, §11).

Every test takes ``storage`` and so runs on memory:// and on a real Redis. Times come from
Redis ``TIME``; where a test needs a bucket to have refilled it rewinds the bucket's ``ts``
instead of waiting a minute.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from typing import Any

import msgspec
import pytest
from redis.crc import key_slot

from ratelimit_gw import keyspace
from ratelimit_gw.accounts import AccountStore
from ratelimit_gw.keyspace import AccountKeys
from ratelimit_gw.limiter import AdmissionRequest, Limiter, Settlement
from ratelimit_gw.limits import Limits
from ratelimit_gw.management import AccountError
from ratelimit_gw.money import NANO_PER_USD, parse_usd
from ratelimit_gw.storage import Storage

from .conftest import with_limits

USD = NANO_PER_USD
MINUTE_MS = 60_000


@pytest.fixture
def limiter(storage: Storage) -> Limiter:
    return Limiter(storage)


# ---------------------------------------------------------------- helpers


async def new_key(accounts: AccountStore, account_id: str = "acme", **options: Any) -> str:
    created = await accounts.create_key(account_id, **with_limits(options))
    return created.record.id


def admission(
    key_id: str,
    account_id: str = "acme",
    *,
    tokens: int = 0,
    hold_nano: int = 0,
    ttl_ms: int = 60_000,
    request_id: str | None = None,
) -> AdmissionRequest:
    return AdmissionRequest(
        account_id=account_id,
        key_id=key_id,
        request_id=request_id or f"req-{uuid.uuid4().hex}",
        estimated_tokens=tokens,
        hold_nano=hold_nano,
        ttl_ms=ttl_ms,
    )


def settlement(
    request: AdmissionRequest,
    *,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cost_nano: int = 0,
    outcome: str = "ok",
) -> Settlement:
    return Settlement(
        account_id=request.account_id,
        key_id=request.key_id,
        request_id=request.request_id,
        estimated_tokens=request.estimated_tokens,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_nano=cost_nano,
        model="gpt-4o-mini",
        outcome=outcome,
    )


async def redis_ms(storage: Storage) -> float:
    """Redis's clock (the one the scripts use), in ms with µs precision."""
    seconds, micros = await storage.call("TIME")
    return int(seconds) * 1000 + int(micros) / 1000


async def refill_bound(storage: Storage, since_ms: float, per_minute: int, cost: int = 1) -> int:
    """The most whole requests of ``cost`` a bucket of ``per_minute`` can refill since then."""
    elapsed_ms = await redis_ms(storage) - since_ms + 1  # +1: scripts truncate to whole ms
    return math.floor(elapsed_ms * per_minute / MINUTE_MS / cost)


async def snapshot(storage: Storage) -> tuple[dict[str, Any], dict[str, int]]:
    """Every key's type and full value, and every key's remaining TTL."""
    values: dict[str, Any] = {}
    ttls: dict[str, int] = {}
    for key in sorted(await storage.call("KEYS", "*")):
        kind = await storage.call("TYPE", key)
        if kind == "hash":
            value: Any = await storage.call("HGETALL", key)
        elif kind == "zset":
            value = await storage.call("ZRANGE", key, 0, -1, "WITHSCORES")
        elif kind == "stream":
            value = await storage.call("XRANGE", key, "-", "+")
        elif kind == "set":
            value = sorted(await storage.call("SMEMBERS", key))
        elif kind == "string":
            value = await storage.call("GET", key)
        else:
            raise AssertionError(f"unexpected type {kind} of {key}")
        values[key] = (kind, value)
        ttls[key] = int(await storage.call("PTTL", key))
    return values, ttls


def assert_unchanged(
    before: tuple[dict[str, Any], dict[str, int]], after: tuple[dict[str, Any], dict[str, int]]
) -> None:
    assert after[0] == before[0]
    for key, ttl_before in before[1].items():
        ttl_after = after[1][key]
        if ttl_before < 0:
            assert ttl_after == ttl_before, f"{key} gained an expiry"
        else:
            assert 0 <= ttl_after <= ttl_before, f"{key}: expiry was refreshed"


async def account_field(storage: Storage, account_id: str, field: str) -> str | None:
    value: str | None = await storage.call("HGET", AccountKeys(account_id).account, field)
    return value


def key_bucket(key_id: str, kind: str, account_id: str = "acme") -> tuple[str, str]:
    """(hash, kind) of a key's bucket: buckets are fields of their scope's hash."""
    return AccountKeys(account_id).key(key_id), kind


def account_bucket(kind: str, account_id: str = "acme") -> tuple[str, str]:
    return AccountKeys(account_id).account, kind


async def bucket_level(storage: Storage, bucket: tuple[str, str]) -> float:
    scope_hash, kind = bucket
    return float(await storage.call("HGET", scope_hash, f"{kind}_level"))


async def rewind_bucket(storage: Storage, bucket: tuple[str, str], ms: int) -> None:
    """Pretend the bucket was last updated ``ms`` earlier: it refills as if that time passed."""
    scope_hash, kind = bucket
    ts = int(await storage.call("HGET", scope_hash, f"{kind}_ts"))
    await storage.call("HSET", scope_hash, f"{kind}_ts", ts - ms)


async def sleep_past(storage: Storage, redis_deadline_ms: float) -> None:
    """Wait until Redis's clock has passed a deadline (TTLs are judged by Redis time)."""
    while (now := await redis_ms(storage)) <= redis_deadline_ms:
        await asyncio.sleep((redis_deadline_ms - now) / 1000 + 0.005)


async def ledger_types(accounts: AccountStore, account_id: str = "acme") -> list[str]:
    return [entry.type for entry in await accounts.ledger(account_id, limit=10_000)]


# ---------------------------------------------------------------- token buckets (§4)


async def test_rpm_bucket_starts_full_and_rejects_when_empty(
    accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme")
    key_id = await new_key(accounts, rpm=3)

    remaining = []
    for _ in range(3):
        decision = await limiter.admit(admission(key_id))
        assert decision.allowed and decision.reason == "ok"
        assert decision.requests is not None and decision.requests.limit == 3
        remaining.append(decision.requests.remaining)
    assert remaining == [2, 1, 0]

    rejected = await limiter.admit(admission(key_id))
    assert not rejected.allowed
    assert rejected.reason == "rpm_exceeded"
    assert rejected.hit_limit == 3
    # One request of a 3-rpm bucket refills in 20 s, less what already trickled in.
    assert 19_000 < rejected.retry_after_ms <= 20_000
    assert rejected.tokens is None and rejected.concurrency_limit is None


async def test_rpm_bucket_refills_at_capacity_per_minute(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme")
    key_id = await new_key(accounts, rpm=60)
    results = await asyncio.gather(*(limiter.admit(admission(key_id)) for _ in range(60)))
    assert all(d.allowed for d in results)
    assert not (await limiter.admit(admission(key_id))).allowed

    # 2 s at 60 rpm refill exactly 2 requests.
    await rewind_bucket(storage, key_bucket(key_id, "rpm"), 2000)
    assert (await limiter.admit(admission(key_id))).allowed
    assert (await limiter.admit(admission(key_id))).allowed
    third = await limiter.admit(admission(key_id))
    assert third.reason == "rpm_exceeded"
    assert 0 < third.retry_after_ms <= 1000


async def test_tpm_bucket_charges_the_estimate(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme")
    key_id = await new_key(accounts, tpm=1000)
    start = await redis_ms(storage)

    first = await limiter.admit(admission(key_id, tokens=400))
    assert first.allowed
    assert first.tokens is not None and first.tokens.limit == 1000
    assert first.tokens.remaining == 600
    assert first.requests is None  # no rpm limit anywhere

    too_big_now = await limiter.admit(admission(key_id, tokens=700))
    assert too_big_now.reason == "tpm_exceeded"
    assert too_big_now.hit_limit == 1000
    # 100 tokens missing at 1000/min: 6 s, less what refilled meanwhile.
    assert 6000 - (await redis_ms(storage) - start) - 1 <= too_big_now.retry_after_ms <= 6000

    fits = await limiter.admit(admission(key_id, tokens=600))
    assert fits.allowed
    assert fits.tokens is not None
    assert 0 <= fits.tokens.remaining <= await refill_bound(storage, start, 1000)


async def test_request_larger_than_a_bucket_can_never_pass(
    accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme", limits=Limits(tpm=5000, rpm=1))
    key_id = await new_key(accounts, tpm=1000)
    assert (await limiter.admit(admission(key_id, tokens=10))).allowed  # account rpm now empty

    decision = await limiter.admit(admission(key_id, tokens=1001))
    # Reported above the (curable) rpm rejection: waiting never helps this one.
    assert decision.reason == "request_exceeds_limit"
    assert decision.retry_after_ms == 0
    assert decision.hit_limit == 1000


async def test_account_buckets_are_shared_by_its_keys(
    accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme", limits=Limits(rpm=3, tpm=1000))
    key_a = await new_key(accounts)
    key_b = await new_key(accounts)

    assert (await limiter.admit(admission(key_a, tokens=300))).allowed
    assert (await limiter.admit(admission(key_a, tokens=300))).allowed
    third = await limiter.admit(admission(key_b, tokens=300))
    assert third.allowed
    assert third.requests is not None and third.requests.remaining == 0
    assert third.tokens is not None and third.tokens.remaining == 100

    for key_id in (key_a, key_b):
        decision = await limiter.admit(admission(key_id, tokens=1))
        assert decision.reason == "rpm_exceeded"
        assert decision.hit_limit == 3


async def test_account_tpm_is_the_sum_over_its_keys(
    accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme", limits=Limits(tpm=1000))
    key_a = await new_key(accounts)
    key_b = await new_key(accounts)

    assert (await limiter.admit(admission(key_a, tokens=600))).allowed
    rejected = await limiter.admit(admission(key_b, tokens=600))
    assert rejected.reason == "tpm_exceeded"
    assert rejected.hit_limit == 1000
    assert (await limiter.admit(admission(key_b, tokens=400))).allowed


async def test_key_limits_bind_only_their_key_and_tightest_bucket_is_reported(
    accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme", limits=Limits(rpm=10))
    limited = await new_key(accounts, rpm=1)
    free = await new_key(accounts)

    first = await limiter.admit(admission(limited))
    assert first.requests is not None
    assert (first.requests.limit, first.requests.remaining) == (1, 0)  # key bucket is tighter
    rejected = await limiter.admit(admission(limited))
    assert rejected.reason == "rpm_exceeded" and rejected.hit_limit == 1

    other = await limiter.admit(admission(free))
    assert other.allowed
    assert other.requests is not None
    assert (other.requests.limit, other.requests.remaining) == (10, 8)


# ---------------------------------------------------------------- exactness under concurrency


async def test_concurrent_admissions_admit_exactly_the_rpm_capacity(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    capacity, attempts = 50, 300
    await accounts.create_account("acme")
    key_id = await new_key(accounts, rpm=capacity)

    start = await redis_ms(storage)
    decisions = await asyncio.gather(*(limiter.admit(admission(key_id)) for _ in range(attempts)))
    refilled = await refill_bound(storage, start, capacity)

    admitted = sum(d.allowed for d in decisions)
    assert capacity <= admitted <= capacity + refilled
    assert {d.reason for d in decisions if not d.allowed} == {"rpm_exceeded"}


async def test_concurrent_admissions_admit_exactly_the_tpm_capacity(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    capacity, estimate, attempts = 50_000, 1000, 300
    await accounts.create_account("acme")
    key_id = await new_key(accounts, tpm=capacity)

    start = await redis_ms(storage)
    decisions = await asyncio.gather(
        *(limiter.admit(admission(key_id, tokens=estimate)) for _ in range(attempts))
    )
    refilled = await refill_bound(storage, start, capacity, cost=estimate)

    admitted = sum(d.allowed for d in decisions)
    assert capacity // estimate <= admitted <= capacity // estimate + refilled
    assert {d.reason for d in decisions if not d.allowed} == {"tpm_exceeded"}


async def test_concurrent_admissions_get_exactly_the_concurrency_limit(
    accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme")
    key_id = await new_key(accounts, concurrency=7)

    decisions = await asyncio.gather(*(limiter.admit(admission(key_id)) for _ in range(300)))
    granted = [d for d in decisions if d.allowed]
    assert len(granted) == 7
    assert sorted(d.concurrency_in_use for d in granted) == [1, 2, 3, 4, 5, 6, 7]
    assert {d.reason for d in decisions if not d.allowed} == {"concurrency_exceeded"}


async def test_account_concurrency_is_shared_by_its_keys_under_concurrency(
    accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme", limits=Limits(concurrency=5))
    keys = [await new_key(accounts), await new_key(accounts, concurrency=100)]

    decisions = await asyncio.gather(*(limiter.admit(admission(keys[i % 2])) for i in range(300)))
    assert sum(d.allowed for d in decisions) == 5
    assert all(d.concurrency_limit == 5 for d in decisions if d.allowed)


async def test_concurrent_worst_case_requests_never_overspend_the_balance(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    hold, affordable, attempts = parse_usd("0.013"), 40, 250
    await accounts.create_account("acme", balance_nano=hold * affordable)
    key_id = await new_key(accounts)

    requests = [admission(key_id, hold_nano=hold, tokens=100) for _ in range(attempts)]
    decisions = await asyncio.gather(*(limiter.admit(r) for r in requests))
    admitted = [r for r, d in zip(requests, decisions, strict=True) if d.allowed]
    assert len(admitted) == affordable
    assert {d.reason for d in decisions if not d.allowed} == {"balance_exceeded"}
    assert await account_field(storage, "acme", "held_nano") == str(hold * affordable)

    # Every admitted request costs at most its hold: the balance can never go negative.
    results = await asyncio.gather(
        *(
            limiter.settle(settlement(r, input_tokens=50, output_tokens=i, cost_nano=hold - i))
            for i, r in enumerate(admitted)
        )
    )
    assert all(r.settled and not r.overrun for r in results)
    account = await accounts.get_account("acme")
    assert account.held_usd == "0.00" and account.holds_live == 0
    balance = int(str(await account_field(storage, "acme", "balance_nano")))
    charged = sum(
        parse_usd(e.cost_usd or "x")
        for e in await accounts.ledger("acme", limit=1000)
        if e.type == "charge"
    )
    assert balance >= 0
    assert hold * affordable - balance == charged == sum(hold - i for i in range(affordable))


# ---------------------------------------------------------------- rejections consume nothing


@pytest.mark.parametrize(
    "reason",
    [
        "rpm_exceeded",
        "tpm_exceeded",
        "concurrency_exceeded",
        "request_exceeds_limit",
        "balance_exceeded",
        "key_revoked",
    ],
)
async def test_rejected_request_consumes_nothing(
    storage: Storage, accounts: AccountStore, limiter: Limiter, reason: str
) -> None:
    key_limits = {"rpm": 100, "tpm": 100_000, "concurrency": 10}
    if reason == "rpm_exceeded":
        key_limits["rpm"] = 1
    elif reason == "tpm_exceeded":
        key_limits["tpm"] = 1000
    elif reason == "concurrency_exceeded":
        key_limits["concurrency"] = 1
    await accounts.create_account(
        "acme", balance_nano=USD, limits=Limits(rpm=100, tpm=100_000, concurrency=10)
    )
    key_id = await new_key(accounts, **key_limits)
    # A first admission creates every bucket, lease set and hold the rejection could touch.
    assert (await limiter.admit(admission(key_id, tokens=900, hold_nano=USD // 10))).allowed
    if reason == "key_revoked":
        await accounts.revoke_key(key_id)
    await asyncio.sleep(0.02)  # so a rewritten bucket `ts` would differ

    rejected_request = admission(
        key_id,
        tokens={"tpm_exceeded": 200, "request_exceeds_limit": 200_000}.get(reason, 100),
        hold_nano=USD if reason == "balance_exceeded" else USD // 10,
    )
    before = await snapshot(storage)
    decision = await limiter.admit(rejected_request)
    after = await snapshot(storage)

    assert not decision.allowed
    assert decision.reason == reason
    assert_unchanged(before, after)


async def test_peek_writes_nothing(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account(
        "acme", balance_nano=USD, limits=Limits(rpm=10, tpm=10_000, concurrency=5)
    )
    key_id = await new_key(accounts, rpm=5, tpm=5000, concurrency=3)
    start = await redis_ms(storage)
    live = admission(key_id, tokens=1000, hold_nano=USD // 4)
    assert (await limiter.admit(live)).allowed
    stale = admission(key_id, tokens=500, hold_nano=USD // 4, ttl_ms=50)
    stale_admitted_at = await redis_ms(storage)
    assert (await limiter.admit(stale)).allowed
    await sleep_past(storage, stale_admitted_at + 60)  # an expired hold and lease to sweep

    before = await snapshot(storage)
    first = await limiter.peek("acme", key_id)
    second = await limiter.peek("acme", key_id)
    after = await snapshot(storage)

    assert_unchanged(before, after)
    assert first.holds_expired == 0
    assert first.requests is not None and first.requests.limit == 5
    assert first.requests.remaining == second.requests.remaining == 3  # type: ignore[union-attr]
    assert first.tokens is not None
    assert 3500 <= first.tokens.remaining <= 3500 + await refill_bound(storage, start, 5000)
    assert first.concurrency_limit == 3
    assert first.available_nano == USD // 2  # the stale hold is still counted until swept


# ---------------------------------------------------------------- settlement (§4, §5)


async def test_settlement_refunds_unused_estimated_tokens(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme", limits=Limits(tpm=2000))
    key_id = await new_key(accounts, tpm=1000)
    start = await redis_ms(storage)
    request = admission(key_id, tokens=400)
    assert (await limiter.admit(request)).allowed

    result = await limiter.settle(settlement(request, input_tokens=60, output_tokens=40))
    assert result.settled
    trickle = (await redis_ms(storage) - start + 1) * 2000 / MINUTE_MS
    key_level = await bucket_level(storage, key_bucket(key_id, "tpm"))
    account_level = await bucket_level(storage, account_bucket("tpm"))
    assert 900 <= key_level <= 900 + trickle
    assert 1900 <= account_level <= 1900 + trickle


async def test_settlement_corrects_from_the_estimate_charged_at_admission(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme")
    key_id = await new_key(accounts, tpm=60_000)  # refills 1 token per ms
    bucket = key_bucket(key_id, "tpm")
    request = admission(key_id, tokens=30_000)
    start = await redis_ms(storage)
    assert (await limiter.admit(request)).allowed

    # A caller that lost track of its estimate cannot skew the bucket: 30 000 were charged,
    # 10 000 used, so 20 000 come back (a refund from 50 000 would fill the bucket).
    confused = msgspec.structs.replace(
        settlement(request, input_tokens=10_000), estimated_tokens=50_000
    )
    await limiter.settle(confused)
    level = await bucket_level(storage, bucket)
    assert 50_000 <= level <= 50_000 + await refill_bound(storage, start, 60_000)


async def test_settlement_debits_extra_tokens_below_zero_then_refills(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme")
    key_id = await new_key(accounts, tpm=1000)
    bucket = key_bucket(key_id, "tpm")
    first, second = admission(key_id, tokens=500), admission(key_id, tokens=500)
    assert (await limiter.admit(first)).allowed
    assert (await limiter.admit(second)).allowed

    # The upstream used 1000 tokens where 500 were estimated: 500 more are owed.
    await limiter.settle(settlement(first, input_tokens=200, output_tokens=800))
    level = await bucket_level(storage, bucket)
    assert -500 <= level < -490

    peeked = await limiter.peek("acme", key_id)
    assert peeked.tokens is not None
    assert peeked.tokens.remaining == 0
    assert 89_000 < peeked.tokens.reset_ms <= 90_000  # from -500 to 1000 at 1000/min
    blocked = await limiter.admit(admission(key_id, tokens=1))
    assert blocked.reason == "tpm_exceeded"
    assert 29_000 < blocked.retry_after_ms <= 30_060

    await rewind_bucket(storage, bucket, 31_000)  # 31 s refill 516.7 tokens: level ≈ 16.7
    assert (await limiter.admit(admission(key_id, tokens=16))).allowed
    assert (await limiter.admit(admission(key_id, tokens=10))).reason == "tpm_exceeded"


async def test_settlement_releases_lease_and_hold_and_charges_cost(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme", balance_nano=USD)
    key_id = await new_key(accounts, concurrency=1)
    request = admission(key_id, tokens=300, hold_nano=parse_usd("0.20"))
    decision = await limiter.admit(request)
    assert decision.allowed and decision.available_nano == parse_usd("0.80")
    account = await accounts.get_account("acme")
    assert (account.held_usd, account.available_usd, account.holds_live) == ("0.20", "0.80", 1)
    assert (await limiter.admit(admission(key_id))).reason == "concurrency_exceeded"

    result = await limiter.settle(
        settlement(request, input_tokens=100, output_tokens=50, cost_nano=parse_usd("0.05"))
    )
    assert result.settled and not result.overrun
    assert result.balance_nano == parse_usd("0.95")
    assert result.released_nano == parse_usd("0.20")
    account = await accounts.get_account("acme")
    assert (account.balance_usd, account.held_usd, account.spent_usd) == ("0.95", "0.00", "0.05")
    assert account.holds_live == 0

    entry = (await accounts.ledger("acme", limit=1))[0]
    assert entry.type == "charge"
    assert (entry.request_id, entry.key_id, entry.model) == (
        request.request_id,
        key_id,
        "gpt-4o-mini",
    )
    assert (entry.input_tokens, entry.output_tokens) == (100, 50)
    assert (entry.cost_usd, entry.balance_usd, entry.outcome) == ("0.05", "0.95", "ok")

    assert (await limiter.admit(admission(key_id))).allowed  # the lease was released


async def test_repeated_settlement_changes_nothing(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme", balance_nano=USD, limits=Limits(tpm=10_000))
    key_id = await new_key(accounts, tpm=5000, concurrency=2)
    request = admission(key_id, tokens=1000, hold_nano=parse_usd("0.30"))
    assert (await limiter.admit(request)).allowed
    settle = settlement(request, input_tokens=10, output_tokens=20, cost_nano=parse_usd("0.10"))
    assert (await limiter.settle(settle)).settled
    ledger_length = len(await ledger_types(accounts))
    await asyncio.sleep(0.01)

    before = await snapshot(storage)
    again = await limiter.settle(settle)
    after = await snapshot(storage)
    assert not again.settled
    assert again.balance_nano == parse_usd("0.90")
    assert again.released_nano == 0
    assert_unchanged(before, after)
    account = await accounts.get_account("acme")
    assert (account.balance_usd, account.spent_usd) == ("0.90", "0.10")
    assert len(await ledger_types(accounts)) == ledger_length


async def test_settlement_of_unknown_request_still_charges_once(
    accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme", balance_nano=USD)
    key_id = await new_key(accounts)
    never_admitted = admission(key_id, request_id="req-from-nowhere")

    result = await limiter.settle(
        settlement(never_admitted, input_tokens=5, output_tokens=5, cost_nano=parse_usd("0.01"))
    )
    assert result.settled and result.released_nano == 0
    assert result.balance_nano == parse_usd("0.99")
    entry = (await accounts.ledger("acme", limit=1))[0]
    assert (entry.type, entry.request_id, entry.cost_usd) == ("charge", "req-from-nowhere", "0.01")
    assert (await accounts.get_account("acme")).held_usd == "0.00"

    duplicate = await limiter.settle(settlement(never_admitted, cost_nano=parse_usd("0.01")))
    assert not duplicate.settled
    assert (await accounts.get_account("acme")).balance_usd == "0.99"


async def test_settlement_without_cost_releases_the_hold_and_records_a_release(
    accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme", balance_nano=USD)
    key_id = await new_key(accounts)
    request = admission(key_id, tokens=100, hold_nano=parse_usd("0.40"))
    assert (await limiter.admit(request)).allowed

    result = await limiter.settle(settlement(request, outcome="upstream_error"))
    assert result.settled and result.released_nano == parse_usd("0.40")
    account = await accounts.get_account("acme")
    assert (account.balance_usd, account.held_usd, account.spent_usd) == ("1.00", "0.00", "0.00")
    entry = (await accounts.ledger("acme", limit=1))[0]
    assert (entry.type, entry.outcome, entry.cost_usd) == ("release", "upstream_error", "0.00")


async def test_overrun_is_recorded_and_the_next_request_is_refused(
    accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme", balance_nano=parse_usd("0.10"))
    key_id = await new_key(accounts)
    request = admission(key_id, tokens=100, hold_nano=parse_usd("0.10"))
    assert (await limiter.admit(request)).allowed

    # An upstream that ignored the output cap cost more than the hold.
    result = await limiter.settle(
        settlement(request, output_tokens=999, cost_nano=parse_usd("0.30"))
    )
    assert result.settled and result.overrun
    assert result.balance_nano == -parse_usd("0.20")
    account = await accounts.get_account("acme")
    assert (account.balance_usd, account.overruns) == ("-0.20", 1)
    assert (await ledger_types(accounts))[:2] == ["overrun", "charge"]

    refused = await limiter.admit(admission(key_id, hold_nano=1))
    assert refused.reason == "balance_exceeded"
    assert refused.available_nano == -parse_usd("0.20")


async def test_settlement_on_a_postpaid_account_counts_spend_without_a_balance(
    accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme")
    key_id = await new_key(accounts)
    request = admission(key_id, tokens=100, hold_nano=parse_usd("5.00"))
    decision = await limiter.admit(request)
    assert decision.allowed and decision.available_nano is None

    result = await limiter.settle(settlement(request, cost_nano=parse_usd("0.25")))
    assert result.settled and not result.overrun
    account = await accounts.get_account("acme")
    assert (account.prepaid, account.balance_usd, account.spent_usd) == (False, "0.00", "0.25")


# ---------------------------------------------------------------- dead gateways (§4, §5)


async def test_lease_of_an_unsettled_request_expires(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme")
    key_id = await new_key(accounts, concurrency=1)
    admitted_at = await redis_ms(storage)
    assert (await limiter.admit(admission(key_id, ttl_ms=300))).allowed  # never settled
    assert (await limiter.admit(admission(key_id))).reason == "concurrency_exceeded"

    await sleep_past(storage, admitted_at + 310)
    assert (await limiter.peek("acme", key_id)).concurrency_in_use == 0
    decision = await limiter.admit(admission(key_id))
    assert decision.allowed
    assert decision.concurrency_in_use == 1
    assert decision.holds_expired == 1


async def test_expired_hold_is_released_and_recorded(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme", balance_nano=USD)
    key_id = await new_key(accounts)
    orphan = admission(key_id, tokens=100, hold_nano=parse_usd("0.60"), ttl_ms=300)
    admitted_at = await redis_ms(storage)
    assert (await limiter.admit(orphan)).allowed
    blocked = await limiter.admit(admission(key_id, hold_nano=parse_usd("0.60")))
    assert blocked.reason == "balance_exceeded"
    assert blocked.holds_expired == 0

    await sleep_past(storage, admitted_at + 310)
    fresh = admission(key_id, hold_nano=parse_usd("0.60"))
    decision = await limiter.admit(fresh)
    assert decision.allowed
    assert decision.holds_expired == 1
    assert decision.available_nano == parse_usd("0.40")
    account = await accounts.get_account("acme")
    assert (account.held_usd, account.holds_live, account.holds_expired) == ("0.60", 1, 1)
    expired = [e for e in await accounts.ledger("acme") if e.type == "hold_expired"]
    assert len(expired) == 1
    assert (expired[0].request_id, expired[0].key_id) == (orphan.request_id, key_id)
    assert expired[0].hold_usd == "0.60"

    # The gateway comes back and settles late: the cost is charged, the hold not released twice.
    late = await limiter.settle(settlement(orphan, cost_nano=parse_usd("0.10")))
    assert late.settled and late.released_nano == 0
    account = await accounts.get_account("acme")
    assert (account.balance_usd, account.held_usd) == ("0.90", "0.60")


async def test_expired_hold_is_swept_even_when_the_request_is_rejected(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme", balance_nano=USD)
    key_id = await new_key(accounts, rpm=1)
    admitted_at = await redis_ms(storage)
    assert (await limiter.admit(admission(key_id, hold_nano=USD, ttl_ms=100))).allowed
    await sleep_past(storage, admitted_at + 110)

    decision = await limiter.admit(admission(key_id))
    assert decision.reason == "rpm_exceeded"
    assert decision.holds_expired == 1
    assert await account_field(storage, "acme", "held_nano") == "0"


# ---------------------------------------------------------------- keys (§2)


async def test_revocation_takes_effect_on_the_next_admission(
    accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme")
    key_id = await new_key(accounts)
    other = await new_key(accounts)
    assert (await limiter.admit(admission(key_id))).allowed

    await accounts.revoke_key(key_id)
    decision = await limiter.admit(admission(key_id))
    assert (decision.allowed, decision.reason) == (False, "key_revoked")
    peeked = await limiter.peek("acme", key_id)
    assert (peeked.allowed, peeked.reason) == (False, "key_revoked")
    assert (await limiter.admit(admission(other))).allowed


async def test_expired_key_is_rejected(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme")
    past = await new_key(accounts, expires_at="2020-01-01T00:00:00Z")
    assert (await limiter.admit(admission(past))).reason == "key_expired"
    assert (await limiter.peek("acme", past)).reason == "key_expired"

    expires_ms = int(time.time() * 1000) + 300
    soon = await new_key(accounts, expires_at=f"{expires_ms / 1000:.3f}")
    assert (await limiter.admit(admission(soon))).allowed
    await sleep_past(storage, expires_ms)
    assert (await limiter.admit(admission(soon))).reason == "key_expired"


async def test_unknown_key_or_account_is_invalid(accounts: AccountStore, limiter: Limiter) -> None:
    await accounts.create_account("acme")
    key_id = await new_key(accounts)
    assert (await limiter.admit(admission("key_0000000000000000"))).reason == "invalid_key"
    assert (await limiter.admit(admission(key_id, account_id="other"))).reason == "invalid_key"


# ---------------------------------------------------------------- rpm policies (§4)


async def test_fixed_policy_uses_the_configured_rpm(
    accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme", limits=Limits(rpm=7))
    await accounts.create_account("open")
    key_id = await new_key(accounts)
    open_key = await new_key(accounts, "open")

    decision = await limiter.peek("acme", key_id)
    assert decision.account_rpm == 7
    assert decision.requests is not None and decision.requests.limit == 7
    unlimited = await limiter.peek("open", open_key)
    assert unlimited.account_rpm is None and unlimited.requests is None


async def test_balance_policy_free_tier_is_6_rpm_and_enforced(
    accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme", rpm_policy="balance", limits=Limits(rpm=1000))
    key_id = await new_key(accounts)

    decisions = [await limiter.admit(admission(key_id)) for _ in range(7)]
    assert [d.allowed for d in decisions] == [True] * 6 + [False]
    assert decisions[0].account_rpm == 6
    assert decisions[0].requests is not None and decisions[0].requests.limit == 6
    assert (decisions[6].reason, decisions[6].hit_limit) == ("rpm_exceeded", 6)


@pytest.mark.parametrize(
    ("balance_usd", "rpm"),
    [("0", 6), ("5", 30), ("10.5", 31), ("100", 300), ("599.99", 1799), ("1000", 1800)],
)
async def test_balance_policy_is_three_rpm_per_dollar_clamped(
    accounts: AccountStore, limiter: Limiter, balance_usd: str, rpm: int
) -> None:
    await accounts.create_account("acme", balance_nano=parse_usd(balance_usd), rpm_policy="balance")
    key_id = await new_key(accounts)
    decision = await limiter.peek("acme", key_id)
    assert decision.account_rpm == rpm
    assert decision.requests is not None and decision.requests.limit == rpm


async def test_balance_policy_follows_the_current_balance(
    accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme", balance_nano=100 * USD, rpm_policy="balance")
    key_id = await new_key(accounts)
    request = admission(key_id)
    assert (await limiter.admit(request)).account_rpm == 300
    await limiter.settle(settlement(request, cost_nano=50 * USD))
    assert (await limiter.peek("acme", key_id)).account_rpm == 150
    # Spent down below $10 after topping up: the $30 floor, not the free tier.
    await limiter.settle(settlement(admission(key_id), cost_nano=49 * USD))
    assert (await limiter.peek("acme", key_id)).account_rpm == 30


@pytest.mark.parametrize(
    ("topups_usd", "rpm"),
    [
        ((), 6),
        (("4.99",), 6),
        (("5",), 30),
        (("3", "2"), 30),
        (("49.99",), 30),
        (("50",), 120),
        (("249.99",), 120),
        (("250",), 300),
        (("999.99",), 300),
        (("1000",), 600),
    ],
)
async def test_tier_policy_goes_by_total_topups(
    accounts: AccountStore, limiter: Limiter, topups_usd: tuple[str, ...], rpm: int
) -> None:
    await accounts.create_account("acme", balance_nano=0, rpm_policy="tier")
    for i, amount in enumerate(topups_usd):
        assert await accounts.topup("acme", parse_usd(amount), f"topup-{i}")
    key_id = await new_key(accounts)
    decision = await limiter.peek("acme", key_id)
    assert decision.account_rpm == rpm
    assert decision.requests is not None and decision.requests.limit == rpm


async def test_tier_policy_ignores_spending(accounts: AccountStore, limiter: Limiter) -> None:
    await accounts.create_account("acme", balance_nano=50 * USD, rpm_policy="tier")
    key_id = await new_key(accounts)
    await limiter.settle(settlement(admission(key_id), cost_nano=49 * USD))
    assert (await limiter.peek("acme", key_id)).account_rpm == 120


@pytest.mark.parametrize("policy", ["fixed", "balance", "tier"])
async def test_rpm_override_wins_over_any_policy(
    accounts: AccountStore, limiter: Limiter, policy: Any
) -> None:
    await accounts.create_account(
        "acme", balance_nano=1000 * USD, rpm_policy=policy, rpm_override=2, limits=Limits(rpm=500)
    )
    key_id = await new_key(accounts)
    decisions = [await limiter.admit(admission(key_id)) for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, True, False]
    assert {d.account_rpm for d in decisions} == {2}
    assert (decisions[2].reason, decisions[2].hit_limit) == ("rpm_exceeded", 2)


# ---------------------------------------------------------------- balance (§5)


async def test_holds_reserve_the_balance(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    await accounts.create_account("acme", balance_nano=USD)
    key_id = await new_key(accounts)

    first = await limiter.admit(admission(key_id, hold_nano=parse_usd("0.3")))
    assert first.available_nano == parse_usd("0.7")
    assert await account_field(storage, "acme", "held_nano") == str(parse_usd("0.3"))
    second = await limiter.admit(admission(key_id, hold_nano=parse_usd("0.7")))
    assert second.allowed and second.available_nano == 0

    refused = await limiter.admit(admission(key_id, hold_nano=1))
    assert refused.reason == "balance_exceeded"
    assert refused.retry_after_ms == 0
    assert refused.available_nano == 0
    account = await accounts.get_account("acme")
    assert (account.balance_usd, account.held_usd, account.holds_live) == ("1.00", "1.00", 2)


# ---------------------------------------------------------------- top-ups (§5)


async def test_topup_credits_once_per_idempotency_key(
    accounts: AccountStore,
) -> None:
    await accounts.create_account("acme", balance_nano=0)
    assert await accounts.topup("acme", parse_usd("2.50"), "invoice-1")
    assert not await accounts.topup("acme", parse_usd("2.50"), "invoice-1")
    with pytest.raises(AccountError) as conflict:  # the key again, another amount
        await accounts.topup("acme", parse_usd("9.00"), "invoice-1")
    assert (conflict.value.status, conflict.value.reason) == (409, "idempotency_conflict")
    account = await accounts.get_account("acme")
    assert (account.balance_usd, account.topped_up_usd) == ("2.50", "2.50")

    assert await accounts.topup("acme", parse_usd("2.50"), "invoice-2")
    account = await accounts.get_account("acme")
    assert (account.balance_usd, account.topped_up_usd) == ("5.00", "5.00")

    entries = await accounts.ledger("acme")
    assert [(e.type, e.idempotency_key, e.amount_usd, e.balance_usd) for e in entries] == [
        ("topup", "invoice-2", "2.50", "5.00"),
        ("topup", "invoice-1", "2.50", "2.50"),
    ]


async def test_initial_balance_is_a_recorded_topup(accounts: AccountStore) -> None:
    await accounts.create_account("acme", balance_nano=parse_usd("12.34"))
    entries = await accounts.ledger("acme")
    assert [(e.type, e.amount_usd, e.balance_usd) for e in entries] == [("topup", "12.34", "12.34")]


async def test_topup_of_unknown_account_is_refused(accounts: AccountStore) -> None:
    with pytest.raises(AccountError) as caught:
        await accounts.topup("ghost", USD, "invoice-1")
    assert caught.value.status == 404
    assert await accounts.list_accounts() == []


# ---------------------------------------------------------------- storage (§11)


async def test_every_key_of_an_account_is_in_its_hash_slot(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    declared: dict[str, set[str]] = {}
    for account_id in ("acme", "globex"):
        await accounts.create_account(
            account_id, balance_nano=USD, limits=Limits(rpm=100, tpm=100_000, concurrency=10)
        )
        keys = AccountKeys(account_id)
        declared[account_id] = {keys.topups, keys.key_ids}
        for _ in range(2):
            key_id = await new_key(accounts, account_id, rpm=50, tpm=50_000, concurrency=5)
            admit_keys, settle_keys = keys.admit_keys(key_id), keys.settle_keys(key_id)
            assert len({key_slot(k.encode()) for k in admit_keys + settle_keys}) == 1
            declared[account_id] |= {*admit_keys, *settle_keys}
            settled = admission(key_id, account_id, tokens=100, hold_nano=1000)
            assert (await limiter.admit(settled)).allowed
            await limiter.settle(settlement(settled, input_tokens=50, cost_nano=500))
            assert (await limiter.admit(admission(key_id, account_id, tokens=10))).allowed
        await accounts.topup(account_id, USD, "more")

    account_slots = {a: key_slot(AccountKeys(a).account.encode()) for a in declared}
    assert len(set(account_slots.values())) == 2
    for key in await storage.call("KEYS", "*"):
        if key == keyspace.ACCOUNTS_SET or key.startswith(("rlgw:keyhash:", "rlgw:keyid:")):
            continue  # the lookup indexes, read before the account is known
        owner = next(a for a in declared if key.startswith(AccountKeys(a).base + ":"))
        assert key in declared[owner], f"{key} is not a declared script key"
        assert key_slot(key.encode()) == account_slots[owner]


async def test_scripts_survive_script_flush(redis_storage: Storage) -> None:
    accounts, limiter = AccountStore(redis_storage), Limiter(redis_storage)
    await accounts.create_account("acme", balance_nano=USD, limits=Limits(rpm=10))
    key_id = await new_key(accounts)
    request = admission(key_id, hold_nano=parse_usd("0.1"))
    assert (await limiter.admit(request)).allowed

    await redis_storage.call("SCRIPT", "FLUSH")
    assert (await limiter.settle(settlement(request, cost_nano=parse_usd("0.1")))).settled
    await redis_storage.call("SCRIPT", "FLUSH")
    decision = await limiter.admit(admission(key_id))
    assert decision.requests is not None and decision.requests.remaining == 8
    await redis_storage.call("SCRIPT", "FLUSH")
    assert await accounts.topup("acme", USD, "after-flush")
    await redis_storage.call("SCRIPT", "FLUSH")
    await accounts.create_account("globex")
    assert (await accounts.get_account("acme")).balance_usd == "1.90"


def test_script_key_lists_name_the_same_keys_as_the_keyspace() -> None:
    # admit_keys spells the names out for speed; they must not drift from the properties.
    keys = AccountKeys("acme")
    assert keys.admit_keys("key_1") == [
        keys.account,
        keys.key("key_1"),
        keys.key_leases("key_1"),
        keys.inflight,
        keys.holds,
        keys.ledger,
        keys.settled,
    ]
    assert keys.settle_keys("key_1") == keys.admit_keys("key_1")
