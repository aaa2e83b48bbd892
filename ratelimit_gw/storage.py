"""Storage URL → Redis client, with the Lua scripts registered once.

``memory://`` is an in-process fakeredis server running the very same Lua scripts (demo and
development, one process). ``redis://`` and ``rediss://`` use redis-py's asyncio client.
Driver errors are turned into :class:`StorageError` here, at the seam, so callers handle one
exception type.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from importlib import resources
from typing import Any, Protocol
from urllib.parse import urlsplit

import fakeredis
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from .breaker import Breaker
from .settings import ConfigError, StorageSettings

SCRIPT_NAMES = ("admit", "settle", "topup", "create_account")


class StorageError(Exception):
    """Storage could not be reached or failed to answer in time."""


def load_script(name: str) -> str:
    """A script's source: package data of ``ratelimit_gw.lua`` (``lua/`` in a checkout)."""
    return resources.files("ratelimit_gw.lua").joinpath(f"{name}.lua").read_text("utf-8")


class Storage:
    """One Redis client and the registered scripts; every call goes through :meth:`_guarded`.

    ``observer`` (set by the app) receives each call's operation name, duration and success,
    and the breaker's state changes: that is how storage health reaches the metrics.
    """

    def __init__(self, client: aioredis.Redis, settings: StorageSettings) -> None:
        self.client = client
        self.url = settings.url
        self._timeout_s = settings.command_timeout_s
        self.observer: StorageObserver | None = None
        self.breaker = Breaker(
            settings.breaker_failures, settings.breaker_cooldown_s, self._breaker_changed
        )
        # register_script handles NOSCRIPT itself (reloads after SCRIPT FLUSH or failover).
        self.scripts: dict[str, AsyncScript] = {
            name: client.register_script(load_script(name)) for name in SCRIPT_NAMES
        }

    def _breaker_changed(self, state: str) -> None:
        if self.observer is not None:
            self.observer.breaker_changed(state)

    async def _guarded(self, operation: str, call: Awaitable[Any]) -> Any:
        if not self.breaker.allow():
            call.close()  # type: ignore[attr-defined]
            raise StorageError(f"storage call {operation} refused: circuit breaker open")
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await call
        except (RedisError, OSError, TimeoutError) as exc:
            self.breaker.record_failure()
            if self.observer is not None:
                self.observer.storage_call(operation, time.perf_counter() - started, False)
            raise StorageError(f"storage call {operation} failed: {type(exc).__name__}") from exc
        self.breaker.record_success()
        if self.observer is not None:
            self.observer.storage_call(operation, time.perf_counter() - started, True)
        return result

    async def run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        return await self._guarded(script, self.scripts[script](keys=keys, args=args))

    async def call(self, command: str, *args: Any) -> Any:
        """A plain Redis command, with the same timeout, breaker and error wrapping."""
        return await self._guarded(
            command.lower(),
            self.client.execute_command(command, *args),  # type: ignore[no-untyped-call]
        )

    async def ping(self) -> bool:
        try:
            await self.call("PING")
        except StorageError:
            return False
        return True

    async def close(self) -> None:
        await self.client.aclose()


class StorageObserver(Protocol):
    def storage_call(self, operation: str, duration_s: float, ok: bool) -> None: ...

    def breaker_changed(self, state: str) -> None: ...


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
    return Storage(client, settings)
