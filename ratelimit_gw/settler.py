"""Settlement off the client's path, never lost: tracked tasks, retried, drained at shutdown."""

from __future__ import annotations

import asyncio
import logging

from .limiter import Limiter, Settlement, SettleResult
from .storage import StorageError

log = logging.getLogger("ratelimit_gw.settle")
RETRY_DELAYS_S = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)


class Settler:
    def __init__(self, limiter: Limiter) -> None:
        self._limiter = limiter
        self._tasks: set[asyncio.Task[SettleResult | None]] = set()

    def submit(self, settlement: Settlement) -> asyncio.Task[SettleResult | None]:
        """Start settling now; the task lives on even if the request's handler is cancelled."""
        task = asyncio.get_running_loop().create_task(self._settle(settlement))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _settle(self, settlement: Settlement) -> SettleResult | None:
        # settle.lua is idempotent per request id, so retrying after an unclear failure is safe.
        for delay in (*RETRY_DELAYS_S, None):
            try:
                return await self._limiter.settle(settlement)
            except StorageError as exc:
                if delay is None:
                    log.error(
                        "settlement of %s failed for good: %s (its hold expires by TTL)",
                        settlement.request_id,
                        exc,
                    )
                    return None
                log.warning("settlement of %s failed, retrying: %s", settlement.request_id, exc)
                await asyncio.sleep(delay)
        return None

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout_s: float = 10.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
