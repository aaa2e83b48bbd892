"""Script calls issued in the same event-loop turn travel to Redis together.

Under load many handlers call admit.lua or settle.lua at nearly the same moment. Sending
them one by one costs a socket write, a read and a pooled connection each; here every call
made before the loop comes round again is queued and the whole queue goes out as one
pipeline of EVALSHAs (not a transaction: each script is still its own atomic step). Alone, a
call goes out on the next loop turn, so idle latency does not change; a ``deferrable`` one
(settlement) may wait up to ``DEFER_S`` to leave with the next urgent call, as on the script
channel. NOSCRIPT (after SCRIPT FLUSH or a failover) reloads the scripts and re-sends the
calls that hit it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from .script_channel import FlushSchedule


class ScriptBatcher:
    def __init__(self, client: aioredis.Redis, sources: dict[str, str], timeout_s: float) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._sources = sources
        self._shas: dict[str, str] = {}
        self._queue: list[tuple[str, Sequence[str], list[Any], asyncio.Future[Any]]] = []
        self._schedule = FlushSchedule(self._flush)
        self._tasks: set[asyncio.Task[None]] = set()

    def call(
        self, script: str, keys: Sequence[str], args: list[Any], *, deferrable: bool = False
    ) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((script, keys, args, future))
        self._schedule.queued(loop, deferrable)
        return future

    def _flush(self) -> None:
        self._schedule.taken()
        batch, self._queue = self._queue, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(
        self, batch: list[tuple[str, Sequence[str], list[Any], asyncio.Future[Any]]]
    ) -> None:
        try:
            # One deadline for the whole batch (connection, load, execute): its callers wait
            # on futures, so this is what bounds them, and what frees a stuck connection.
            async with asyncio.timeout(self._timeout_s):
                if not self._shas:
                    await self._load()
                results = await self._execute(batch)
                retry = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
                if retry:
                    await self._load()
                    again = await self._execute([batch[i] for i in retry])
                    for i, result in zip(retry, again, strict=True):
                        results[i] = result
        except BaseException as exc:  # the connection failed: every caller gets the error
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else ConnectionError())
            if not isinstance(exc, Exception):
                raise
            return
        for (*_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # the caller gave up (timeout); the script still ran
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _execute(
        self, batch: list[tuple[str, Sequence[str], list[Any], asyncio.Future[Any]]]
    ) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for script, keys, args, _ in batch:
            pipe.evalsha(self._shas[script], len(keys), *keys, *args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    async def _load(self) -> None:
        # Published whole: a batch sent while this one loads must not find some of the names
        # (it loads them too; SCRIPT LOAD is idempotent).
        shas = {}
        for name, source in self._sources.items():
            shas[name] = await self._client.script_load(source)
        self._shas = shas
