"""An admission its caller gave up on strands nothing (issue 17, item 2).

Callers that hang up while their admission waits for Redis, an admission whose reply is
lost at the command timeout although it ran, and a release that reaches Redis before its
admission: in every case the hold, the leases and the in-flight entry are given back (or never
placed), at once or through the settler's retries, never left to the TTL, and counted.

Redis is made slow deterministically: ``CLIENT PAUSE … WRITE`` holds every script until
``CLIENT UNPAUSE`` (reads still pass), and a proxy holds Redis's replies while the commands
themselves run (tests/reply_stall.py).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from ratelimit_gw.accounts import AccountStore
from ratelimit_gw.context import RequestContext
from ratelimit_gw.itinerary import Destination, Itinerary
from ratelimit_gw.keys import KeyRecord
from ratelimit_gw.keyspace import AccountKeys
from ratelimit_gw.limiter import AdmissionRequest, Decision, Limiter, Settlement
from ratelimit_gw.limits import Limits
from ratelimit_gw.metering import MeteredRequest
from ratelimit_gw.money import parse_usd
from ratelimit_gw.services import SERVICES, Services
from ratelimit_gw.settings import StorageSettings
from ratelimit_gw.storage import Storage, StorageError, open_storage
from ratelimit_gw.upstream_pool import Pool, PoolKey
from ratelimit_gw.worst_case import Hold

from .conftest import ADMIN_TOKEN, Gateway, Upstream, start_gateway
from .redis_process import RedisProcess
from .reply_stall import ReplyStallingProxy

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello there"}]}
ABANDONED = "abandoned"  # settle.lua's outcome for a release of an abandoned admission


async def chat(url: str, key: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
        ) as response,
    ):
        return response.status, await response.json()


async def send_request(url: str, key: str) -> asyncio.StreamWriter:
    """A whole chat request on a raw connection, whose answer is never read."""
    host, port = url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps(CHAT).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\n"
        f"Host: {host}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    return writer


def admissions_entered(svc: Services, count: int) -> asyncio.Event:
    """Set once ``count`` admissions are on their way to storage (their callers waiting)."""
    entered = asyncio.Event()
    admit = svc.limiter.admit
    calls = 0

    def counting(request: AdmissionRequest) -> Awaitable[Decision]:
        # The caller awaits the coroutine in the same step: by the time the test sees the
        # event, every admission is queued for storage and its caller waits for the reply.
        nonlocal calls
        waiting = admit(request)
        calls += 1
        if calls == count:
            entered.set()
        return waiting

    svc.limiter.admit = counting  # type: ignore[method-assign]
    return entered


# One upstream key, no ceiling, no fallback: no storage step before the account's admission.
ONE_KEY = Itinerary(
    destinations=(
        Destination(
            pool=Pool("test", (PoolKey("test"),)),
            provider=None,
            upstream_id="",
            key_headers={"test": {}},
            timeout_s=30.0,
            cooldown_default_ms=60_000,
            recheck_ms=30_000,
            probed=False,
        ),
    ),
    max_attempts=1,
    tracked=False,
)


def metered(ctx: RequestContext, key: KeyRecord, hold_nano: int) -> MeteredRequest:
    """A request estimated at 300 tokens, holding ``hold_nano``, behind no upstream ceiling."""
    return MeteredRequest(
        ctx=ctx,
        key=key,
        hold=Hold(300, 300, 0, 1, hold_nano),
        model=None,
        charged_as="test",
        itinerary=ONE_KEY,
    )


async def handlers_finished(svc: Services) -> None:
    while svc.inflight:
        await asyncio.wait(set(svc.inflight))


def abandoned_count(svc: Services, cause: str) -> float:
    value = svc.registry.get_sample_value("rlgw_abandoned_admissions_total", {"cause": cause})
    return value or 0.0


async def assert_nothing_held(client: aioredis.Redis, account: str, key_id: str) -> None:
    keys = AccountKeys(account)
    assert await client.hlen(keys.holds) == 0, "a hold outlived its abandoned admission"
    assert await client.zcard(keys.inflight) == 0
    assert await client.zcard(keys.key_leases(key_id)) == 0
    assert await client.hget(keys.account, "held_nano") == "0"


async def released_entries(accounts: AccountStore, account: str) -> list[str]:
    """Settlement ids of the ledger's releases of abandoned admissions."""
    return [
        entry.settlement_id or ""
        for entry in await accounts.ledger(account, limit=1000)
        if (entry.type, entry.outcome) == ("release", ABANDONED)
    ]


# ---------------------------------------------------------------- (a) hang-ups over HTTP


