"""Settlement off the client's path, never lost: tracked tasks, retried, drained at shutdown.

A request that passed a shared upstream ceiling (§10) also has that ceiling's tpm bucket
corrected to its real usage here, after the account's settlement.
"""

from __future__ import annotations

import asyncio
import logging

from .limiter import Limiter, Settlement, SettleResult
from .metrics import Metrics, labelled
from .money import NANO_PER_USD
from .quota import QuotaDecision, UpstreamQuota
from .storage import StorageError

log = logging.getLogger("ratelimit_gw.settle")
# ~32 s in all, then every 5 s: long enough to outlast a Redis restart or a sentinel failover,
# including the ~10 s until the demoted master rejoins as the replica that
# storage.wait_replicas waits for.
RETRY_DELAYS_S = (0.05, 0.2, 0.5, 1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 5.0, 5.0)


class Settler:
    def __init__(self, limiter: Limiter, metrics: Metrics, quota: UpstreamQuota) -> None:
        self._limiter = limiter
        self._metrics = metrics
        self._quota = quota
        self._tasks: set[asyncio.Task[SettleResult | None]] = set()

    def submit(
        self, settlement: Settlement, quota: QuotaDecision | None = None
    ) -> asyncio.Task[SettleResult | None]:
        """Start settling now; the task lives on even if the request's handler is cancelled.

        ``quota`` is the request's reservation on a shared upstream ceiling, if it had one.
        """
        task = asyncio.get_running_loop().create_task(self._finish(settlement, quota))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _finish(
        self, settlement: Settlement, quota: QuotaDecision | None
    ) -> SettleResult | None:
        result = await self._settle(settlement)
        if quota is not None:
            actual = settlement.input_tokens + settlement.output_tokens
            try:
                await self._quota.correct(quota, actual)
            except StorageError as exc:
                # Not retried: a correction is not idempotent, and the bucket refills anyway.
                log.warning(
                    "correcting the upstream ceiling for %s failed: %s",
                    settlement.request_id,
                    exc,
                )
        return result

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
        labelled(m.tokens, s.model, "input", *account).inc(s.input_tokens)
        labelled(m.tokens, s.model, "output", *account).inc(s.output_tokens)
        labelled(m.cost_usd, s.model, *account).inc(s.cost_nano / NANO_PER_USD)
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
