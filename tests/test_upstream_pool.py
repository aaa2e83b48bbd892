"""Upstream key pools (SPEC §14): the atomic pick-and-reserve of ``lua/pool_pick.lua``.

A pick takes the healthy, not-cooling key with the most headroom whose ceilings (and the
provider's) have room, ties in turn, and reserves in the same step; when none can take the
request the answer is the soonest real time one frees up. Every test runs on ``memory://``
and on a real Redis (the ``storage`` fixture); what needs two clients of one server (two
gateway instances) runs on the real Redis, as ``memory://`` is one process by definition.
The cluster case is in test_storage_scaleout.py, beside its cluster.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratelimit_gw.settings import StorageSettings
from ratelimit_gw.storage import Storage, open_storage
from ratelimit_gw.upstream_pool import Exhausted, Picked, Pool, PoolKey, PoolStore

from .redis_process import RedisProcess

UNLIMITED = Pool("openai-main", (PoolKey("team-a"), PoolKey("team-b"), PoolKey("team-c")))


@pytest.fixture
def pools(storage: Storage) -> PoolStore:
    return PoolStore(storage)


async def picked_names(pools: PoolStore, pool: Pool, count: int, tokens: int = 0) -> list[str]:
    names = []
    for _ in range(count):
        result = await pools.pick(pool, tokens)
        assert isinstance(result, Picked), result
        names.append(result.key_name)
    return names


async def exhausted(pools: PoolStore, pool: Pool, tokens: int = 0) -> Exhausted:
    result = await pools.pick(pool, tokens)
    assert isinstance(result, Exhausted), result
    return result


# --- the choice ------------------------------------------------------------------------------


async def test_the_key_with_the_most_headroom_is_picked(pools: PoolStore) -> None:
    pool = Pool("p", (PoolKey("small", tpm=1000), PoolKey("large", tpm=3000)))
    await pools.refund(pool, "small", 0, -500)  # an extra debit: small at 0.5 of its tpm
    picks = []
    for _ in range(3):  # large at 1.0, then 5/6, then 4/6 — each above small's 0.5
        result = await pools.pick(pool, 500)
        assert isinstance(result, Picked)
        picks.append((result.key_name, round(result.headroom, 3)))
    assert picks == [("large", 1.0), ("large", 0.833), ("large", 0.667)]


async def test_headroom_is_the_smaller_of_the_rpm_and_tpm_fractions(pools: PoolStore) -> None:
    # "both" has all its requests left but half its tokens: 0.5, below "rpm-only" at 0.9.
    pool = Pool("p", (PoolKey("both", rpm=10, tpm=1000), PoolKey("rpm-only", rpm=10)))
    await pools.refund(pool, "both", 0, -500)
    await pools.refund(pool, "rpm-only", -1, 0)
    assert await picked_names(pools, pool, 1) == ["rpm-only"]


async def test_unequal_ceilings_are_spent_in_proportion(pools: PoolStore) -> None:
    pool = Pool("p", (PoolKey("ten", rpm=10), PoolKey("forty", rpm=40)))
    counts = Counter(await picked_names(pools, pool, 20))
    # Equal fractions left: 10 - 4 of 10 and 40 - 16 of 40 (one either way for the tie order).
    assert abs(counts["ten"] - 4) <= 1 and counts["ten"] + counts["forty"] == 20


async def test_ties_rotate_through_every_key(pools: PoolStore) -> None:
    names = await picked_names(pools, UNLIMITED, 9)
    assert Counter(names) == {"team-a": 3, "team-b": 3, "team-c": 3}
    assert all(a != b for a, b in pairwise(names))


async def test_ties_rotate_across_instances(redis_server: RedisProcess) -> None:
    async with two_instances(redis_server) as (first, second):
        names = []
        for i in range(6):
            names += await picked_names(first if i % 2 else second, UNLIMITED, 1)
    assert Counter(names) == {"team-a": 2, "team-b": 2, "team-c": 2}


# --- cool-down and health --------------------------------------------------------------------


async def wait_until_ok(pools: PoolStore, pool: Pool, key_name: str, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while True:
        states = {s.name: s.state for s in await pools.states(pool)}
        if states[key_name] == "ok":
            return
        assert time.monotonic() < deadline, f"{key_name} still {states[key_name]}"
        await asyncio.sleep(0.02)


async def test_a_cooling_key_is_skipped_until_its_cool_down_ends(
    pools: PoolStore, storage: Storage
) -> None:
    await pools.cool_down(UNLIMITED, "team-a", 300)
    state = (await pools.states(UNLIMITED))[0]
    assert (state.name, state.state) == ("team-a", "cooling")
    redis_now_ms = await redis_time_ms(storage)
    assert 0 < state.cooling_until_ms - redis_now_ms <= 300
    assert "team-a" not in await picked_names(pools, UNLIMITED, 6)
    await wait_until_ok(pools, UNLIMITED, "team-a", within_s=2)
    assert "team-a" in await picked_names(pools, UNLIMITED, 3)


async def test_a_pool_all_cooling_answers_when_the_first_cool_down_ends(pools: PoolStore) -> None:
    for name, ms in (("team-a", 5000), ("team-b", 400), ("team-c", 9000)):
        await pools.cool_down(UNLIMITED, name, ms)
    answer = await exhausted(pools, UNLIMITED)
    assert answer.reason == "all_cooling"
    assert 300 < answer.retry_after_ms <= 400


async def test_an_unhealthy_key_is_skipped_until_marked_healthy(pools: PoolStore) -> None:
    await pools.mark_unhealthy(UNLIMITED, "team-b")
    assert [s.state for s in await pools.states(UNLIMITED)] == ["ok", "unhealthy", "ok"]
    assert "team-b" not in await picked_names(pools, UNLIMITED, 6)
    await pools.mark_healthy(UNLIMITED, "team-b")
    assert "team-b" in await picked_names(pools, UNLIMITED, 3)


async def test_a_pool_all_unhealthy_cannot_foresee_a_retry(pools: PoolStore) -> None:
    for key in UNLIMITED.keys:
        await pools.mark_unhealthy(UNLIMITED, key.name)
    assert await exhausted(pools, UNLIMITED) == Exhausted(0, "all_unhealthy")


async def test_a_name_outside_the_pool_is_refused(pools: PoolStore) -> None:
    with pytest.raises(KeyError, match="no key 'team-z'"):
        await pools.cool_down(UNLIMITED, "team-z", 100)


# --- reservations and the soonest retry ------------------------------------------------------


async def test_refund_restores_the_keys_and_the_providers_headroom(pools: PoolStore) -> None:
    pool = Pool("p", (PoolKey("only", rpm=1, tpm=1000),), rpm=5)
    assert await picked_names(pools, pool, 1, tokens=400) == ["only"]
    assert (await exhausted(pools, pool, 400)).reason == "all_full"
    await pools.refund(pool, "only", 1, 400)  # the attempt failed: nothing spent
    [state] = await pools.states(pool)
    assert state.rpm_headroom == pytest.approx(1.0) and state.tpm_headroom == pytest.approx(1.0)
    assert await picked_names(pools, pool, 1, tokens=400) == ["only"]


async def test_settlement_corrects_the_token_reservation_both_ways(pools: PoolStore) -> None:
    pool = Pool("p", (PoolKey("only", tpm=1000),))
    await picked_names(pools, pool, 1, tokens=500)
    await pools.refund(pool, "only", 0, 500 - 900)  # used 900, reserved 500: 400 more
    [state] = await pools.states(pool)
    assert state.tpm_headroom == pytest.approx(0.1, abs=0.01)
    await pools.refund(pool, "only", 0, 5000)  # never above the ceiling
    [state] = await pools.states(pool)
    assert state.tpm_headroom == 1.0


async def test_a_full_pool_answers_the_soonest_real_retry(pools: PoolStore) -> None:
    pool = Pool("p", (PoolKey("slow", rpm=1), PoolKey("fast", rpm=2)))
    await picked_names(pools, pool, 3)
    answer = await exhausted(pools, pool)
    # "fast" refills one request in 60 s / 2, less the moments since its last pick.
    assert answer.reason == "all_full" and 29_000 < answer.retry_after_ms <= 30_000
    # Cooling "fast" beyond its refill: it frees up when the cool-down ends, still before
    # "slow" refills (60 s).
    await pools.cool_down(pool, "fast", 40_000)
    answer = await exhausted(pools, pool)
    assert answer.reason == "all_cooling" and 39_000 < answer.retry_after_ms <= 40_000


async def test_the_providers_ceiling_is_shared_by_the_whole_pool(pools: PoolStore) -> None:
    pool = Pool("p", (PoolKey("a"), PoolKey("b")), rpm=2)
    await picked_names(pools, pool, 2)
    answer = await exhausted(pools, pool)
    assert answer.reason == "provider_full" and 29_000 < answer.retry_after_ms <= 30_000


async def test_a_request_larger_than_every_ceiling_gets_no_retry(pools: PoolStore) -> None:
    pool = Pool("p", (PoolKey("a", tpm=100), PoolKey("b", tpm=150)))
    assert await exhausted(pools, pool, 200) == Exhausted(0, "request_exceeds_limit")
    provider_bound = Pool("p", (PoolKey("a"),), tpm=100)
    assert await exhausted(pools, provider_bound, 200) == Exhausted(0, "request_exceeds_limit")
    # A key it fits is still picked: only the others are too small.
    assert await picked_names(pools, pool, 1, tokens=120) == ["b"]


# --- exact ceilings under concurrency --------------------------------------------------------

CONTENDED = Pool(
    "contended",
    (
        PoolKey("k10", rpm=10),
        PoolKey("k20", rpm=20),
        PoolKey("k30", rpm=30),
        PoolKey("k40", rpm=40),
    ),
    rpm=80,
)
KEY_RPM = {key.name: key.rpm for key in CONTENDED.keys}


def assert_exact(results: list[Picked | Exhausted]) -> None:
    won = Counter(r.key_name for r in results if isinstance(r, Picked))
    assert sum(won.values()) == 80
    assert all(won[name] <= rpm for name, rpm in KEY_RPM.items() if rpm), won
    refused = [r for r in results if isinstance(r, Exhausted)]
    assert {r.reason for r in refused} == {"provider_full"}


async def test_concurrent_picks_never_exceed_any_ceiling(pools: PoolStore) -> None:
    results = await asyncio.gather(*(pools.pick(CONTENDED, 10) for _ in range(200)))
    assert_exact(results)


async def test_two_instances_never_exceed_any_ceiling(redis_server: RedisProcess) -> None:
    async with two_instances(redis_server) as (first, second):
        results = await asyncio.gather(
            *(pools.pick(CONTENDED, 10) for _ in range(100) for pools in (first, second))
        )
    assert_exact(results)


@asynccontextmanager
async def two_instances(redis_server: RedisProcess) -> AsyncIterator[tuple[PoolStore, PoolStore]]:
    """Two PoolStores on two storage clients of one Redis: two gateway instances."""
    first, second = (open_storage(StorageSettings(url=redis_server.url)) for _ in range(2))
    try:
        await first.call("FLUSHALL")
        yield PoolStore(first), PoolStore(second)
    finally:
        await first.close()
        await second.close()


async def redis_time_ms(storage: Storage) -> int:
    seconds, micros = await storage.call("TIME")
    return int(seconds) * 1000 + int(micros) // 1000


# --- property: no ceiling is ever exceeded, whatever the mix of keys and requests ------------

ceilings = st.one_of(st.none(), st.integers(min_value=1, max_value=6))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    key_ceilings=st.lists(st.tuples(ceilings, ceilings), min_size=1, max_size=4),
    provider_rpm=ceilings,
    token_counts=st.lists(st.integers(min_value=0, max_value=4), min_size=1, max_size=30),
)
def test_picks_stay_within_every_ceiling(
    storage_url: str,
    key_ceilings: list[tuple[int | None, int | None]],
    provider_rpm: int | None,
    token_counts: list[int],
) -> None:
    """Against a model: a pick succeeds exactly when some key (and the provider) has room left
    (the few ms a run takes refill far less than one unit), and no key or provider ever
    serves more than its ceiling."""
    pool = Pool(
        "prop",
        tuple(PoolKey(f"k{i}", rpm, tpm) for i, (rpm, tpm) in enumerate(key_ceilings)),
        rpm=provider_rpm,
    )

    async def run() -> None:
        storage = open_storage(StorageSettings(url=storage_url))
        await storage.call("FLUSHALL")
        pools = PoolStore(storage)
        used = {key.name: [0, 0] for key in pool.keys}
        try:
            for tokens in token_counts:
                fits = [
                    key.name
                    for key in pool.keys
                    if (key.rpm is None or used[key.name][0] + 1 <= key.rpm)
                    and (key.tpm is None or used[key.name][1] + tokens <= key.tpm)
                ]
                provider_room = (
                    provider_rpm is None or sum(u[0] for u in used.values()) < provider_rpm
                )
                result = await pools.pick(pool, tokens)
                if isinstance(result, Picked):
                    assert result.key_name in fits and provider_room
                    used[result.key_name][0] += 1
                    used[result.key_name][1] += tokens
                else:
                    assert not (fits and provider_room), (result, fits)
        finally:
            await storage.close()

    asyncio.run(run())
