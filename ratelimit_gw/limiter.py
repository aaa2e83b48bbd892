"""admit() / settle(): the limit and balance decisions, as typed values. Knows no HTTP.

Each call is one script run in storage (one round trip); the scripts in ``lua/`` hold the
whole algorithm so that every gateway process shares one truth and one clock (Redis TIME).
The values are frozen msgspec Structs: several are built per request, and a Struct is built
in C (~0.15 µs) where a frozen dataclass of Decision's size takes ~1.9 µs.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec

from .budgets import bounds, spend_name
from .keyspace import ORPHAN_SETTLEMENTS, AccountKeys
from .model_limits import STALE as MODEL_STALE
from .model_limits import matching
from .storage import Storage

# The outcome of a release for an admission whose caller will never settle it (it hung up
# while the admission ran, or storage failed after the call was sent): settle.lua then gives
# back whatever the admission placed, and keeps it from placing anything if it runs later.
ABANDONED = "abandoned"
# The orphan-settlements stream keeps about this many (~200 bytes each): an audit trail of a
# wiped account, not a second ledger.
ORPHANS_KEPT = 100_000
# The budget plans a limiter remembers (one per key with a budget, or whose account has one):
# past this many it forgets them all and learns again, one extra script run per key.
MAX_BUDGET_PLANS = 100_000
STALE = "budget_period_stale"


class BucketReport(msgspec.Struct, frozen=True):
    """The tightest bucket of one kind, as rate-limit headers describe it."""

    limit: int
    remaining: int
    reset_ms: int  # until the bucket is full again


class Decision(msgspec.Struct, frozen=True):
    allowed: bool
    reason: str  # "ok" or an error reason (docs/limits-and-balance.md)
    retry_after_ms: int
    hit_limit: int | None  # capacity of the bucket that rejected the request
    requests: BucketReport | None
    tokens: BucketReport | None
    concurrency_limit: int | None
    concurrency_in_use: int | None
    available_nano: int | None  # balance − live holds; None when the account is not prepaid
    holds_expired: int  # stale holds this call released
    account_rpm: int | None  # the account's rpm after its policy (docs/limits-and-balance.md)
    # Set for budget_exceeded: whose budget ("account" or "key"), its cap, what its period
    # has spent and holds, and when the period ends (Redis time, ms).
    budget_scope: str | None = None
    budget_cap_nano: int = 0
    budget_used_nano: int = 0
    budget_reset_ms: int = 0
    now_ms: int = 0  # the store's time of a budget_exceeded decision (0 otherwise)
    # Set when a per-model limit refused it (rpm/tpm_exceeded, request_exceeds_limit): whose
    # ("account" or "key") and its pattern.
    model_scope: str | None = None
    model_pattern: str | None = None


class StaleBudgetPeriod(Exception):
    """admit.lua refused the period bounds twice in a row (a budget changed between): rare."""


class _BudgetPlan(msgspec.Struct):
    """What admit.lua needs for one key's budgets: the shape it will check, and each budget's
    spend hash and bounds, valid until ``until_ms`` (store time)."""

    shape: str
    keys: list[str]
    args: list[Any]
    until_ms: int


class AdmissionRequest(msgspec.Struct, frozen=True):
    account_id: str
    key_id: str
    request_id: str
    estimated_tokens: int
    hold_nano: int
    ttl_ms: int
    model: str = ""  # the model asked for: what per-model limits match

    def abandoned(self, model: str, client_request_id: str) -> Settlement:
        """The release of this admission, for when its caller gives up on it."""
        return Settlement(
            account_id=self.account_id,
            key_id=self.key_id,
            request_id=self.request_id,
            estimated_tokens=self.estimated_tokens,
            input_tokens=0,
            output_tokens=0,
            cost_nano=0,
            model=model,
            outcome=ABANDONED,
            client_request_id=client_request_id,
        )


class Settlement(msgspec.Struct, frozen=True):
    account_id: str
    key_id: str
    request_id: str
    estimated_tokens: int
    input_tokens: int
    output_tokens: int
    cost_nano: int
    model: str
    outcome: str  # "ok", "upstream_error", "client_disconnect", ..., ABANDONED
    client_request_id: str = ""  # the x-request-id the caller saw; the ledger shows it
    cache_read_tokens: int = 0  # input tokens the provider served from its prompt cache
    cache_write_tokens: int = 0  # input tokens the provider wrote to its prompt cache


class SettleResult(msgspec.Struct, frozen=True):
    settled: bool  # False: this request id was settled before, or no such account
    overrun: bool  # the balance went below zero
    balance_nano: int
    released_nano: int
    account_missing: bool = False  # wiped or evicted: nothing was written (an orphan)


def _bucket(limit: int, remaining: int, reset_ms: int) -> BucketReport | None:
    if limit < 0:
        return None
    return BucketReport(limit, remaining, reset_ms if reset_ms > 0 else 0)


def _decision(reply: list[Any]) -> Decision:
    # Every field but reason (1) and available (12, "" when not prepaid) is an integer
    # reply; -1 stands for "no such limit".
    hit, conc_limit, conc_in_use, rpm = reply[3], reply[10], reply[11], reply[14]
    return Decision(
        allowed=reply[0] == 1,
        reason=reply[1],
        retry_after_ms=reply[2],
        hit_limit=None if hit < 0 else hit,
        requests=_bucket(reply[4], reply[5], reply[6]),
        tokens=_bucket(reply[7], reply[8], reply[9]),
        concurrency_limit=None if conc_limit < 0 else conc_limit,
        concurrency_in_use=None if conc_in_use < 0 else conc_in_use,
        available_nano=int(reply[12]) if reply[12] != "" else None,
        holds_expired=reply[13],
        account_rpm=None if rpm < 0 else rpm,
        budget_scope=reply[17] or None,
        budget_cap_nano=int(reply[18] or 0),
        budget_used_nano=int(reply[19] or 0),
        budget_reset_ms=reply[20],
        now_ms=reply[16] if reply[1] == "budget_exceeded" else 0,
        model_scope=reply[22] or None,
        model_pattern=reply[23] or None,
    )


def _plan(
    account_id: str, key_id: str, shape: str, default_timezone: str, now_ms: int
) -> _BudgetPlan:
    """Spend hashes and bounds of the budgets ``shape`` names, for the store time ``now_ms``."""
    timezone, account_period, key_period = shape.split("|")
    timezone = timezone or default_timezone
    names = AccountKeys(account_id)
    keys: list[str] = []
    args: list[Any] = [shape, 0, 0, 0, 0]
    until = 2**62
    for i, period in ((1, account_period), (3, key_period)):
        if not period:
            continue
        start, end = bounds(period, timezone, now_ms)
        name = spend_name(period, start)
        keys.append(names.account_spend(name) if i == 1 else names.key_spend(key_id, name))
        args[i], args[i + 1] = start, end
        until = min(until, end)
    return _BudgetPlan(shape=shape, keys=keys, args=args, until_ms=until)


class Limiter:
    def __init__(self, storage: Storage, default_timezone: str = "UTC") -> None:
        self._storage = storage
        # Budgets (budgets.py): the time zone of an account that names none, and per
        # (account, key) with a budget what admit.lua needs for it. A key without one has
        # no plan: its admission passes nothing more.
        self.default_timezone = default_timezone
        self._plans: dict[tuple[str, str], _BudgetPlan] = {}
        self._skew_ms = 0  # the store's clock less ours, as the last stale refusal showed
        # Per-model limits (model_limits.py): per (account, key) that has any, the shape
        # admit.lua checks. Without one, its admission passes nothing more.
        self._model_shapes: dict[tuple[str, str], str] = {}

    async def admit(self, request: AdmissionRequest) -> Decision:
        # Key names are built per call (~1 µs). A per-key cache of them once held ~2 KB per
        # key (220 MB of a worker with 100k keys) and gave the GC 130k objects to walk.
        keys = AccountKeys(request.account_id).admit_keys(request.key_id)
        args: list[Any] = [
            "admit",
            request.request_id,
            request.key_id,
            request.estimated_tokens,
            request.hold_nano,
            request.ttl_ms,
        ]
        scope = (request.account_id, request.key_id)
        plan = self._plans.get(scope)
        if plan is not None and int(time.time() * 1000) + self._skew_ms >= plan.until_ms:
            now_ms = int(time.time() * 1000) + self._skew_ms
            plan = self._learn(scope, plan.shape, now_ms)
        model_shape = self._model_shapes.get(scope)
        reply = await self._storage.run("admit", *_call(request, keys, args, plan, model_shape))
        if reply[1] == STALE or reply[1] == MODEL_STALE:  # learn both from the reply, once
            if reply[15]:  # the script's own TIME decides: recompute for it
                self._skew_ms = reply[16] - int(time.time() * 1000)
                plan = self._learn(scope, reply[15], reply[16])
            else:
                plan = None
                self._plans.pop(scope, None)
            model_shape = self._learn_models(scope, reply[21])
            reply = await self._storage.run("admit", *_call(request, keys, args, plan, model_shape))
            if reply[1] == STALE or reply[1] == MODEL_STALE:  # changed in between: rare
                raise StaleBudgetPeriod(
                    f"admit.lua refused the budget periods or model limits of {scope}"
                )
        if plan is not None and not reply[15]:  # its budgets were cleared
            self._plans.pop(scope, None)
        return _decision(reply)

    def _learn_models(self, scope: tuple[str, str], model_shape: str) -> str | None:
        if not model_shape:
            self._model_shapes.pop(scope, None)
            return None
        if len(self._model_shapes) >= MAX_BUDGET_PLANS:
            self._model_shapes.clear()
        self._model_shapes[scope] = model_shape
        return model_shape

    def _learn(self, scope: tuple[str, str], shape: str, now_ms: int) -> _BudgetPlan:
        if len(self._plans) >= MAX_BUDGET_PLANS:
            self._plans.clear()
        plan = _plan(scope[0], scope[1], shape, self.default_timezone, now_ms)
        self._plans[scope] = plan
        return plan

    async def peek(self, account_id: str, key_id: str) -> Decision:
        """The current state of the caller's buckets, consuming and writing nothing."""
        keys = AccountKeys(account_id).admit_keys(key_id)
        return _decision(await self._storage.run("admit", keys, ["peek", "", key_id, 0, 0, 0]))

    async def settle(self, s: Settlement) -> SettleResult:
        return settle_result(await self._storage.run("settle", *_settle_call(s)))

    def start_settle(self, s: Settlement) -> asyncio.Future[Any]:
        """settle.lua started now; the future holds its raw reply (:func:`settle_result`)."""
        return self._storage.run_soon("settle", *_settle_call(s))

    def budget_spends(self, account_id: str, key_id: str) -> list[tuple[str, str, int, int]]:
        """(scope, period spec, start ms, end ms) of each budget this process last admitted
        ``key_id`` under (``scope``: "account" or "key"), from memory: none for a key
        without a budget, so budget_watch.py reads nothing more for it."""
        plan = self._plans.get((account_id, key_id))
        if plan is None:
            return []
        _, account_period, key_period = plan.shape.split("|")
        spends = []
        if account_period:
            spends.append(("account", account_period, int(plan.args[1]), int(plan.args[2])))
        if key_period:
            spends.append(("key", key_period, int(plan.args[3]), int(plan.args[4])))
        return spends

    async def keep_orphan(self, s: Settlement) -> None:
        """Keep a settlement that found no account, every field, in the orphan stream."""
        fields = [part for item in msgspec.structs.asdict(s).items() for part in item]
        await self._storage.call(
            "XADD", ORPHAN_SETTLEMENTS, "MAXLEN", "~", ORPHANS_KEPT, "*", *fields
        )


