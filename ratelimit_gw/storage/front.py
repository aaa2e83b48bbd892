"""The storage front: one Redis client, the registered scripts, and every call guarded.

Each call passes the circuit breaker, a timeout and the metrics observer here; driver errors
are turned into :class:`StorageError` at this seam, so callers handle one exception type,
and an error reply is told from an outage so the breaker judges right.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Protocol, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)

from ..settings import StorageSettings
from .breaker import Breaker
from .location import failure_cause, scrubbed, storage_location, url_secrets
from .script_batch import ScriptBatcher
from .script_channel import NeverSent, ScriptChannel
from .scripts import script_sources

# Their writes are money: with ``wait_replicas`` they return only once replicas have them.
DURABLE_SCRIPTS = frozenset({"settle", "topup", "delete_account"})

log = logging.getLogger("ratelimit_gw.storage")


class StorageError(Exception):
    """Storage could not be reached or failed to answer in time.

    ``never_sent``: the call certainly never reached Redis (the breaker refused it, or no
    connection took it), so it did not run. Otherwise it may have run, whatever its caller
    saw: a script whose reply was lost still placed what it placed.
    """

    def __init__(self, message: str, *, never_sent: bool = False) -> None:
        super().__init__(message)
        self.never_sent = never_sent


class NotReplicatedError(RedisError):
    """A durable write reached the master but not enough replicas acknowledged it in time."""


class Storage:
    """One Redis client and the registered scripts; every call goes through :meth:`_guarded`.

    ``observer`` (set by the app) receives each call's operation name, duration and success,
    and the breaker's state changes: that is how storage health reaches the metrics.
    """

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        settings: StorageSettings,
        *,
        batch_scripts: bool = True,
        channel: ScriptChannel | None = None,
        wait_replicas: int = 0,
        max_in_flight: int | None = None,
        follow_master: Callable[[], Awaitable[None]] | None = None,
        closers: tuple[Callable[[], Awaitable[None]], ...] = (),
    ) -> None:
        self.client = client
        self.url = settings.url
        # Named in every error and log line: where storage is, never its password.
        self.location = storage_location(settings.url)
        self._secrets = url_secrets(settings.url)
        self._last_cause = "no failure yet"
        self._timeout_s = settings.command_timeout_s
        # WAIT for replicas after durable scripts; its own timeout leaves room for the script.
        self._wait_replicas = wait_replicas
        self._wait_ms = max(1, int(settings.command_timeout_s * 1000) // 2)
        # A pool that raises rather than waits when full (cluster) gets a waiting limit here.
        self._slots = asyncio.Semaphore(max_in_flight) if max_in_flight else None
        self._follow_master = follow_master  # sentinel: re-ask where the master is
        self._closers = closers
        self.observer: StorageObserver | None = None
        self._cooldown_s = settings.breaker_cooldown_s
        self.breaker = Breaker(
            settings.breaker_failures, settings.breaker_cooldown_s, self._breaker_changed
        )
        # register_script handles NOSCRIPT itself (reloads after SCRIPT FLUSH or failover).
        sources = script_sources()
        self.scripts: dict[str, AsyncScript] = {
            name: client.register_script(source) for name, source in sources.items()
        }
        # Scripts travel batched: on their own pipelined connection where the URL allows
        # (script_channel.py), else as redis-py pipelines from the pool (script_batch.py).
        self._batcher: ScriptChannel | ScriptBatcher | None = channel
        if channel is None and batch_scripts and isinstance(client, aioredis.Redis):
            self._batcher = ScriptBatcher(client, sources, settings.command_timeout_s)

    def _breaker_changed(self, state: str) -> None:
        if state == "open":
            log.warning(
                "storage at %s unavailable (%s): failing calls at once for %gs, then trying again",
                self.location,
                self._last_cause,
                self._cooldown_s,
            )
        elif state == "closed":
            log.info("storage at %s answers again", self.location)
        if self.observer is not None:
            self.observer.breaker_changed(state)

    async def _guarded(self, operation: str, make_call: Callable[[], Awaitable[Any]]) -> Any:
        """Breaker, timeout, metrics and error wrapping around one call (batched scripts get
        the same from :meth:`_batched`)."""
        if not self.breaker.allow():
            raise self._refused(operation)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s):
                if self._slots is None:
                    result = await make_call()
                else:
                    async with self._slots:
                        result = await make_call()
        except BaseException as exc:
            error = self._failed(operation, started, exc)
            if error is exc:
                raise
            raise error from exc
        self._succeeded(operation, started)
        return result

    def _succeeded(self, operation: str, started: float) -> None:
        self.breaker.record_success()
        if self.observer is not None:
            self.observer.storage_call(operation, time.perf_counter() - started, True)

    def _failed(self, operation: str, started: float, exc: BaseException) -> BaseException:
        """Judge a failed call (breaker, metrics); returns what its caller should raise."""
        if isinstance(exc, NotReplicatedError):
            # Storage answered: a missing replica must not open the breaker for everyone.
            self.breaker.record_success()
            cause = str(exc)
        elif isinstance(exc, RedisError | RedisClusterException | OSError | TimeoutError):
            cause = scrubbed(failure_cause(exc), self._secrets)
            # RedisClusterException: no node reachable, a slot not covered (not a RedisError).
            if _unavailable(exc):
                self._last_cause = cause  # before the breaker may open and log it
                self.breaker.record_failure()
            else:  # an error reply (bad input, WRONGTYPE…): storage is up, the breaker stays
                self.breaker.record_success()
        else:
            # Cancelled (the client left) or an unexpected error: no verdict on storage, but a
            # half-open breaker must not wait forever for this trial's outcome.
            self.breaker.record_abandoned()
            return exc
        if self.observer is not None:
            self.observer.storage_call(operation, time.perf_counter() - started, False)
        error = StorageError(
            f"storage call {operation} failed at {self.location}: {cause}",
            never_sent=isinstance(exc, NeverSent),
        )
        error.__cause__ = exc
        return error

    async def run(self, script: str, keys: Sequence[str], args: list[Any]) -> Any:
        if self._wait_replicas and script in DURABLE_SCRIPTS:
            return await self._guarded(script, lambda: self._run_durable(script, keys, args))
        if self._batcher is not None:
            # Every admission comes here: a future, not another coroutine around the call.
            return await self._batched(self._batcher, script, keys, args)
        return await self._guarded(script, lambda: self.scripts[script](keys=keys, args=args))

    def run_soon(self, script: str, keys: Sequence[str], args: list[Any]) -> asyncio.Future[Any]:
        """:meth:`run` started now, as a future: with batched scripts, no coroutine or task
        is made for the call (settlement calls this once per request, off the client's path)
        and the call is deferrable — it may wait a moment (``DEFER_S``) to travel with the
        next admission. Failures arrive as the same :class:`StorageError`, judged by the
        same breaker."""
        if self._batcher is None or (self._wait_replicas and script in DURABLE_SCRIPTS):
            return asyncio.ensure_future(self.run(script, keys, args))
        return self._batched(self._batcher, script, keys, args, deferrable=True)

    def _batched(
        self,
        batcher: ScriptChannel | ScriptBatcher,
        script: str,
        keys: Sequence[str],
        args: list[Any],
        *,
        deferrable: bool = False,
    ) -> asyncio.Future[Any]:
        """The script queued on the batcher (which bounds it by the command timeout); the
        breaker and metrics judge its reply when it arrives, whether or not anyone still waits
        for it (a caller that gives up only cancels the future returned here)."""
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[Any] = loop.create_future()
        if not self.breaker.allow():
            outcome.set_exception(self._refused(script))
            return outcome
        started = time.perf_counter()

        def judge(reply: asyncio.Future[Any]) -> None:
            if reply.cancelled():
                self._failed(script, started, asyncio.CancelledError())
                outcome.cancel()
                return
            exc = reply.exception()
            if exc is None:
                self._succeeded(script, started)
                if not outcome.done():
                    outcome.set_result(reply.result())
                return
            error = self._failed(script, started, exc)
            if not outcome.done():
                outcome.set_exception(error)

        batcher.call(script, keys, args, deferrable=deferrable).add_done_callback(judge)
        return outcome

    async def _run_durable(self, script: str, keys: Sequence[str], args: list[Any]) -> Any:
        """The script, then WAIT on the same connection: done only once replicas have it.

        A failover promotes a replica; writes the old master acknowledged but had not yet
        replicated are gone. Too few acknowledgements → :class:`NotReplicatedError`, and the
        caller retries (settle.lua and topup.lua are idempotent): on the new master the write
        is either there already (a repeat) or applied once.
        """
        assert isinstance(self.client, aioredis.Redis)
        async with self.client.client() as connection:  # one connection for both commands
            result = await self.scripts[script](keys=keys, args=args, client=connection)
            acked = int(
                await connection.execute_command(  # type: ignore[no-untyped-call]
                    "WAIT", self._wait_replicas, self._wait_ms
                )
            )
        if acked < self._wait_replicas:
            if self._follow_master is not None:
                await self._follow_master()
            raise NotReplicatedError(
                f"{acked} of {self._wait_replicas} replicas acknowledged within {self._wait_ms} ms"
            )
        return result

    async def call(self, command: str, *args: Any) -> Any:
        """A plain Redis command, with the same timeout, breaker and error wrapping."""
        return await self._guarded(
            command.lower(),
            lambda: self.client.execute_command(command, *args),  # type: ignore[no-untyped-call,unused-ignore]
        )

    async def call_many(
        self, commands: list[tuple[Any, ...]], *, atomic: bool = False
    ) -> list[Any]:
        """Several commands in one round trip: a pipeline, or with ``atomic`` a MULTI/EXEC
        (then all keys must share one hash slot)."""
        pipe = self.client.pipeline(transaction=atomic)
        for command in commands:
            pipe.execute_command(*command)
        result: list[Any] = await self._guarded("pipeline", pipe.execute)
        return result

    async def ping(self) -> bool:
        try:
            await self.call("PING")
        except StorageError:
            return False
        return True

    async def eviction_policies(self) -> dict[str, str | None]:
        """Every master's ``maxmemory-policy``, by node: the server of a plain URL, the
        master the sentinels name, every cluster primary; none on ``memory://`` (in-process,
        nothing else evicts its keys). None for a node that refuses both ways of asking.
        An outage raises :class:`StorageError`."""
        if isinstance(self.client, RedisCluster):
            if not self.client.get_primaries():  # the topology arrives with the first command
                await self._guarded("cluster", self.client.initialize)
            return {
                node.name: await self._eviction_policy(target_nodes=node)
                for node in self.client.get_primaries()
            }
        if self.url.startswith("memory://"):
            return {}
        policy = await self._eviction_policy()  # first, so a sentinel pool knows its master
        pool = self.client.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            host, port = cast(tuple[str, int], pool.master_address)  # set by the call above
            return {f"{host}:{port}": policy}
        options = pool.connection_kwargs
        return {str(options.get("path") or f"{options['host']}:{options['port']}"): policy}

    async def _eviction_policy(self, **target: Any) -> str | None:
        """CONFIG GET, else INFO memory (ACLs may deny CONFIG, managed Redis may rename it)."""
        for operation, command, field in (
            ("config", ("CONFIG", "GET", "maxmemory-policy"), "maxmemory-policy"),
            ("info", ("INFO", "memory"), "maxmemory_policy"),
        ):
            reply = await self._guarded(operation, partial(self._ask, command, target))
            if isinstance(reply, dict) and reply.get(field):
                return str(reply[field])
        return None

    async def _ask(self, command: tuple[str, ...], target: dict[str, Any]) -> Any:
        """The reply, or the refusal (NOPERM, unknown command) as a value: an answer, so it
        counts neither as a storage error nor against the breaker, at every periodic check."""
        try:
            return await self.client.execute_command(*command, **target)  # type: ignore[no-untyped-call,unused-ignore]
        except ResponseError as refusal:
            if _unavailable(refusal):
                raise
            return refusal

    def _refused(self, operation: str) -> StorageError:
        return StorageError(
            f"storage call {operation} refused: circuit breaker open, storage at "
            f"{self.location} failed recently ({self._last_cause})",
            never_sent=True,
        )

    async def close(self) -> None:
        if isinstance(self._batcher, ScriptChannel):
            await self._batcher.aclose()
        await self.client.aclose()
        for close in self._closers:
            await close()


def _unavailable(exc: BaseException) -> bool:
    """Does this error say storage cannot serve (vs. it answered with an error reply)?"""
    if not isinstance(exc, ResponseError):
        return True  # connection, timeout, no cluster node, …
    if isinstance(exc, ReadOnlyError | ClusterDownError | TryAgainError | OutOfMemoryError):
        return True  # a failover in progress, a cluster without quorum, Redis out of memory
    return str(exc).startswith(("BUSY", "NOREPLICAS"))  # a long script; too few replicas


class StorageObserver(Protocol):
    def storage_call(self, operation: str, duration_s: float, ok: bool) -> None: ...

    def breaker_changed(self, state: str) -> None: ...