@pytest.fixture
async def redis_gateway(
    upstream: Upstream, redis_server: RedisProcess, redis_client: aioredis.Redis
) -> AsyncIterator[Gateway]:
    storage = open_storage(StorageSettings(url=redis_server.url))
    runner, gw = await start_gateway(upstream, storage, {"RLGW_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        yield gw
    finally:
        await runner.cleanup()
        await storage.close()


async def test_clients_that_hang_up_while_admission_waits_strand_no_hold_or_slot(
    redis_gateway: Gateway, redis_client: aioredis.Redis
) -> None:
    gw, svc = redis_gateway, redis_gateway.app[SERVICES]
    await gw.accounts.create_account(
        "acme", balance_nano=parse_usd("10"), limits=Limits(concurrency=50)
    )
    created = await gw.accounts.create_key("acme", limits=Limits(concurrency=2))
    key, key_id = created.key, created.record.id
    assert (await chat(gw.url, key))[0] == 200  # key cache and script connection warm
    await svc.settler.drain()

    hangups = 12
    entered = admissions_entered(svc, hangups)
    await redis_client.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")  # scripts wait
    try:
        writers = [await send_request(gw.url, key) for _ in range(hangups)]
        await asyncio.wait_for(entered.wait(), 30)
        for writer in writers:  # every client hangs up while its admission waits in Redis
            writer.transport.abort()
        await asyncio.wait_for(handlers_finished(svc), 30)
    finally:
        await redis_client.execute_command("CLIENT", "UNPAUSE")
    await svc.settler.drain(timeout_s=30)
    assert svc.settler.pending == 0

    await assert_nothing_held(redis_client, "acme", key_id)
    assert (await gw.accounts.get_account("acme")).held_usd == "0.00"
    # Redis ran the admissions in order: two took the key's two slots, and their releases,
    # sent after them on the same connection, gave the slots back.
    assert len(await released_entries(gw.accounts, "acme")) == 2
    statuses = [(await chat(gw.url, key))[0] for _ in range(3)]
    assert statuses == [200, 200, 200]  # the key of concurrency 2 serves again at once
    assert abandoned_count(svc, "client_disconnect") == hangups
    assert abandoned_count(svc, "storage_error") == 0


# ---------------------------------------------------------------- (c) a reply lost at the timeout


async def test_an_admission_that_ran_but_timed_out_is_released_once_storage_answers(
    upstream: Upstream, redis_server: RedisProcess, redis_client: aioredis.Redis
) -> None:
    proxy = ReplyStallingProxy(redis_server.port)
    await proxy.start()
    storage = open_storage(
        StorageSettings(url=proxy.url, command_timeout_s=0.3, connect_timeout_s=0.3)
    )
    runner, gw = await start_gateway(upstream, storage)
    try:
        svc = gw.app[SERVICES]
        await gw.accounts.create_account("acme", balance_nano=parse_usd("10"))
        created = await gw.accounts.create_key("acme", limits=Limits(concurrency=1))
        assert (await chat(gw.url, created.key))[0] == 200  # warm
        await svc.settler.drain()

        proxy.stall()
        status, body = await chat(gw.url, created.key)
        assert (status, body["error"]["reason"]) == (503, "storage_unavailable")
        keys = AccountKeys("acme")
        assert await redis_client.hlen(keys.holds) == 1  # it ran: its hold is live in Redis

        proxy.resume()  # storage answers again: the settler's next retry releases it
        await svc.settler.drain(timeout_s=60)
        assert svc.settler.pending == 0
        await assert_nothing_held(redis_client, "acme", created.record.id)
        assert len(await released_entries(gw.accounts, "acme")) == 1
        assert abandoned_count(svc, "storage_error") == 1
        assert abandoned_count(svc, "client_disconnect") == 0
    finally:
        await runner.cleanup()
        await storage.close()
        await proxy.close()


# ---------------------------------------------------------------- (b) both orders, both backends


def admission(key_id: str, request_id: str) -> AdmissionRequest:
    return AdmissionRequest("acme", key_id, request_id, 300, parse_usd("0.5"), 600_000)


def release_of(request: AdmissionRequest) -> Settlement:
    return Settlement("acme", request.key_id, request.request_id, 300, 0, 0, 0, "m", ABANDONED)


async def test_a_release_that_reaches_redis_before_its_admission_still_wins(
    storage: Storage, accounts: AccountStore
) -> None:
    limiter = Limiter(storage)
    await accounts.create_account(
        "acme", balance_nano=parse_usd("1"), limits=Limits(rpm=10, tpm=1000)
    )
    key_id = (await accounts.create_key("acme", limits=Limits(concurrency=1))).record.id
    late = admission(key_id, "req_late")

    released = await limiter.settle(release_of(late))
    assert released.settled and released.released_nano == 0
    refused = await limiter.admit(late)
    assert (refused.allowed, refused.reason) == (False, ABANDONED)

    keys = AccountKeys("acme")
    assert await storage.call("HLEN", keys.holds) == 0
    assert await storage.call("ZCARD", keys.inflight) == 0
    peek = await limiter.peek("acme", key_id)
    assert peek.requests is not None and peek.requests.remaining == 10  # nothing consumed
    assert peek.tokens is not None and peek.tokens.remaining == 1000
    account = await accounts.get_account("acme")
    assert (account.held_usd, account.balance_usd) == ("0.00", "1.00")
    assert [e.type for e in await accounts.ledger("acme")] == ["topup"]  # only the tombstone
    # The key's one slot is free: the next admission passes.
    assert (await limiter.admit(admission(key_id, "req_next"))).allowed


async def test_a_release_after_its_admission_gives_everything_back(
    storage: Storage, accounts: AccountStore
) -> None:
    limiter = Limiter(storage)
    await accounts.create_account("acme", balance_nano=parse_usd("1"), limits=Limits(tpm=1000))
    key_id = (await accounts.create_key("acme", limits=Limits(concurrency=1))).record.id
    admitted = admission(key_id, "req_1")
    assert (await limiter.admit(admitted)).allowed

    released = await limiter.settle(release_of(admitted))
    assert released.settled and released.released_nano == parse_usd("0.5")
    keys = AccountKeys("acme")
    assert await storage.call("HLEN", keys.holds) == 0
    assert await storage.call("ZCARD", keys.inflight) == 0
    assert await storage.call("ZCARD", keys.key_leases(key_id)) == 0
    peek = await limiter.peek("acme", key_id)
    assert peek.tokens is not None and peek.tokens.remaining == 1000  # the estimate refunded
    account = await accounts.get_account("acme")
    assert (account.held_usd, account.balance_usd, account.spent_usd) == ("0.00", "1.00", "0.00")
    entry = (await accounts.ledger("acme", limit=1))[0]
    assert (entry.type, entry.settlement_id, entry.outcome) == ("release", "req_1", ABANDONED)
    assert not (await limiter.settle(release_of(admitted))).settled  # once only


# ------------------------------------------------------------- (d) via the gateway, both backends


async def test_an_admission_cancelled_on_its_way_is_released_on_every_backend(
    gateway: Gateway,
) -> None:
    svc = gateway.app[SERVICES]
    await gateway.accounts.create_account("acme", balance_nano=parse_usd("10"))
    created = await gateway.accounts.create_key("acme", limits=Limits(concurrency=1))
    key = await svc.keys.authenticate(created.key)
    ctx = RequestContext("req_client", "openai", 0.0, "req_gateway_own")
    entered = admissions_entered(svc, 1)
    admitting = asyncio.ensure_future(metered(ctx, key, parse_usd("0.5")).admit(svc))
    await entered.wait()
    admitting.cancel()  # the client hangs up while admit.lua is on its way
    with pytest.raises(asyncio.CancelledError):
        await admitting
    await svc.settler.drain(timeout_s=30)

    keys = AccountKeys("acme")
    assert await gateway.storage.call("HLEN", keys.holds) == 0
    assert await gateway.storage.call("ZCARD", keys.inflight) == 0
    assert await gateway.storage.call("ZCARD", keys.key_leases(created.record.id)) == 0
    assert await gateway.storage.call("ZSCORE", keys.settled, "req_gateway_own") is not None
    assert (await gateway.accounts.get_account("acme")).held_usd == "0.00"
    assert abandoned_count(svc, "client_disconnect") == 1
    assert (await chat(gateway.url, created.key))[0] == 200  # its one slot is free


# ---------------------------------------------------------------- what needs no release


async def test_a_call_that_never_reached_redis_starts_no_release(upstream: Upstream) -> None:
    # Nothing listens on the port: no connection takes the call, then the breaker refuses.
    # Neither ran, so an outage must not start a release (and ~32 s of retries) per request.
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    storage = open_storage(StorageSettings(url=f"redis://127.0.0.1:{port}/0", breaker_failures=2))
    runner, gw = await start_gateway(upstream, storage)
    try:
        svc = gw.app[SERVICES]
        key = KeyRecord(id="key_1", account="acme", name="", prefix="rlgw-")
        for n in range(4):
            ctx = RequestContext(f"req_{n}", "openai", 0.0, f"req_own_{n}")
            with pytest.raises(StorageError) as failed:
                await metered(ctx, key, 1000).admit(svc)
            assert failed.value.never_sent
        assert storage.breaker.state == "open"
        assert svc.settler.pending == 0
        assert abandoned_count(svc, "storage_error") == 0
    finally:
        await runner.cleanup()
        await storage.close()