def _call(
    request: AdmissionRequest,
    keys: list[str],
    args: list[Any],
    plan: _BudgetPlan | None,
    model_shape: str | None,
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of admit.lua: the plain ones, then a budget plan's, then the per-model
    buckets of every pattern of ``model_shape`` that matches the request's model."""
    if plan is not None:
        keys, args = keys + plan.keys, args + plan.args
    if model_shape is None:
        return keys, args
    if plan is None:
        args = [*args, "", 0, 0, 0, 0]
    args = [*args, model_shape, len(keys) + 1]
    keys = list(keys)
    names = AccountKeys(request.account_id)
    for scope, pattern, rpm, tpm in matching(model_shape, request.model):
        keys.append(names.model_bucket(scope, request.key_id, pattern))
        args += [scope, pattern, "" if rpm is None else rpm, "" if tpm is None else tpm]
    return keys, args


def _settle_call(s: Settlement) -> tuple[list[str], list[Any]]:
    args = [
        s.request_id,
        s.key_id,
        s.estimated_tokens,
        s.input_tokens + s.output_tokens,
        s.cost_nano,
        s.model,
        s.input_tokens,
        s.output_tokens,
        s.outcome,
        s.client_request_id,
        s.cache_read_tokens,
        s.cache_write_tokens,
    ]
    return AccountKeys(s.account_id).settle_keys(s.key_id), args


def settle_result(reply: list[Any]) -> SettleResult:
    return SettleResult(
        settled=int(reply[0]) == 1,
        overrun=int(reply[1]) == 1,
        balance_nano=int(reply[2]),
        released_nano=int(reply[3]),
        account_missing=int(reply[0]) < 0,
    )
