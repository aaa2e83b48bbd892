"""Settlement off the client's path, never lost: tracked, retried, drained at shutdown.

A request whose upstream key reserved a tpm ceiling (docs/upstream-pools.md) also has that
reservation corrected to its real usage here, after the account's settlement.

An admission its caller gave up on is released here too (:meth:`Settler.abandon`), with the
same retries, so what it placed does not wait for its TTL. A settlement that finds its
account gone (wiped or evicted) is not applied: it is counted, logged and kept in the
orphan-settlements stream.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from .keyspace import ORPHAN_SETTLEMENTS
from .limiter import ABANDONED, Limiter, Settlement, SettleResult, settle_result
from .metrics import Metrics, labelled
from .money import NANO_PER_USD
from .storage import StorageError
from .upstream_pool import PoolStore

if TYPE_CHECKING:  # failover.py settles through this module
    from .budget_watch import BudgetWatch
    from .failover import PoolReservation
    from .webhook_events import WebhookEvents

log = logging.getLogger("ratelimit_gw.settle")
# ~32 s in all, then every 5 s: long enough to outlast a Redis restart or a sentinel failover,
# including the ~10 s until the demoted master rejoins as the replica that
# storage.wait_replicas waits for.
RETRY_DELAYS_S = (0.05, 0.2, 0.5, 1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 5.0, 5.0)


class Settler:
    def __init__(
        self,
        limiter: Limiter,
        metrics: Metrics,
        pools: PoolStore,
        events: WebhookEvents | None = None,
        budgets: BudgetWatch | None = None,
    ) -> None:
        self._limiter = limiter
        self._metrics = metrics
        self._pools = pools
        self._events = events  # balance.low webhooks see each applied settlement
        self._budgets = budgets  # so do the budget gauge and events (budgeted keys only)
        # First attempts (storage futures) and retry tasks not finished yet.
        self._pending: set[asyncio.Future[Any]] = set()

    def submit(self, settlement: Settlement, reservation: PoolReservation | None = None) -> None:
        """Start settling now; it goes on even if the request's handler is cancelled.

        ``reservation`` is what the answering upstream key reserved from a tpm ceiling, if
        anything. Without one (the common case) the first attempt is a bare storage future —
        no task per request; a task is made only to retry after a failure, or to correct a
        key's reservation.
        """
        if reservation is not None:
            self._track(self._finish(settlement, reservation))
            return
        attempt = self._limiter.start_settle(settlement)
        self._pending.add(attempt)
        attempt.add_done_callback(functools.partial(self._first_attempt_done, settlement))

    def abandon(self, release: Settlement, cause: str) -> None:
        """Release an admission whose caller will never settle it (``release``: its
        ``AdmissionRequest.abandoned``), counted by ``cause``. Submitted whether or not the
        admission ran: settle.lua gives back what it placed, or keeps it from placing
        anything if it runs later."""
        labelled(self._metrics.abandoned_admissions, cause).inc()
        self.submit(release)

    def _first_attempt_done(self, settlement: Settlement, attempt: asyncio.Future[Any]) -> None:
        self._pending.discard(attempt)
        if attempt.cancelled():
            return  # only at shutdown, after the drain gave up
        exc = attempt.exception()
        if exc is None:
            self._record(settlement, settle_result(attempt.result()))
        elif isinstance(exc, StorageError):
            self._warn_retrying(settlement, exc)
            self._track(self._settle(settlement, RETRY_DELAYS_S))
        else:  # a bug, not storage: retrying would not help; count it like a lost one
            self._metrics.settlement_failures.inc()
            log.error(
                "settlement of %s failed unexpectedly (its hold expires by TTL)",
                settlement.request_id,
                exc_info=exc,
            )

    def _track(self, work: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _finish(
        self, settlement: Settlement, reservation: PoolReservation
    ) -> SettleResult | None:
        result = await self._settle(settlement, (0.0, *RETRY_DELAYS_S))
        actual = settlement.input_tokens + settlement.output_tokens
        try:
            # The estimate back, the real usage taken (negative: an extra debit).
            await self._pools.refund(
                reservation.pool, reservation.key, 0, reservation.tokens - actual
            )
        except StorageError as exc:
            # Not retried: a correction is not idempotent, and the bucket refills anyway.
            log.warning(
                "correcting the tpm reservation of upstream %s key %s for %s failed: %s",
                reservation.pool.provider,
                reservation.key,
                settlement.request_id,
                exc,
            )
        return result

    async def _settle(
        self, settlement: Settlement, delays_s: tuple[float, ...]
    ) -> SettleResult | None:
        """Attempts after each delay in turn. settle.lua is idempotent per request id, so
        retrying after an unclear failure is safe."""
        for attempt, delay in enumerate(delays_s, 1):
            if delay:
                await asyncio.sleep(delay)
            try:
                result = await self._limiter.settle(settlement)
            except StorageError as exc:
                if attempt == len(delays_s):
                    self._metrics.settlement_failures.inc()
                    log.error(
                        "settlement of %s failed for good: %s (its hold expires by TTL)",
                        settlement.request_id,
                        exc,
                    )
                    return None
                self._warn_retrying(settlement, exc)
                continue
            self._record(settlement, result)
            return result
        return None

    @staticmethod
    def _warn_retrying(settlement: Settlement, exc: StorageError) -> None:
        log.warning("settlement of %s failed, retrying: %s", settlement.request_id, exc)

    def _record(self, s: Settlement, result: SettleResult) -> None:
        if result.account_missing:
            self._metrics.orphan_settlements.inc()
            log.warning(
                "settlement %s for account %s found no such account (wiped or evicted?): "
                "not applied, kept in %s",
                s.request_id,
                s.account_id,
                ORPHAN_SETTLEMENTS,
            )
            self._track(self._keep_orphan(s))
            return
        if not result.settled or s.outcome == ABANDONED:
            return  # a repeat (counted the first time), or a release: nothing was used
        m = self._metrics
        account = m.account(s.account_id)
        labelled(m.tokens, s.model, "input", *account).inc(s.input_tokens)
        labelled(m.tokens, s.model, "output", *account).inc(s.output_tokens)
        labelled(m.cost_usd, s.model, *account).inc(s.cost_nano / NANO_PER_USD)
        if result.released_nano > 0:
            labelled(m.holds, "settled").inc()
        if result.overrun:
            m.balance_overruns.inc()
        if self._events is not None:
            self._events.settled(s, result)
        if self._budgets is not None:
            self._budgets.settled(s)

    async def _keep_orphan(self, s: Settlement) -> None:
        try:
            await self._limiter.keep_orphan(s)
        except StorageError as exc:
            # Not retried (a repeat would be a second copy): the log keeps it instead.
            log.error("keeping orphan settlement %r failed: %s", s, exc)

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait for what is in flight, including retries a failed first attempt starts."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._pending:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            await asyncio.wait(set(self._pending), timeout=left)
