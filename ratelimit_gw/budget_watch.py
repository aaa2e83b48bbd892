"""Budget utilisation after settlement (SPEC §15, docs/limits-and-balance.md "Watching a
budget"): the ``rlgw_budget_spent_ratio`` gauge and the ``budget.80`` / ``budget.100``
webhook events, both off the request path.

A settlement of a key that has no budget (nor its account) costs nothing here: whether it
has one is known in memory (the limiter's budget plan of its admission). A settlement of a
budgeted key, when the gauge is on (``[metrics] account_label``) or a webhook wants a budget
event, costs one pipelined read of its budgets' caps and spend hashes, in a task of its own
(bounded: past ``MAX_WATCHING`` in flight a reading is skipped; the next settlement reads
again). Reading after settling rather than scanning: the numbers change only when a
settlement (or an admission) moves them, and a scan would read every budget whether it
moved or not.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from .budgets import BudgetUse, spend_name
from .keyspace import AccountKeys
from .limiter import Limiter, Settlement
from .metrics import Metrics, labelled
from .storage import Storage, StorageError

if TYPE_CHECKING:
    from .webhook_events import WebhookEvents

log = logging.getLogger("ratelimit_gw.budgets")

MAX_WATCHING = 1000  # readings in flight per process


class BudgetWatch:
    def __init__(
        self,
        storage: Storage,
        limiter: Limiter,
        metrics: Metrics,
        events: WebhookEvents | None = None,
    ) -> None:
        self._storage = storage
        self._limiter = limiter
        self._gauge = metrics.budget_spent_ratio
        self._events = events
        self._watching: set[asyncio.Task[None]] = set()

    def settled(self, s: Settlement) -> None:
        """Called with every applied settlement (settler.py), in its callback."""
        spends = self._limiter.budget_spends(s.account_id, s.key_id)
        if not spends:
            return
        if self._gauge is None and (self._events is None or not self._events.wants_budget()):
            return
        if len(self._watching) >= MAX_WATCHING:
            return  # the next settlement of the budget reads it again
        task = asyncio.get_running_loop().create_task(self._read(s, spends))
        self._watching.add(task)
        task.add_done_callback(self._watching.discard)

    async def _read(self, s: Settlement, spends: list[tuple[str, str, int, int]]) -> None:
        try:
            for use in await self.uses(s.account_id, s.key_id, spends):
                if self._gauge is not None:
                    labelled(self._gauge, use.scope, use.account, use.key_id or "-").set(use.ratio)
                if self._events is not None:
                    await self._events.budget_used(use)
        except StorageError as exc:  # the next settlement reads again
            log.warning("reading the budgets of %s failed: %s", s.account_id, exc)
        except Exception:  # a task nobody awaits: say what was lost
            log.exception("watching the budgets of %s failed", s.account_id)

    async def uses(
        self, account_id: str, key_id: str, spends: list[tuple[str, str, int, int]]
    ) -> list[BudgetUse]:
        """Each budget's cap and its period's spend: one round trip (one hash slot)."""
        keys = AccountKeys(account_id)
        commands: list[tuple[Any, ...]] = []
        for scope, spec, start, _ in spends:
            name = spend_name(spec, start)
            if scope == "account":
                commands.append(("HGET", keys.account, "budget_nano"))
                commands.append(("HMGET", keys.account_spend(name), "spent_nano", "held_nano"))
            else:
                commands.append(("HGET", keys.key(key_id), "budget_nano"))
                commands.append(("HMGET", keys.key_spend(key_id, name), "spent_nano", "held_nano"))
        replies = await self._storage.call_many(commands)
        uses = []
        for (scope, spec, start, end), cap, (spent, held) in zip(
            spends, replies[::2], replies[1::2], strict=True
        ):
            if not cap or int(cap) <= 0:
                continue  # cleared since
            uses.append(
                BudgetUse(
                    account=account_id,
                    scope=scope,
                    key_id=key_id if scope == "key" else None,
                    spec=spec,
                    start_ms=start,
                    end_ms=end,
                    cap_nano=int(cap),
                    spent_nano=int(spent or 0),
                    held_nano=max(int(held or 0), 0),
                )
            )
        return uses

    async def drain(self, timeout_s: float = 5.0) -> None:
        if self._watching:
            await asyncio.wait(set(self._watching), timeout=timeout_s)
