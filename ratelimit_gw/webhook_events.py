"""Which webhook events happen, and raising them (docs/webhooks.md): never on a request's path.

What :class:`WebhookEvents` promises:

- ``balance.low``: a settlement that took a prepaid account's balance from at or above a
  webhook's ``balance_below_usd`` to below it raises one event, named after that settlement
  (``balance.low:<account>:<threshold nano-USD>:<settlement id>``): settlements of one
  account are applied one at a time, so exactly one crosses, whichever instance ran it. It
  is checked in memory in the settlement's callback; only a crossing costs storage calls
  (reading the prepaid flag, raising), in a task of their own.
- ``key.expiring``: a scan, run by one instance per ``key_scan_interval_s`` (a claim in
  storage), raises ``key.expiring:<account>:<key id>:<expiry ms>`` for every live key that
  expires within a webhook's ``key_expiring_within_s``.
- ``upstream_key.unhealthy``: a scan every ``UPSTREAM_SCAN_S`` (webhook_delivery.py) raises
  ``upstream_key.unhealthy:<provider>:<key>:<marked ms>`` for each pool key an upstream 401
  marked unhealthy (the mark's time names the episode: healthy and refused again is a new
  event).
- ``budget.80`` / ``budget.100``: after a settlement of a budgeted key (budget_watch.py
  reads its budgets), each budget whose period's spent plus held reached 80 % / 100 % of its
  cap raises ``budget.<percent>:<account>:<account|key:<key id>>:<period spec>:<period start
  ms>``: once per budget, period and threshold, whichever instance saw it first; the next
  period is a new id. Each process also remembers the ids it raised, so a budget over 80 %
  costs no raise per settlement.
- Raising is idempotent by id (webhook_outbox.py): a scan raises the same event at every
  turn and only the first counts. Storage failing only delays a scan; a failed
  ``balance.low`` raise is logged (its crossing is not seen again).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from .accounts import AccountStore
from .budgets import BudgetUse
from .keys import MAX_PAGE
from .keyspace import WEBHOOK_KEY_SCAN, AccountKeys
from .limiter import ABANDONED, Settlement, SettleResult
from .management import iso, parse_time_ms
from .metrics import Metrics, labelled
from .money import format_usd
from .settings import Provider, Webhook
from .settings.schema import WebhookDeliverySettings
from .storage import Storage
from .upstream_pool import PoolStore, pool_of
from .webhook_outbox import Outbox

log = logging.getLogger("ratelimit_gw.webhooks")

MAX_RAISING = 1000  # balance.low raises in flight per process; beyond: logged, not raised
BUDGET_PERCENTS = (80, 100)  # the budget.<percent> event types
MAX_BUDGET_RAISED = 100_000  # budget event ids a process remembers raising; then forgets all


class WebhookLookup(Protocol):
    """Which webhooks there are now (webhook_delivery.WebhookDirectory)."""

    def for_account(self, account: str | None) -> Sequence[Webhook]:
        """The global webhooks, and ``account``'s own if it has one."""
        ...

    def any_wants(self, event_type: str) -> bool: ...


