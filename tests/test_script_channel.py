"""The pipelined script connection (script_channel.py) against a real redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from benchmarks.local_redis import RedisProcess, start_redis
from ratelimit_gw.settings import StorageSettings, parse_settings
from ratelimit_gw.storage import StorageError, open_storage, script_channel
from ratelimit_gw.storage.script_batch import ScriptBatcher
from ratelimit_gw.storage.script_channel import DEFER_S, ScriptChannel, _Connection

SOURCES = {
    "incr": "return redis.call('INCR', KEYS[1])",
    "set": "return redis.call('SET', KEYS[1], ARGV[1])",
}


def channel_for(address: dict[str, Any], timeout_s: float = 2.0) -> ScriptChannel:
    return ScriptChannel(address, SOURCES, timeout_s=timeout_s, connect_timeout_s=timeout_s)


@pytest.fixture
def roomy_deferral(monkeypatch: pytest.MonkeyPatch) -> float:
    """A deferral window wide enough that a slow CI machine cannot let it lapse between two
    calls a test makes back to back (2 ms can: one descheduled moment, one round trip)."""
    monkeypatch.setattr(script_channel, "DEFER_S", 0.25)
    return 0.25


@pytest.fixture
async def plain(redis_server: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(port=redis_server.port, decode_responses=True)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def channel(redis_server: RedisProcess) -> AsyncIterator[ScriptChannel]:
    chan = channel_for({"host": "127.0.0.1", "port": redis_server.port})
    try:
        yield chan
    finally:
        await chan.aclose()


async def test_calls_of_one_turn_go_out_in_one_write_and_replies_keep_their_order(
    channel: ScriptChannel, plain: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    await channel.call("incr", ["warm"], [])  # connect (and load) before counting writes
    writes: list[int] = []
    send = _Connection.send

    def counting_send(self: _Connection, calls: list[Any]) -> None:
        writes.append(len(calls))
        send(self, calls)

    monkeypatch.setattr(_Connection, "send", counting_send)
    clients_before = len(await plain.client_list())
    replies = await asyncio.gather(*(channel.call("incr", ["n"], []) for _ in range(300)))
    assert writes == [300]
    # Redis ran them in the order written, and each caller got its own script's reply.
    assert replies == list(range(1, 301))
    assert len(await plain.client_list()) == clients_before


async def test_a_deferrable_call_leaves_with_the_next_urgent_one_in_the_order_made(
    channel: ScriptChannel,
    plain: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    roomy_deferral: float,
) -> None:
    await channel.call("incr", ["warm"], [])
    writes: list[list[str]] = []
    send = _Connection.send

    def recording_send(self: _Connection, calls: list[Any]) -> None:
        writes.append([c.command[3] for c in calls])  # EVALSHA sha numkeys KEY ...
        send(self, calls)

    monkeypatch.setattr(_Connection, "send", recording_send)
    settled = channel.call("set", ["slot"], ["free"], deferrable=True)
    await asyncio.sleep(0)  # a turn passes: an urgent call would have gone by now
    assert writes == []
    # Redis must see the deferred write first: it was made first.
    admitted = channel.call("incr", ["slot-reads"], [])
    assert await admitted == 1
    assert await settled == "OK"
    assert writes == [["slot", "slot-reads"]]


async def test_a_deferrable_call_alone_goes_out_within_its_deadline(
    channel: ScriptChannel, plain: aioredis.Redis
) -> None:
    await channel.call("incr", ["warm"], [])
    started = time.perf_counter()
    assert await channel.call("incr", ["n"], [], deferrable=True) == 1
    waited = time.perf_counter() - started
    # Deferred (not sent on the next turn), yet sent: no urgent call ever came.
    assert waited >= DEFER_S * 0.9
    assert await plain.get("n") == "1"


async def test_the_pooled_batcher_defers_the_same_way(
    redis_server: RedisProcess,
    plain: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    roomy_deferral: float,
) -> None:
    client = aioredis.Redis(port=redis_server.port)
    batcher = ScriptBatcher(client, SOURCES, timeout_s=2.0)
    batches: list[list[tuple[Any, ...]]] = []
    execute = ScriptBatcher._execute

    async def recording_execute(self: ScriptBatcher, batch: list[Any]) -> list[Any]:
        batches.append([tuple(args) for _, _, args, _ in batch])
        return await execute(self, batch)

    monkeypatch.setattr(ScriptBatcher, "_execute", recording_execute)
    try:
        assert await batcher.call("incr", ["warm"], []) == 1  # the scripts are loaded
        batches.clear()
        deferred = batcher.call("set", ["k"], ["first"], deferrable=True)
        await asyncio.sleep(0)  # a turn passes: an urgent call would have gone by now
        assert batches == []
        urgent = batcher.call("set", ["k"], ["second"])
        assert await asyncio.gather(deferred, urgent) == [b"OK", b"OK"]
        assert batches == [[("first",), ("second",)]]  # one pipeline, in the order made
        assert await plain.get("k") == "second"
        started = time.perf_counter()
        assert await batcher.call("incr", ["alone"], [], deferrable=True) == 1
        assert time.perf_counter() - started >= roomy_deferral * 0.9
    finally:
        await client.aclose()


async def test_the_pooled_batcher_sends_batches_made_while_its_scripts_load(
    redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A gateway's first script calls can come from several tasks at once (a request, the
    # upstream key gauges): a batch sent while another loads the scripts must find them all.
    client = aioredis.Redis(port=redis_server.port)
    load = client.script_load

    async def slow_load(source: str) -> Any:
        await asyncio.sleep(0.05)  # room for another batch between two scripts' loads
        return await load(source)

    monkeypatch.setattr(client, "script_load", slow_load)
    batcher = ScriptBatcher(client, SOURCES, timeout_s=2.0)
    try:
        first = batcher.call("set", ["a"], ["v"])
        await asyncio.sleep(0.07)  # the first script loaded, the second not yet
        second = batcher.call("set", ["b"], ["v"])
        assert await asyncio.gather(first, second) == [b"OK", b"OK"]
    finally:
        await client.aclose()


async def test_closing_fails_deferred_calls_nothing_will_send(channel: ScriptChannel) -> None:
    await channel.call("incr", ["warm"], [])
    orphan = channel.call("incr", ["n"], [], deferrable=True)
    await channel.aclose()
    with pytest.raises(Exception, match="storage closed"):
        await orphan


async def test_an_error_reply_fails_only_its_own_call(
    channel: ScriptChannel, plain: aioredis.Redis
) -> None:
    await plain.hset("a-hash", "f", "v")
    results = await asyncio.gather(
        channel.call("incr", ["x"], []),
        channel.call("incr", ["a-hash"], []),  # WRONGTYPE inside the script
        channel.call("incr", ["x"], []),
        return_exceptions=True,
    )
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], ResponseError)
    assert "WRONGTYPE" in str(results[1])


async def test_after_script_flush_scripts_load_again_and_order_holds(
    channel: ScriptChannel, plain: aioredis.Redis
) -> None:
    assert await channel.call("incr", ["n"], []) == 1
    await plain.script_flush()
    replies = await asyncio.gather(*(channel.call("incr", ["n"], []) for _ in range(50)))
    assert sorted(replies) == list(range(2, 52))
    assert await plain.get("n") == "51"


async def test_a_caller_that_gives_up_before_the_write_sends_nothing(
    channel: ScriptChannel, plain: aioredis.Redis
) -> None:
    gone = channel.call("incr", ["n"], [])
    gone.cancel()  # in the same turn: the batch has not been written yet
    assert await channel.call("incr", ["other"], []) == 1
    assert await plain.get("n") is None


async def test_user_password_and_database_come_from_the_url(
    redis_server: RedisProcess, plain: aioredis.Redis
) -> None:
    await plain.acl_setuser(
        "gw", enabled=True, passwords=["+s3cret"], keys=["*"], commands=["+@all"]
    )
    try:
        url = f"redis://gw:s3cret@127.0.0.1:{redis_server.port}/5"
        storage = open_storage(StorageSettings(url=url))
        try:
            # admit.lua via the real storage path lands in database 5, authenticated.
            await storage.call("SET", "probe", "db5")
            assert await plain.get("probe") is None
            await plain.execute_command("SELECT", 5)
            assert await plain.get("probe") == "db5"
            await plain.execute_command("SELECT", 0)
        finally:
            await storage.close()
        chan = channel_for(
            {
                "host": "127.0.0.1",
                "port": redis_server.port,
                "db": 5,
                "username": "gw",
                "password": "s3cret",
            }
        )
        try:
            assert await chan.call("set", ["written"], ["yes"]) == "OK"
        finally:
            await chan.aclose()
        await plain.execute_command("SELECT", 5)
        assert await plain.get("written") == "yes"
        await plain.execute_command("SELECT", 0)

        wrong = open_storage(StorageSettings(url=url.replace("s3cret", "nope")))
        try:
            with pytest.raises(StorageError):
                await wrong.run("admit", ["k"], ["peek", "", "k", 0, 0, 0])
        finally:
            await wrong.close()
    finally:
        await plain.acl_deluser("gw")


async def test_unix_socket_urls_use_the_channel_too(tmp_path: Path) -> None:
    socket = tmp_path / "redis.sock"
    server = start_redis(None, "--unixsocket", str(socket), "--unixsocketperm", "700")
    try:
        # As a config file gives it (the settings once refused the scheme the storage took).
        settings = parse_settings(f'[storage]\nurl = "unix://{socket}?db=2"\n', {})
        storage = open_storage(settings.storage)
        try:
            reply = await storage.run("admit", ["a", "b"], ["peek", "", "k", 0, 0, 0])
            assert isinstance(reply, list)
        finally:
            await storage.close()
        chan = channel_for({"path": str(socket), "db": 2})
        try:
            assert await chan.call("incr", ["n"], []) == 1
        finally:
            await chan.aclose()
        plain = aioredis.Redis(unix_socket_path=str(socket), db=2, decode_responses=True)
        assert await plain.get("n") == "1"
        await plain.aclose()
    finally:
        server.stop()


async def test_a_server_that_never_answers_fails_calls_at_the_deadline_then_reconnects() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # read nothing, answer nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    chan = channel_for({"host": "127.0.0.1", "port": port}, timeout_s=0.3)
    try:
        started = time.monotonic()
        # The handshake (SCRIPT LOAD) gets no answer: connecting times out.
        with pytest.raises(RedisTimeoutError):
            await chan.call("incr", ["n"], [])
        assert time.monotonic() - started < 1.5
        with pytest.raises(RedisTimeoutError):
            await chan.call("incr", ["n"], [])
        assert len(accepted) == 2  # the dead connection was not reused
    finally:
        await chan.aclose()
        server.close()
        for writer in accepted:
            writer.close()
        await server.wait_closed()


async def test_a_stalled_connection_is_dropped_at_the_deadline_and_the_next_call_reconnects(
    redis_server: RedisProcess, plain: aioredis.Redis
) -> None:
    chan = channel_for({"host": "127.0.0.1", "port": redis_server.port}, timeout_s=0.3)
    try:
        assert await chan.call("incr", ["n"], []) == 1  # connected
        clients = len(await plain.client_list())
        await plain.execute_command("CLIENT", "PAUSE", "800", "ALL")  # nobody gets answers
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await chan.call("incr", ["n"], [])
        assert time.monotonic() - started < 0.7
        await asyncio.sleep(0.8)  # the pause ends; the paused INCR may still have run
        assert await chan.call("incr", ["n"], []) in (2, 3)
        assert len(await plain.client_list()) == clients  # a new connection, the old one gone
    finally:
        await chan.aclose()
