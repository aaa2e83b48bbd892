"""Scale-out storage (§11): Redis Cluster and Redis Sentinel, started on loopback by the tests.

- ``redis+cluster://``: three masters, the slots split between them. Accounts are chosen so
  that every node holds some; the whole gateway (admission, settlement, top-ups, keys, the
  admin API) runs on it without a cross-slot error, and two gateway *processes* on one
  cluster keep rpm, concurrency and balance limits exact.
- ``redis+sentinel://``: a master, a replica and three sentinels. Under load the master is
  failed over; afterwards every request that got a 200 has exactly one ledger entry, the
  ledger adds up to the balance change, and nothing was charged twice.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.crc import key_slot

from ratelimit_gw import keyspace
from ratelimit_gw.accounts import AccountStore
from ratelimit_gw.keyspace import AccountKeys
from ratelimit_gw.limiter import AdmissionRequest, Limiter
from ratelimit_gw.limits import Limits
from ratelimit_gw.money import NANO_PER_USD, cost_nano, parse_usd
from ratelimit_gw.protocols import input_token_bound
from ratelimit_gw.settings import ConfigError, StorageSettings
from ratelimit_gw.storage import Storage, open_storage
from ratelimit_gw.upstream_pool import Exhausted, Picked, Pool, PoolKey, PoolStore
from ratelimit_gw.webhook_outbox import Outbox

from .concurrent_admission import fire, gateway_processes_on, holds_released
from .conftest import ADMIN_TOKEN, MODELS, Gateway, Upstream, start_gateway
from .processes import wait_ready
from .redis_process import (
    RedisClusterProcesses,
    SentinelSet,
    start_redis_cluster,
    start_sentinel_set,
)
from .test_storage_failures import Outcome, metric, post, start_gateway_with

pytestmark = pytest.mark.ops  # runs Redis Cluster and Sentinel processes

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CHAT = {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
CHAT_BODY = json.dumps(CHAT).encode()  # as `json=CHAT` sends it
_, _, IN_USD, OUT_USD = MODELS[0]


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcesses]:
    cluster = start_redis_cluster(masters=3)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def sentinel_set() -> Iterator[SentinelSet]:
    sentinels = start_sentinel_set(replicas=1)
    try:
        yield sentinels
    finally:
        sentinels.stop()


@pytest.fixture
async def cluster_storage(redis_cluster: RedisClusterProcesses) -> AsyncIterator[Storage]:
    storage = open_storage(StorageSettings(url=redis_cluster.url))
    await storage.call("FLUSHALL")  # goes to every master
    try:
        yield storage
    finally:
        await storage.close()


@pytest.fixture
async def sentinel_storage(sentinel_set: SentinelSet) -> AsyncIterator[Storage]:
    storage = open_storage(StorageSettings(url=sentinel_set.url))
    await storage.call("FLUSHALL")
    try:
        yield storage
    finally:
        await storage.close()


async def admin(
    session: aiohttp.ClientSession, gw: Gateway, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    async with session.request(method, gw.url + path, json=body, headers=ADMIN) as response:
        return response.status, await response.json()


async def chat(
    session: aiohttp.ClientSession, url: str, key: str, *, stream: bool = False, **headers: str
) -> tuple[int, Any, Any]:
    body = {**CHAT, "stream": True} if stream else CHAT
    async with session.post(
        url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}", **headers},
    ) as response:
        raw = await response.read()
        return response.status, response.headers.copy(), raw


# ---------------------------------------------------------------- Redis Cluster


def test_every_script_touches_one_cluster_slot() -> None:
    """What makes cluster mode work at all: one hash tag per script call (§11)."""
    keys = AccountKeys("team-7")
    for script_keys in (
        keys.admit_keys("key_1"),
        keys.settle_keys("key_1"),
        [keys.account, keys.topups, keys.ledger],
        # Budget spend hashes: passed to admit.lua, and named by hold records to settle.lua.
        [keys.account, keys.account_spend("day:0"), keys.key_spend("key_1", "custom:5:0")],
    ):
        assert len({key_slot(k.encode()) for k in script_keys}) == 1
    pool = keyspace.PoolKeys("openai-main")
    pool_keys = pool.script_keys(["team-a", "team-b", "team-c"])
    # The pick, and the plain commands beside it: every key of one pool in one slot.
    pool_keys += [pool.unhealthy, pool.cooling("team-a"), pool.probe("team-a")]
    assert len({key_slot(k.encode()) for k in pool_keys}) == 1
    endpoint_keys = keyspace.PoolKeys("pipeshift/model").script_keys(["model"])
    assert len({key_slot(k.encode()) for k in endpoint_keys}) == 1


async def test_the_webhook_outbox_raises_claims_and_settles_on_a_cluster(
    cluster_storage: Storage,
) -> None:
    """Every webhook key shares the tag {wh}: each script runs in one slot."""
    webhook_keys = [
        keyspace.webhook_seen("global:x/balance.low:acme:1:req_1"),
        keyspace.WEBHOOK_OUTBOX,
        keyspace.WEBHOOK_RECORDS,
        keyspace.WEBHOOK_ENDPOINTS,
        keyspace.WEBHOOK_KEY_SCAN,
    ]
    assert len({key_slot(k.encode()) for k in webhook_keys}) == 1
    outbox = Outbox(cluster_storage)
    assert await outbox.raise_event("global:x", "e1", "balance.low", "acme", {}, 60)
    assert not await outbox.raise_event("global:x", "e1", "balance.low", "acme", {}, 60)
    _, claimed = await outbox.claim(10, 60_000)
    assert [c.delivery_id for c in claimed] == ["global:x/e1"]
    await outbox.retry_at("global:x/e1", 0)
    await outbox.delivered("global:x/e1")
    assert await outbox.depth() == 0


async def test_upstream_pool_picks_and_marks_keys_on_a_cluster_without_cross_slot_errors(
    cluster_storage: Storage,
) -> None:
    """Pools on every master: the pick, its refund, cool-downs and health marks each run in
    one slot (a CROSSSLOT error would raise StorageError here)."""
    ranges = [(int(r[0]), int(r[1]), int(r[2][1])) for r in await cluster_slots(cluster_storage)]
    pools = PoolStore(cluster_storage)
    masters_used = set()
    for i in range(12):
        pool = Pool(f"provider-{i}", (PoolKey("a", rpm=1), PoolKey("b", rpm=1)), rpm=5)
        slot = key_slot(keyspace.PoolKeys(pool.provider).unhealthy.encode())
        masters_used.add(next(port for lo, hi, port in ranges if lo <= slot <= hi))
        await pools.mark_unhealthy(pool, "a")
        await pools.cool_down(pool, "b", 60_000)
        refused = await pools.pick(pool, 0)
        assert isinstance(refused, Exhausted) and refused.reason == "all_cooling"
        assert 59_000 < refused.retry_after_ms <= 60_000
        await pools.mark_healthy(pool, "a")
        picked = await pools.pick(pool, 0)
        assert isinstance(picked, Picked) and picked.key_name == "a"
        await pools.refund(pool, "a", 1, 0)
        assert [s.state for s in await pools.states(pool)] == ["ok", "cooling"]
    assert len(masters_used) == 3


def accounts_on_every_node(cluster_slots: Any, per_node: int = 1) -> list[str]:
    """Account ids whose hash tag lands on each master in turn."""
    ranges = [(int(r[0]), int(r[1]), int(r[2][1])) for r in cluster_slots]
    wanted = {port: per_node for _, _, port in ranges}
    chosen: list[str] = []
    i = 0
    while any(wanted.values()):
        account = f"team-{i}"
        slot = key_slot(AccountKeys(account).account.encode())
        port = next(p for lo, hi, p in ranges if lo <= slot <= hi)
        if wanted[port]:
            wanted[port] -= 1
            chosen.append(account)
        i += 1
    return chosen


async def cluster_slots(storage: Storage) -> Any:
    slots = await storage.client.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
    if isinstance(slots, dict):  # RESP3 / redis-py's parsed form: {(lo, hi): {...}}
        return [
            (lo, hi, ("127.0.0.1", int(node["primary"][1]))) for (lo, hi), node in slots.items()
        ]
    return slots


async def test_cluster_runs_the_whole_gateway_on_every_node_without_cross_slot_errors(
    upstream: Upstream, cluster_storage: Storage
) -> None:
    runner, gw = await start_gateway(upstream, cluster_storage, {"RLGW_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        accounts = accounts_on_every_node(await cluster_slots(cluster_storage))
        assert len(accounts) == 3
        async with aiohttp.ClientSession() as session:
            for account in accounts:
                status, _ = await admin(
                    session, gw, "POST", "/admin/accounts", {"id": account, "balance_usd": "1.00"}
                )
                assert status == 201
                status, created = await admin(
                    session, gw, "POST", "/admin/keys", {"account": account, "rpm": 3}
                )
                assert status == 201
                key = created["key"]
                topup = {"amount_usd": "0.50", "idempotency_key": f"{account}-t1"}
                path = f"/admin/accounts/{account}/topup"
                assert (await admin(session, gw, "POST", path, topup))[1]["credited"] is True
                again = (await admin(session, gw, "POST", path, topup))[1]
                assert again["credited"] is False
                assert again["account"]["balance_usd"] == "1.50"

                first = await chat(session, gw.url, key)
                second = await chat(session, gw.url, key, stream=True)
                third = await chat(session, gw.url, key)
                fourth = await chat(session, gw.url, key)
                assert [r[0] for r in (first, second, third, fourth)] == [200, 200, 200, 429]
                assert first[1]["x-ratelimit-remaining-requests"] == "2"
                assert b"data: [DONE]" in second[2]
                assert fourth[1]["retry-after"]

                await gw.settled(60)
                status, ledger = await admin(
                    session, gw, "GET", f"/admin/accounts/{account}/ledger"
                )
                assert status == 200
                types = Counter(e["type"] for e in ledger["data"])
                assert types == {"charge": 3, "topup": 2}
                status, keys = await admin(session, gw, "GET", f"/admin/keys?account={account}")
                assert [k["id"] for k in keys["data"]] == [created["id"]]
                status, _ = await admin(session, gw, "DELETE", f"/admin/keys/{created['id']}")
                assert status == 200
                assert (await chat(session, gw.url, key))[0] == 401

            status, listed = await admin(session, gw, "GET", "/admin/accounts")
            assert sorted(listed["data"]) == sorted(accounts)
        assert await metric(gw, "rlgw_storage_errors_total") == 0
    finally:
        await runner.cleanup()


async def test_budgets_on_a_cluster_admit_settle_and_sweep_without_cross_slot_errors(
    cluster_storage: Storage,
) -> None:
    """A key and an account budget on every node: admission passes the spend hashes, and
    settlement and the expired-hold sweep reach them through the hold record (one slot)."""
    accounts = AccountStore(cluster_storage)
    limiter = Limiter(cluster_storage)
    for account in accounts_on_every_node(await cluster_slots(cluster_storage)):
        await accounts.create_account(account)
        key_id = (await accounts.create_key(account)).record.id
        await accounts.update_account(account, {"budget_usd": "1.00", "budget_period": "day"})
        await accounts.update_key(key_id, {"budget_usd": "0.50", "budget_period": "week"})
        hold = parse_usd("0.20")
        admitted = [AdmissionRequest(account, key_id, f"r{i}", 10, hold, 60_000) for i in range(3)]
        decisions = [await limiter.admit(r) for r in admitted]
        assert [d.reason for d in decisions] == ["ok", "ok", "budget_exceeded"]
        await limiter.settle(admitted[0].abandoned("m", ""))
        lost = AdmissionRequest(account, key_id, "lost", 10, parse_usd("0.10"), 1)
        assert (await limiter.admit(lost)).allowed
        await asyncio.sleep(0.01)
        assert (await limiter.admit(AdmissionRequest(account, key_id, "r9", 10, 0, 60_000))).allowed
        key = await accounts.get_key(account, key_id)
        assert key.budget is not None
        assert (key.budget.spent_usd, key.budget.held_usd) == ("0.10", "0.20")


async def test_key_and_account_lifecycle_on_a_cluster_without_cross_slot_errors(
    upstream: Upstream, cluster_storage: Storage
) -> None:
    """Key updates, rotations, the all-accounts key listing, disabling, adjusting and
    deleting, with accounts on every node (the key-change feed is one more slot)."""
    runner, gw = await start_gateway(upstream, cluster_storage, {"RLGW_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        accounts = accounts_on_every_node(await cluster_slots(cluster_storage))
        async with aiohttp.ClientSession() as session:
            keys = {}
            for account in accounts:
                body = {"id": account, "balance_usd": "1.00"}
                assert (await admin(session, gw, "POST", "/admin/accounts", body))[0] == 201
                status, keys[account] = await admin(
                    session, gw, "POST", "/admin/keys", {"account": account}
                )
                assert status == 201
                assert (await chat(session, gw.url, keys[account]["key"]))[0] == 200

            listed, cursor = [], ""
            while True:
                status, page = await admin(session, gw, "GET", f"/admin/keys?limit=2{cursor}")
                assert status == 200
                listed += [k["id"] for k in page["data"]]
                if page["next_cursor"] is None:
                    break
                cursor = f"&cursor={page['next_cursor']}"
            assert listed == [keys[a]["id"] for a in sorted(accounts)]

            first, second, third = accounts
            key = keys[first]
            path = f"/admin/keys/{key['id']}"
            assert (await admin(session, gw, "PATCH", path, {"models": ["gpt-4o"]}))[0] == 200
            deadline = time.monotonic() + 1.0
            while (await chat(session, gw.url, key["key"]))[0] != 403:
                assert time.monotonic() < deadline, "the update did not reach the key cache"
            status, rotated = await admin(session, gw, "POST", path + "/rotate", {"grace_s": 0})
            assert status == 200
            deadline = time.monotonic() + 1.0
            while (await chat(session, gw.url, key["key"]))[0] != 401:
                assert time.monotonic() < deadline, "the old secret still works"

            assert (await admin(session, gw, "POST", f"/admin/accounts/{second}/disable"))[0] == 200
            assert (await chat(session, gw.url, keys[second]["key"]))[0] == 403
            assert (await admin(session, gw, "POST", f"/admin/accounts/{second}/enable"))[0] == 200
            assert (await chat(session, gw.url, keys[second]["key"]))[0] == 200

            await gw.settled(60)
            adjust = {"amount_usd": "-0.50", "reason": "test", "idempotency_key": "a-1"}
            status, adjusted = await admin(
                session, gw, "POST", f"/admin/accounts/{third}/adjust", adjust
            )
            assert (status, adjusted["adjusted"]) == (200, True)
            status, deleted = await admin(
                session, gw, "DELETE", f"/admin/accounts/{third}?force=true"
            )
            assert (status, deleted["account"]["status"]) == (200, "deleted")
            assert (await chat(session, gw.url, keys[third]["key"]))[0] == 401
            status, _ = await admin(session, gw, "POST", "/admin/accounts", {"id": third})
            assert status == 409
            status, ledger = await admin(session, gw, "GET", f"/admin/accounts/{third}/ledger")
            assert [e["type"] for e in ledger["data"]][:2] == ["forfeit", "adjustment"]
            assert rotated["id"] == key["id"]
        assert await metric(gw, "rlgw_storage_errors_total") == 0
    finally:
        await runner.cleanup()


@pytest.fixture
def two_gateway_processes_on_the_cluster(
    upstream: Upstream, redis_cluster: RedisClusterProcesses, tmp_path: Path
) -> Iterator[list[str]]:
    extra = "default_max_output = 1000\n"
    with gateway_processes_on(tmp_path, upstream.url, redis_cluster.url, model_extra=extra) as urls:
        yield urls


async def test_two_gateway_processes_on_one_cluster_keep_limits_exact(
    two_gateway_processes_on_the_cluster: list[str], cluster_storage: Storage
) -> None:
    urls = two_gateway_processes_on_the_cluster
    await wait_ready(urls)
    accounts = AccountStore(cluster_storage)
    rpm_acct, conc_acct, cash_acct = accounts_on_every_node(await cluster_slots(cluster_storage))

    # rpm = 10 (one request back every 6 s): 10 of 60 simultaneous requests pass.
    await accounts.create_account(rpm_acct)
    rpm_key = (await accounts.create_key(rpm_acct, limits=Limits(rpm=10))).key
    statuses = await fire(urls, rpm_key, 60, CHAT_BODY)
    assert (statuses.count(200), statuses.count(429)) == (10, 50)

    # concurrency = 4, each request held upstream for 1.5 s: 4 of 30 pass.
    await accounts.create_account(conc_acct, limits=Limits(concurrency=4))
    conc_key = (await accounts.create_key(conc_acct)).key
    statuses = await fire(urls, conc_key, 30, CHAT_BODY, latency_ms=1500)
    assert (statuses.count(200), statuses.count(429)) == (4, 26)

    # A balance worth exactly k holds: k of 80 pass, the books balance afterwards.
    body_len = len(
        b'{"model": "gpt-4o-mini", "max_tokens": 5, "messages": '
        b'[{"role": "user", "content": "hi"}]}'
    )
    hold = cost_nano(input_token_bound(body_len), 5, parse_usd(IN_USD), parse_usd(OUT_USD))
    k = 23
    start_nano = k * hold + hold - 1
    await accounts.create_account(cash_acct, balance_nano=start_nano)
    cash_key = (await accounts.create_key(cash_acct)).key
    statuses = await fire(urls, cash_key, 80, CHAT_BODY, latency_ms=1000)
    assert (statuses.count(200), statuses.count(402)) == (k, 80 - k)
    await holds_released(accounts, cash_acct)
    state = await accounts.get_account(cash_acct)
    charges = [e for e in await accounts.ledger(cash_acct, 1000) if e.type == "charge"]
    assert len(charges) == k
    charged = sum(parse_usd(e.cost_usd or "0") for e in charges)
    assert parse_usd(state.balance_usd) == start_nano - charged >= 0
    assert state.held_usd == "0.00"


# ---------------------------------------------------------------- Redis Sentinel


async def test_sentinel_storage_serves_the_gateway(
    upstream: Upstream, sentinel_storage: Storage
) -> None:
    runner, gw = await start_gateway(upstream, sentinel_storage, {"RLGW_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        key = await gw.new_key(balance_usd="1.00", rpm=2)
        async with aiohttp.ClientSession() as session:
            results = [await chat(session, gw.url, key) for _ in range(3)]
            assert [r[0] for r in results] == [200, 200, 429]
            topup = {"amount_usd": "2.00", "idempotency_key": "t-1"}
            status, body = await admin(session, gw, "POST", "/admin/accounts/acme/topup", topup)
            assert (status, body["credited"]) == (200, True)
        await gw.settled(60)
        account = await gw.accounts.get_account("acme")
        charges = [e for e in await gw.accounts.ledger("acme") if e.type == "charge"]
        assert len(charges) == 2
        spent = sum(parse_usd(e.cost_usd or "0") for e in charges)
        assert parse_usd(account.balance_usd) == 3 * NANO_PER_USD - spent
    finally:
        await runner.cleanup()


async def test_sentinel_failover_under_load_loses_no_ledger_entry_and_charges_nothing_twice(
    upstream: Upstream, sentinel_set: SentinelSet, sentinel_storage: Storage
) -> None:
    """A ``SENTINEL FAILOVER`` while requests flow. Redis replicates asynchronously, and the
    old master keeps accepting writes for seconds after its replica was promoted; without
    ``wait_replicas`` (WAIT after each settlement) those charges vanish when it is demoted.
    Requests during the switch may get a 503; every 200 must be in the ledger exactly once."""
    settings = {"url": sentinel_set.url, "command_timeout_s": 0.5, "connect_timeout_s": 0.5}
    storage = open_storage(StorageSettings(**settings))
    runner, gw = await start_gateway_with(upstream, storage, settings)
    try:
        start_usd = "100.00"
        key = await gw.new_key(balance_usd=start_usd)
        old_master = sentinel_set.master_port()
        outcomes: list[Outcome] = []
        started = time.monotonic()

        async def fail_over() -> int:
            await asyncio.sleep(1.5)
            return await asyncio.to_thread(sentinel_set.failover)

        failover = asyncio.create_task(fail_over())
        async with aiohttp.ClientSession() as session:

            async def caller(n: int) -> None:
                i = 0
                while time.monotonic() - started < 5:
                    i += 1
                    outcomes.append(await post(session, gw, key, f"req-{n}-{i}"))
                    await asyncio.sleep(0.08)

            await asyncio.gather(*(caller(n) for n in range(4)))
        new_master = await failover
        assert new_master != old_master
        await gw.settled(60)

        statuses = Counter(o.status for o in outcomes)
        assert set(statuses) <= {200, 503}
        assert statuses[200] >= 150
        assert all(
            o.body["error"]["reason"] == "storage_unavailable" for o in outcomes if o.status == 503
        )
        assert max(o.duration_s for o in outcomes) < 3 * 0.5 + 1.0

        ledger = await gw.accounts.ledger("acme", limit=100_000)
        charges = [e for e in ledger if e.type in ("charge", "release")]
        per_request = Counter(e.request_id for e in charges)
        served = {o.request_id for o in outcomes if o.status == 200}
        assert not [rid for rid, n in per_request.items() if n > 1], "charged twice"
        assert sorted(served - set(per_request)) == [], "ledger entries lost"
        assert set(per_request) == served  # and nothing charged that was not served
        account = await gw.accounts.get_account("acme")
        charged = sum(parse_usd(e.cost_usd or "0") for e in charges)
        assert parse_usd(account.balance_usd) == parse_usd(start_usd) - charged
        assert parse_usd(account.balance_usd) >= 0
        assert await metric(gw, "rlgw_settlement_failures_total") == 0
    finally:
        await runner.cleanup()
        await storage.close()
        sentinel_set.wait_healthy()


# ---------------------------------------------------------------- URLs


async def test_sentinel_url_names_the_sentinels_the_service_the_db_and_credentials() -> None:
    storage = open_storage(
        StorageSettings(url="redis+sentinel://app:s%40cret@127.0.0.1:26379,[::1]:26380/cache/2")
    )
    try:
        pool = storage.client.connection_pool
        assert pool.service_name == "cache"  # type: ignore[attr-defined]
        kwargs = pool.connection_kwargs
        assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (2, "app", "s@cret")
        manager = pool.sentinel_manager  # type: ignore[attr-defined]
        addresses = [s.connection_pool.connection_kwargs for s in manager.sentinels]
        hosts = [(a["host"], a["port"]) for a in addresses]
        assert hosts == [("127.0.0.1", 26379), ("::1", 26380)]
    finally:
        await storage.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://127.0.0.1:26379", "needs /service_name[/db]"),
        ("redis+sentinel://127.0.0.1:26379/svc/x", "needs /service_name[/db]"),
        ("redis+sentinel://127.0.0.1/svc", "'127.0.0.1' must be host:port"),
        ("redis+cluster://127.0.0.1:7000/3", "a Redis Cluster has only database 0"),
        ("redis+cluster://a:1,b", "'b' must be host:port"),
    ],
)
def test_bad_scale_out_urls_are_config_errors_naming_the_field(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        open_storage(StorageSettings(url=url))
    assert str(raised.value).startswith("storage.url: ")
    assert message in str(raised.value)
