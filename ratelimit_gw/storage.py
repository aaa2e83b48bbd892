"""Storage URL → Redis client, with the Lua scripts registered once.

``memory://`` is an in-process fakeredis server running the very same Lua scripts (demo and
development, one process). ``redis://`` and ``rediss://`` use redis-py's asyncio client.
Driver errors are turned into :class:`StorageError` here, at the seam, so callers handle one
exception type.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import fakeredis
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from .settings import ConfigError, StorageSettings

SCRIPT_NAMES = ("admit", "settle", "topup", "create_account")


class StorageError(Exception):
    """Storage could not be reached or failed to answer in time."""


def load_script(name: str) -> str:
    """A script's source: package data of ``ratelimit_gw.lua`` (``lua/`` in a checkout)."""
    return resources.files("ratelimit_gw.lua").joinpath(f"{name}.lua").read_text("utf-8")


class Storage:
    """One Redis client and the registered scripts; :meth:`run` is the only script caller."""

    def __init__(self, client: aioredis.Redis, url: str, command_timeout_s: float) -> None:
        self.client = client
        self.url = url
        self._timeout_s = command_timeout_s
        # register_script handles NOSCRIPT itself (reloads after SCRIPT FLUSH or failover).
        self.scripts: dict[str, AsyncScript] = {
            name: client.register_script(load_script(name)) for name in SCRIPT_NAMES
        }

    async def run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self.scripts[script](keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StorageError(f"storage call {script} failed: {type(exc).__name__}") from exc

    async def call(self, command: str, *args: Any) -> Any:
        """A plain Redis command, with the same timeout and error wrapping as scripts."""
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self.client.execute_command(command, *args)  # type: ignore[no-untyped-call]
        except (RedisError, OSError, TimeoutError) as exc:
            raise StorageError(f"storage call {command} failed: {type(exc).__name__}") from exc

    async def ping(self) -> bool:
        try:
            await self.call("PING")
        except StorageError:
            return False
        return True

    async def close(self) -> None:
        await self.client.aclose()


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
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=settings.max_connections,
            timeout=settings.command_timeout_s,
            decode_responses=True,
            socket_connect_timeout=settings.connect_timeout_s,
            socket_timeout=settings.command_timeout_s,
            health_check_interval=30,
        )
        client = aioredis.Redis.from_pool(pool)  # the client owns and closes the pool
    else:
        raise ConfigError(f"storage.url: {scheme}:// is not supported by this build yet")
    return Storage(client, url, settings.command_timeout_s)