class WebhookEvents:
    """Raises every event type for the webhooks that want it."""

    def __init__(
        self,
        storage: Storage,
        accounts: AccountStore,
        pools: PoolStore,
        metrics: Metrics,
        webhooks: WebhookLookup,
        delivery: Callable[[], WebhookDeliverySettings],
    ) -> None:
        self._storage = storage
        self._accounts = accounts
        self._pools = pools
        self._metrics = metrics
        self._webhooks = webhooks  # global and accounts' own, as they are now
        self._delivery = delivery
        self.outbox = Outbox(storage)
        self._raising: set[asyncio.Task[None]] = set()
        self._budget_raised: set[str] = set()

    async def raise_for(
        self, event_type: str, account: str | None, event_id: str, data: dict[str, Any]
    ) -> int:
        """Raise the event for every webhook that wants it; how many were new."""
        new = 0
        lifetime_s = self._delivery().lifetime_s
        for webhook in self._webhooks.for_account(account):
            if webhook.wants(event_type, account) and await self.outbox.raise_event(
                webhook.name, event_id, event_type, account, data, lifetime_s
            ):
                new += 1
                labelled(self._metrics.webhook_events_raised, event_type).inc()
        return new

    # --- balance.low, from settlement ------------------------------------------------------

    def settled(self, s: Settlement, result: SettleResult) -> None:
        """Called with every applied settlement; costs nothing unless a threshold is crossed."""
        if s.cost_nano <= 0 or s.outcome == ABANDONED:
            return
        after = result.balance_nano
        before = after + s.cost_nano
        crossed = [
            w
            for w in self._webhooks.for_account(s.account_id)
            if w.balance_below_nano is not None
            and w.wants("balance.low", s.account_id)
            and before >= w.balance_below_nano > after
        ]
        if not crossed:
            return
        if len(self._raising) >= MAX_RAISING:
            log.error("balance.low of %s not raised: too many raises in flight", s.account_id)
            return
        task = asyncio.get_running_loop().create_task(self._balance_low(s, after, crossed))
        self._raising.add(task)
        task.add_done_callback(self._raising.discard)

    async def _balance_low(self, s: Settlement, after: int, crossed: list[Webhook]) -> None:
        try:
            # A metered account's balance does not move: its settlement only looked like it
            # crossed. Read only now, on a crossing.
            prepaid = await self._storage.call("HGET", AccountKeys(s.account_id).account, "prepaid")
            if prepaid != "1":
                return
            lifetime_s = self._delivery().lifetime_s
            for webhook in crossed:
                threshold = webhook.balance_below_nano
                assert threshold is not None
                event_id = f"balance.low:{s.account_id}:{threshold}:{s.request_id}"
                data = {
                    "balance_usd": format_usd(after),
                    "threshold_usd": format_usd(threshold),
                    "settlement_id": s.request_id,
                }
                if await self.outbox.raise_event(
                    webhook.name, event_id, "balance.low", s.account_id, data, lifetime_s
                ):
                    labelled(self._metrics.webhook_events_raised, "balance.low").inc()
        except Exception:  # a task nobody awaits: say what was lost
            log.exception("raising balance.low of %s failed", s.account_id)

    async def drain(self, timeout_s: float = 5.0) -> None:
        if self._raising:
            await asyncio.wait(set(self._raising), timeout=timeout_s)

    # --- budget.80 and budget.100, after settlement (budget_watch.py) ----------------------

    def wants_budget(self) -> bool:
        return any(self._webhooks.any_wants(f"budget.{p}") for p in BUDGET_PERCENTS)

    async def budget_used(self, use: BudgetUse) -> None:
        """Raise each budget event whose threshold ``use`` has reached, once per period."""
        scope = "account" if use.key_id is None else f"key:{use.key_id}"
        for percent in BUDGET_PERCENTS:
            if (use.spent_nano + use.held_nano) * 100 < use.cap_nano * percent:
                return
            event_type = f"budget.{percent}"
            event_id = f"{event_type}:{use.account}:{scope}:{use.spec}:{use.start_ms}"
            if event_id in self._budget_raised or not self._webhooks.any_wants(event_type):
                continue
            period, _, seconds = use.spec.partition(":")
            await self.raise_for(
                event_type,
                use.account,
                event_id,
                {
                    "percent": percent,
                    "scope": use.scope,
                    "key_id": use.key_id,
                    "budget_usd": format_usd(use.cap_nano),
                    "spent_usd": format_usd(use.spent_nano),
                    "held_usd": format_usd(use.held_nano),
                    "period": period,
                    "period_s": int(seconds) if seconds else None,
                    "period_start": iso(use.start_ms),
                    "resets_at": iso(use.end_ms),
                },
            )
            if len(self._budget_raised) >= MAX_BUDGET_RAISED:
                self._budget_raised.clear()
            self._budget_raised.add(event_id)

    # --- key.expiring, a periodic scan -----------------------------------------------------

    async def scan_keys(self) -> None:
        """One instance per interval reads every key and raises key.expiring where due."""
        if not self._webhooks.any_wants("key.expiring"):
            return
        interval_ms = int(self._delivery().key_scan_interval_s * 1000)
        if not await self._storage.call("SET", WEBHOOK_KEY_SCAN, 1, "NX", "PX", interval_ms):
            return
        now_ms = int(time.time() * 1000)
        cursor = None
        while True:
            page = await self._accounts.page_keys(limit=MAX_PAGE, cursor=cursor)
            for key in page.data:
                if key.revoked or key.expires_at is None:
                    continue
                expires_ms = parse_time_ms(key.expires_at)
                if expires_ms <= now_ms:
                    continue
                await self._key_expiring(key.account, key.id, expires_ms, now_ms)
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def _key_expiring(self, account: str, key_id: str, expires_ms: int, now_ms: int) -> None:
        lifetime_s = self._delivery().lifetime_s
        event_id = f"key.expiring:{account}:{key_id}:{expires_ms}"
        data = {"key_id": key_id, "expires_at": iso(expires_ms)}
        for webhook in self._webhooks.for_account(account):
            within_ms = (webhook.key_expiring_within_s or 0) * 1000
            if not webhook.wants("key.expiring", account) or expires_ms - now_ms > within_ms:
                continue
            if await self.outbox.raise_event(
                webhook.name, event_id, "key.expiring", account, data, lifetime_s
            ):
                labelled(self._metrics.webhook_events_raised, "key.expiring").inc()

    # --- upstream_key.unhealthy, a periodic scan -------------------------------------------

    async def scan_upstream(self, providers: Iterable[Provider]) -> None:
        if not self._webhooks.any_wants("upstream_key.unhealthy"):
            return
        for provider in providers:
            if not provider.keys:
                continue
            pool = pool_of(provider)
            configured = {key.name for key in provider.keys}
            unhealthy = sorted((await self._pools.unhealthy(pool)) & configured)
            for name, since_ms in (await self._pools.unhealthy_since(pool, unhealthy)).items():
                await self.raise_for(
                    "upstream_key.unhealthy",
                    None,
                    f"upstream_key.unhealthy:{provider.name}:{name}:{since_ms}",
                    {
                        "provider": provider.name,
                        "key": name,
                        "unhealthy_since": iso(since_ms) if since_ms else None,
                    },
                )
