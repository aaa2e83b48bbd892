"""Storage URL → a :class:`~ratelimit_gw.storage.front.Storage`, one backend per scheme.

``memory://`` is an in-process fakeredis server running the very same Lua scripts (demo and
development, one process). ``redis://`` and ``rediss://`` use redis-py's asyncio client;
``redis+cluster://host:port[,host:port…]`` a Redis Cluster (every script's keys share one hash
tag, so each EVALSHA goes to one slot); ``redis+sentinel://host:port[,host:port…]/service[/db]``
the master that the sentinels name, followed across failovers.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import fakeredis
import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from ..settings import ConfigError, StorageSettings
from .front import Storage
from .script_channel import ScriptChannel
from .scripts import script_sources


class _HiredisPackedConnection(aioredis.Connection):
    """redis-py's asyncio connection packs commands in Python (~3 µs per argument); an
    admission sends ~20 arguments. hiredis, already a dependency, packs them in C."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:
            args = (*args[0].split(), *args[1:])  # "SCRIPT LOAD" is two protocol words
        return [hiredis.pack_command(args)]


def _fast_packing(scheme: str) -> dict[str, Any]:
    if scheme == "redis" and hasattr(hiredis, "pack_command"):
        return {"connection_class": _HiredisPackedConnection}
    return {}


def open_storage(settings: StorageSettings) -> Storage:
    url = settings.url
    scheme = urlsplit(url).scheme
    client: aioredis.Redis
    if scheme == "memory":
        # The same bounded, waiting pool as below: redis-py's default pool raises
        # MaxConnectionsError once a burst needs more than 100 connections.
        client = fakeredis.FakeAsyncRedis(
            server=fakeredis.FakeServer(),
            decode_responses=True,
            connection_pool_class=aioredis.BlockingConnectionPool,
            max_connections=settings.max_connections,
        )
    elif scheme in ("redis", "rediss", "unix"):
        # A bounded pool that makes callers wait for a free connection (up to the command
        # timeout) rather than fail when a burst needs more connections than it holds.
        # No socket_timeout: Storage._guarded bounds every call already, and redis-py would
        # otherwise wrap each socket write in asyncio.wait_for (a task per command).
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=settings.max_connections,
            timeout=settings.command_timeout_s,
            decode_responses=True,
            socket_connect_timeout=settings.connect_timeout_s,
            socket_timeout=None,  # redis-py would default to 5 s per socket operation
            health_check_interval=30,
            # A pooled connection may have died with a Redis restart while idle (scripts use
            # their own connection, so the pool sees little traffic): try once more on a
            # fresh one. Every plain command the gateway sends is idempotent.
            retry=Retry(NoBackoff(), 1),
            **_fast_packing(scheme),
        )
        client = aioredis.Redis.from_pool(pool)  # the client owns and closes the pool
    elif scheme == "redis+cluster":
        return _open_cluster(settings)
    elif scheme == "redis+sentinel":
        return _open_sentinel(settings)
    else:
        raise ConfigError(f"storage.url: {scheme}:// is not supported by this build yet")
    if settings.wait_replicas and scheme == "memory":
        raise ConfigError("storage.wait_replicas: memory:// has no replicas")
    channel = None
    if scheme in ("redis", "unix"):  # rediss:// (TLS) stays on redis-py's connections
        channel = ScriptChannel(
            dict(parse_url(url)),
            script_sources(),
            settings.command_timeout_s,
            settings.connect_timeout_s,
        )
    return Storage(client, settings, channel=channel, wait_replicas=settings.wait_replicas or 0)


def _split_url(url: str) -> tuple[str | None, str | None, list[tuple[str, int]], list[str]]:
    """``scheme://[user[:password]@]host:port[,host:port…][/a[/b]]`` → its parts.

    urlsplit cannot parse a comma-separated host list, hence this.
    """
    rest = url.split("://", 1)[1]
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        credentials, _, netloc = netloc.rpartition("@")
        user, sep, secret = credentials.partition(":")
        username, password = unquote(user) or None, unquote(secret) if sep else None
    hosts: list[tuple[str, int]] = []
    for item in netloc.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"storage.url: {item!r} must be host:port")
        hosts.append((host.strip("[]"), int(port)))
    segments = [unquote(p) for p in path.split("/") if p]
    return username, password, hosts, segments


def _open_cluster(settings: StorageSettings) -> Storage:
    """``redis+cluster://[user:password@]host:port[,host:port…]``: any nodes; the rest is
    discovered. Scripts are loaded on every master (SCRIPT LOAD goes to all of them)."""
    username, password, hosts, segments = _split_url(settings.url)
    if segments not in ([], ["0"]):
        raise ConfigError("storage.url: a Redis Cluster has only database 0")
    if settings.wait_replicas:
        raise ConfigError("storage.wait_replicas: not supported with redis+cluster://")
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in hosts],
        username=username,
        password=password,
        decode_responses=True,
        socket_connect_timeout=settings.connect_timeout_s,
        socket_timeout=settings.command_timeout_s,
        # Per node; the semaphore below keeps the whole process within it, waiting (up to
        # the command timeout) instead of failing when a burst needs more.
        max_connections=settings.max_connections,
    )
    # No batching: one pipeline would span slots and nodes.
    return Storage(client, settings, batch_scripts=False, max_in_flight=settings.max_connections)


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The sentinel-managed pool, waiting for a free connection like the plain one."""


def _open_sentinel(settings: StorageSettings) -> Storage:
    """``redis+sentinel://[user:password@]host:port[,host:port…]/service[/db]``.

    Connections go to the master the sentinels name; after a failover, new connections ask
    again, and a durable write that no replica acknowledged makes the pool re-ask at once
    (the old master may accept writes for seconds before the sentinels demote it).
    """
    username, password, hosts, segments = _split_url(settings.url)
    if not segments or len(segments) > 2 or (len(segments) == 2 and not segments[1].isdigit()):
        raise ConfigError("storage.url: redis+sentinel:// needs /service_name[/db] after the hosts")
    service = segments[0]
    db = int(segments[1]) if len(segments) == 2 else 0
    timeouts = {
        "socket_connect_timeout": settings.connect_timeout_s,
        "socket_timeout": settings.command_timeout_s,
    }
    sentinel = Sentinel(hosts, sentinel_kwargs=timeouts)  # type: ignore[no-untyped-call,unused-ignore]
    client = sentinel.master_for(
        service,
        connection_pool_class=_BlockingSentinelPool,
        db=db,
        username=username,
        password=password,
        decode_responses=True,
        max_connections=settings.max_connections,
        timeout=settings.command_timeout_s,  # waiting for a free pooled connection
        socket_connect_timeout=settings.connect_timeout_s,
        socket_timeout=settings.command_timeout_s,
    )
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)

    async def follow_master() -> None:
        previous = pool.master_address
        current = await pool.get_master_address()  # type: ignore[no-untyped-call]
        if current != previous:  # get_master_address dropped the idle connections itself
            await pool.update_active_connections_for_reconnect()  # type: ignore[no-untyped-call]

    wait = 1 if settings.wait_replicas is None else settings.wait_replicas
    return Storage(
        client,
        settings,
        wait_replicas=wait,
        follow_master=follow_master,
        closers=(sentinel.aclose,),
    )
