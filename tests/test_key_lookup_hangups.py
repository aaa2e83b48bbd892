"""A caller that hangs up during a key lookup fails nobody else (issue 17, item 8).

Concurrent callers presenting the same key on a cold cache share one storage lookup. The
first of them hanging up (its handler cancelled) must neither cancel that lookup nor hand
its cancellation to the others: they get the key as if it had stayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import cast

import pytest
import redis.asyncio as aioredis

from ratelimit_gw.accounts import AccountStore
from ratelimit_gw.auth import KeyCache
from ratelimit_gw.key_changes import Changes, KeyChangeFeed
from ratelimit_gw.keys import KeyRecord
from ratelimit_gw.services import SERVICES, Services
from ratelimit_gw.settings import StorageSettings
from ratelimit_gw.storage import Storage, open_storage

from .conftest import Upstream, start_gateway
from .redis_process import RedisProcess
from .reply_stall import ReplyStallingProxy

SECRET = "rlgw-secret-of-the-test"
RECORD = KeyRecord(id="key_1", account="acme", name="", prefix=SECRET[:12])
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello there"}]}


class GatedAccounts:
    """Stands in for AccountStore.find_key: the lookup waits until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.lookups = 0

    async def find_key(self, secret: str) -> KeyRecord | None:
        self.lookups += 1
        self.started.set()
        await self.gate.wait()
        return RECORD if secret == SECRET else None


async def test_the_first_caller_hanging_up_fails_none_of_the_others() -> None:
    accounts = GatedAccounts()
    cache = KeyCache(cast(AccountStore, accounts), ttl_s=60)
    callers = [asyncio.ensure_future(cache.authenticate(SECRET)) for _ in range(6)]
    await accounts.started.wait()  # all six are waiting on the one lookup by now
    callers[0].cancel()  # the first caller, whose arrival started the lookup, hangs up
    with pytest.raises(asyncio.CancelledError):
        await callers[0]
    accounts.gate.set()
    assert await asyncio.gather(*callers[1:]) == [RECORD] * 5
    assert accounts.lookups == 1
    assert await cache.authenticate(SECRET) == RECORD  # cached by the shared lookup
    assert accounts.lookups == 1


async def test_a_lookup_every_caller_left_still_fills_the_cache() -> None:
    accounts = GatedAccounts()
    cache = KeyCache(cast(AccountStore, accounts), ttl_s=60)
    caller = asyncio.ensure_future(cache.authenticate(SECRET))
    await accounts.started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    accounts.gate.set()
    assert await cache.authenticate(SECRET) == RECORD
    assert accounts.lookups == 1


# ---------------------------------------------------------------- over HTTP


async def open_request(port: int, key: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps(CHAT).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    return reader, writer


class Arrivals:
    """Callers entering the gateway's authenticate, in order (their handler tasks)."""

    def __init__(self, svc: Services, expected: int) -> None:
        self.handlers: list[asyncio.Task[object]] = []
        self.first_in = asyncio.Event()
        self.all_in = asyncio.Event()
        authenticate = svc.keys.authenticate

        async def watched(secret: str | None) -> KeyRecord:
            task = asyncio.current_task()
            assert task is not None
            self.handlers.append(task)
            self.first_in.set()
            if len(self.handlers) == expected:
                self.all_in.set()
            return await authenticate(secret)

        svc.keys.authenticate = watched  # type: ignore[method-assign]


async def test_over_http_the_others_are_answered_when_the_first_caller_hangs_up(
    upstream: Upstream, redis_server: RedisProcess, redis_client: aioredis.Redis
) -> None:
    direct = open_storage(StorageSettings(url=redis_server.url))
    proxy = ReplyStallingProxy(redis_server.port)
    await proxy.start()
    storage = open_storage(StorageSettings(url=proxy.url, command_timeout_s=30))
    runner, gw = await start_gateway(upstream, storage)
    writers: list[asyncio.StreamWriter] = []
    try:
        accounts = AccountStore(direct)  # not through the proxy: the gateway's cache stays cold
        await accounts.create_account("acme")
        key = (await accounts.create_key("acme")).key
        port = int(gw.url.rsplit(":", 1)[1])
        arrivals = Arrivals(gw.app[SERVICES], 6)
        proxy.stall()  # the key lookup's reply waits in the proxy
        _, hanging_up = await open_request(port, key)
        writers.append(hanging_up)
        await asyncio.wait_for(arrivals.first_in.wait(), 30)  # its arrival starts the lookup
        others = [await open_request(port, key) for _ in range(5)]
        writers += [writer for _, writer in others]
        await asyncio.wait_for(arrivals.all_in.wait(), 30)  # the rest wait on that lookup
        hanging_up.transport.abort()
        await asyncio.wait_for(asyncio.wait({arrivals.handlers[0]}), 30)
        proxy.resume()
        statuses = [await asyncio.wait_for(reader.readline(), 30) for reader, _ in others]
        assert statuses == [b"HTTP/1.1 200 OK\r\n"] * 5
    finally:
        for writer in writers:
            writer.close()
        await runner.cleanup()
        await storage.close()
        await direct.close()
        await proxy.close()


class FeedSwallowingItsCancellation:
    """A key-change feed whose read swallows a cancellation and answers (as redis-py's
    sentinel client was seen to do in a failover): nothing changed."""

    async def read(self) -> Changes:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.05)
        return Changes(set(), complete=True)


async def test_following_key_changes_stops_even_if_storage_swallows_the_cancellation(
    storage: Storage,
) -> None:
    keys = KeyCache(AccountStore(storage), ttl_s=1.0)
    following = asyncio.create_task(
        keys.follow_changes(cast(KeyChangeFeed, FeedSwallowingItsCancellation()))
    )
    await asyncio.sleep(0.01)  # inside the read
    keys.stop_following()  # what the app's shutdown does, before cancelling
    following.cancel()
    done, _ = await asyncio.wait({following}, timeout=2)
    assert following in done  # not polling on for ever, holding the shutdown
