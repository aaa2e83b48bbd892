"""Settlement off the client's path, never lost: tracked tasks, retried, drained at shutdown."""

from __future__ import annotations

import asyncio
import logging

from .limiter import Limiter, Settlement, SettleResult
from .metrics import Metrics
from .money import NANO_PER_USD
from .storage import StorageError

log = logging.getLogger("ratelimit_gw.settle")
RETRY_DELAYS_S = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)


class Settler:
    def __init__(self, limiter: Limiter, metrics: Metrics) -> None:
        self._limiter = limiter
        self._metrics = metrics
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
                result = await self._limiter.settle(settlement)
            except StorageError as exc:
                if delay is None:
                    self._metrics.settlement_failures.inc()
                    log.error(
                        "settlement of %s failed for good: %s (its hold expires by TTL)",
                        settlement.request_id,
                        exc,
                    )
                    return None
                log.warning("settlement of %s failed, retrying: %s", settlement.request_id, exc)
                await asyncio.sleep(delay)
                continue
            self._record(settlement, result)
            return result
        return None

    def _record(self, s: Settlement, result: SettleResult) -> None:
        if not result.settled:
            return  # a repeat: counted the first time
        m = self._metrics
        account = m.account(s.account_id)
        m.tokens.labels(s.model, "input", *account).inc(s.input_tokens)
        m.tokens.labels(s.model, "output", *account).inc(s.output_tokens)
        m.cost_usd.labels(s.model, *account).inc(s.cost_nano / NANO_PER_USD)
        if result.released_nano > 0:
            m.holds.labels("settled").inc()
        if result.overrun:
            m.balance_overruns.inc()

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout_s: float = 10.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
