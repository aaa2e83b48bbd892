"""Property-based, stateful tests of admit.lua / settle.lua / topup.lua against a small model.

Hypothesis drives one prepaid account with two keys, each scope with random rpm / tpm /
concurrency limits (or none), through random sequences of admissions, settlements (honest
or, rarely, an upstream that ignored the output cap), repeated settlements, releases of
abandoned admissions (after the admission ran, or before it: then the admission is refused),
settlements and top-ups for an account that does not exist, top-ups (some reusing an
idempotency key, with the same amount or another), peeks, revocations, holds that outlive
their TTL, and time passing. Time is Redis's (``TIME``); "time passing" rewinds every
bucket's ``ts``, as test_limiter.py does, and the model brackets each script's clock between
a ``TIME`` read just before and just after it, so the few milliseconds that really pass are
accounted for.

The model predicts each admission's verdict and reason wherever the bracket makes it certain,
and after every step these invariants must hold:

- a bucket never holds more than its capacity;
- the balance never goes below zero unless an overrun was injected;
- Σ top-ups − Σ ledger charges = balance, and every ledger entry's cost is in ``spent``;
- ``held_nano`` = Σ live holds (the model's and the holds hash's);
- with an account budget (a week, in UTC): its spend hash holds Σ live holds and spends
  Σ costs settled against live holds + Σ holds swept, never more than the cap but through
  an injected overrun;
- concurrency leases = the model's live requests per scope (the account's: its in-flight set);
- a rejected admission, a peek and a repeated settlement change nothing at all;
- a release that finds no admission writes only its tombstone, and the admission it was
  for, arriving later, writes nothing;
- a settlement or top-up for a missing account writes nothing, and a conflicting top-up
  credits nothing.

Runs on ``memory://`` and on a real redis-server (the ``storage_url`` fixture).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ratelimit_gw.accounts import AccountStore
from ratelimit_gw.keyspace import AccountKeys
from ratelimit_gw.limiter import ABANDONED, AdmissionRequest, Decision, Limiter, Settlement
from ratelimit_gw.limits import Limits
from ratelimit_gw.management import AccountError
from ratelimit_gw.money import parse_usd
from ratelimit_gw.settings import StorageSettings
from ratelimit_gw.storage import Storage, open_storage

pytestmark = pytest.mark.slow  # long Hypothesis state-machine runs on both backends

T = TypeVar("T")
ACCOUNT = "acct"
KEYS = ("k1", "k2")  # model names; the real key ids are generated
TTL_MS = 600_000  # holds and leases never expire by themselves during an example
EPS = 1e-6

limits_rpm = st.none() | st.integers(1, 8)
limits_tpm = st.none() | st.integers(20, 400)
limits_conc = st.none() | st.integers(1, 3)


@dataclass
class Live:
    """An admitted request whose settlement has not happened yet."""

    key: str
    hold: int
    estimate: int
    expired: bool = False  # its hold was swept by admit.lua (TTL passed)


@dataclass
class Bucket:
    hash: str  # the scope's hash (account or key) holding <kind>_level and <kind>_ts
    kind: str
    capacity: int

    @property
    def name(self) -> str:
        return f"{self.hash}#{self.kind}"


@dataclass
class Model:
    balance: int = 0
    topped_up: int = 0
    spent: int = 0
    charges: int = 0  # Σ cost_nano in the ledger
    overrun_injected: bool = False
    idempotency: dict[str, int] = field(default_factory=dict)  # a caller's key -> its amount
    live: dict[str, Live] = field(default_factory=dict)
    settled: set[str] = field(default_factory=set)
    revoked: set[str] = field(default_factory=set)
    disabled: bool = False  # the account (account_status.lua)
    adjustments: dict[str, int] = field(default_factory=dict)  # idempotency key -> amount
    pending_sweep: set[str] = field(default_factory=set)  # holds whose TTL we made pass
    stale_leases: set[tuple[str, str]] = field(default_factory=set)  # (key scope, rid), ditto
    holds_expired: int = 0
    budget: int | None = None  # the account's weekly budget, nano-USD
    budget_spent: int = 0  # what its period's spend hash must say was spent

    @property
    def held(self) -> int:
        return sum(
            r.hold
            for rid, r in self.live.items()
            if not r.expired and rid not in self.pending_sweep
        )


def bucket_level_at(state: list[str | None], capacity: int, now_ms: int) -> float:
    """What admit.lua computes: full when absent, else the stored level plus the refill."""
    level, ts = state
    if level is None or ts is None:
        return float(capacity)
    elapsed = max(now_ms - int(ts), 0)
    return min(float(capacity), float(level) + elapsed * capacity / 60000)


class LuaMachine(RuleBasedStateMachine):
    url = "memory://"

    requests = Bundle("requests")
    settled_requests = Bundle("settled_requests")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.storage: Storage = open_storage(StorageSettings(url=self.url))
        self.run(self.storage.call("FLUSHALL"))
        self.accounts = AccountStore(self.storage)
        self.limiter = Limiter(self.storage)
        self.keys = AccountKeys(ACCOUNT)
        self.model = Model()
        self.key_ids: dict[str, str] = {}
        self.limits: dict[str, dict[str, int | None]] = {}
        self.counter = 0

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        self.run(self.storage.close())
        self.loop.close()

    # ------------------------------------------------------------ helpers

    def scope_of(self, key: str) -> str:
        return f"key:{self.key_ids[key]}"

    def buckets_for(self, key: str) -> list[tuple[Bucket, str]]:
        """(bucket, kind) pairs that apply to a request on ``key``."""
        out: list[tuple[Bucket, str]] = []
        for scope_hash, limits in (
            (self.keys.account, self.limits["account"]),
            (self.keys.key(self.key_ids[key]), self.limits[key]),
        ):
            for kind in ("rpm", "tpm"):
                capacity = limits[kind]
                if capacity is not None:
                    out.append((Bucket(scope_hash, kind, capacity), kind))
        return out

    def all_buckets(self) -> list[Bucket]:
        seen: dict[str, Bucket] = {}
        for key in KEYS:
            for bucket, _ in self.buckets_for(key):
                seen[bucket.name] = bucket
        return list(seen.values())

    async def redis_ms(self) -> int:
        seconds, micros = await self.storage.call("TIME")
        return int(seconds) * 1000 + int(micros) // 1000

    async def bucket_state(self, bucket: Bucket) -> list[str | None]:
        state: list[str | None] = await self.storage.call(
            "HMGET", bucket.hash, f"{bucket.kind}_level", f"{bucket.kind}_ts"
        )
        return state

    async def snapshot(self) -> dict[str, Any]:
        """Every key's full value (TTLs aside: they tick down by themselves)."""
        values: dict[str, Any] = {}
        for key in sorted(await self.storage.call("KEYS", "*")):
            kind = await self.storage.call("TYPE", key)
            if kind == "hash":
                value: Any = await self.storage.call("HGETALL", key)
            elif kind == "zset":
                value = await self.storage.call("ZRANGE", key, 0, -1, "WITHSCORES")
            elif kind == "stream":
                value = await self.storage.call("XRANGE", key, "-", "+")
            elif kind == "set":
                value = sorted(await self.storage.call("SMEMBERS", key))
            else:
                value = await self.storage.call("GET", key)
            values[key] = (kind, value)
        return values

    def limited_scopes(self, key: str) -> set[str]:
        """The lease scopes admit.lua checks for a request on ``key``."""
        scopes = set()
        if self.limits["account"]["concurrency"] is not None:
            scopes.add("account")
        if self.limits[key]["concurrency"] is not None:
            scopes.add(self.scope_of(key))
        return scopes

    def live_in_scope(self, scope_key: str | None) -> int:
        return sum(
            1
            for r in self.model.live.values()
            if not r.expired and (scope_key is None or r.key == scope_key)
        )

    # ------------------------------------------------------------ set-up

    @initialize(
        account=st.fixed_dictionaries(
            {"rpm": limits_rpm, "tpm": limits_tpm, "concurrency": limits_conc}
        ),
        k1=st.fixed_dictionaries(
            {"rpm": limits_rpm, "tpm": limits_tpm, "concurrency": limits_conc}
        ),
        k2=st.fixed_dictionaries(
            {"rpm": limits_rpm, "tpm": limits_tpm, "concurrency": limits_conc}
        ),
        balance=st.integers(0, 3000),
        budget=st.none() | st.integers(1, 3000),
    )
    def create(
        self,
        account: dict[str, int | None],
        k1: dict[str, int | None],
        k2: dict[str, int | None],
        balance: int,
        budget: int | None,
    ) -> None:
        self.limits = {"account": account, "k1": k1, "k2": k2}
        self.run(
            self.accounts.create_account(ACCOUNT, balance_nano=balance, limits=Limits(**account))
        )
        for name, limits in (("k1", k1), ("k2", k2)):
            created = self.run(self.accounts.create_key(ACCOUNT, limits=Limits(**limits)))
            self.key_ids[name] = created.record.id
        self.model.balance = self.model.topped_up = balance
        if budget is not None:
            change = {"budget_usd": f"{budget / 1e9:.9f}", "budget_period": "week"}
            self.run(self.accounts.update_account(ACCOUNT, change))
            self.model.budget = budget

    # ------------------------------------------------------------ admission

    def predict(
        self, key: str, estimate: int, hold: int, levels: dict[str, tuple[float, float]]
    ) -> tuple[set[str], bool]:
        """The reasons the script may give (a set: the clock bracket can leave a bucket
        undecided) and whether the verdict is certain."""
        if key in self.model.revoked:
            return {"key_revoked"}, True
        if self.model.disabled:
            return {"account_disabled"}, True
        certain = True
        too_big = False
        sure_fail: set[str] = set()
        maybe_fail: set[str] = set()
        for bucket, kind in self.buckets_for(key):
            cost = 1 if kind == "rpm" else estimate
            low, high = levels[bucket.name]
            if cost > bucket.capacity:
                too_big = True
            elif cost > high + EPS:
                sure_fail.add(f"{kind}_exceeded")
            elif cost > low - EPS:
                maybe_fail.add(f"{kind}_exceeded")
                certain = False
        if too_big:
            return {"request_exceeds_limit"}, True
        available = self.model.balance - self.model.held
        if hold > available:
            return {"balance_exceeded"}, True
        budget = self.model.budget
        if budget is not None and self.model.budget_spent + self.model.held + hold > budget:
            return {"budget_exceeded"}, True
        if sure_fail:
            return sure_fail | maybe_fail, True
        concurrency_full = any(
            limit is not None and self.live_in_scope(scope_key) >= limit
            for scope_key, limit in (
                (None, self.limits["account"]["concurrency"]),
                (key, self.limits[key]["concurrency"]),
            )
        )
        last = "concurrency_exceeded" if concurrency_full else "ok"
        return maybe_fail | {last}, certain

    @rule(
        target=requests,
        key=st.sampled_from(KEYS),
        estimate=st.integers(0, 160),
        hold=st.integers(0, 700),
    )
    def admit(self, key: str, estimate: int, hold: int) -> Any:
        self.counter += 1
        rid = f"req-{self.counter}"
        buckets = self.buckets_for(key)
        before_state = {b.name: self.run(self.bucket_state(b)) for b, _ in buckets}
        # Any admission on a valid key of an active account sweeps the holds whose TTL
        # passed, allowed or not.
        refused_outright = key in self.model.revoked or self.model.disabled
        sweep = set() if refused_outright else set(self.model.pending_sweep)
        before = self.run(self.snapshot())
        t0 = self.run(self.redis_ms())
        decision: Decision = self.run(
            self.limiter.admit(
                AdmissionRequest(ACCOUNT, self.key_ids[key], rid, estimate, hold, TTL_MS)
            )
        )
        t1 = self.run(self.redis_ms())
        for swept in sweep:
            self.model.live[swept].expired = True
            self.model.holds_expired += 1
            if self.model.budget is not None:  # its budget counts the hold as spent
                self.model.budget_spent += self.model.live[swept].hold
        self.model.pending_sweep -= sweep
        # ...and prunes the expired leases of the scopes it checks (those with a limit).
        pruned = {
            (scope, r)
            for scope, r in self.model.stale_leases
            if not refused_outright and scope in self.limited_scopes(key)
        }
        self.model.stale_leases -= pruned
        assert decision.holds_expired == len(sweep)

        levels = {
            b.name: (
                bucket_level_at(before_state[b.name], b.capacity, t0),
                bucket_level_at(before_state[b.name], b.capacity, t1),
            )
            for b, _ in buckets
        }
        reasons, _certain = self.predict(key, estimate, hold, levels)
        assert decision.reason in reasons, (decision.reason, reasons, levels)
        if not decision.allowed:
            if not sweep and not pruned:
                assert self.run(self.snapshot()) == before, "a rejected admission wrote"
            else:  # the sweep wrote, but no bucket changed
                for bucket, _ in buckets:
                    assert self.run(self.bucket_state(bucket)) == before_state[bucket.name]
            return multiple()

        # Allowed: each bucket lost exactly its cost at the script's time, within the bracket.
        for bucket, kind in buckets:
            cost = 1 if kind == "rpm" else estimate
            level, ts = self.run(self.bucket_state(bucket))
            assert level is not None and ts is not None
            assert t0 <= int(ts) <= t1
            low, high = levels[bucket.name]
            assert low - cost - EPS <= float(level) <= high - cost + EPS
        self.model.live[rid] = Live(key, hold, estimate)
        assert decision.available_nano == self.model.balance - self.model.held
        return rid

    # ------------------------------------------------------------ settlement

    @rule(
        target=settled_requests,
        rid=consumes(requests),
        actual=st.integers(0, 200),
        share=st.floats(0, 1),
        overrun=st.integers(0, 20),
    )
    def settle(self, rid: str, actual: int, share: float, overrun: int) -> str:
        live = self.model.live[rid]
        self.model.pending_sweep.discard(rid)  # settled before any admission swept it
        self.model.stale_leases = {(sc, r) for sc, r in self.model.stale_leases if r != rid}
        # An honest upstream costs at most the hold; overrun = 0 (1 in 21) ignores the cap.
        cost = live.hold + 1 + actual * 7 if overrun == 0 else math.floor(live.hold * share)
        buckets = [(b, k) for b, k in self.buckets_for(live.key) if k == "tpm"]
        before_state = {b.name: self.run(self.bucket_state(b)) for b, _ in buckets}
        t0 = self.run(self.redis_ms())
        result = self.run(
            self.limiter.settle(
                Settlement(
                    ACCOUNT, self.key_ids[live.key], rid, live.estimate, actual, 0, cost, "m", "ok"
                )
            )
        )
        t1 = self.run(self.redis_ms())
        assert result.settled
        assert result.released_nano == (0 if live.expired else live.hold)
        del self.model.live[rid]
        self.model.settled.add(rid)
        if self.model.budget is not None and not live.expired:
            self.model.budget_spent += cost
        self.model.balance -= cost
        self.model.spent += cost
        self.model.charges += cost
        if cost > live.hold or (live.expired and cost > 0):
            # An upstream that ignored the cap, or a hold that expired first: only these two
            # may take the balance below zero (§5).
            self.model.overrun_injected = True
        assert result.balance_nano == self.model.balance
        assert result.overrun == (self.model.balance < 0)
        # tpm buckets were corrected from the estimate to the actual usage (capped at full).
        delta = live.estimate - actual
        for bucket, _ in buckets:
            level, ts = self.run(self.bucket_state(bucket))
            if delta == 0:
                assert [level, ts] == before_state[bucket.name]
                continue
            assert level is not None and ts is not None and t0 <= int(ts) <= t1
            low = min(
                bucket.capacity,
                bucket_level_at(before_state[bucket.name], bucket.capacity, t0) + delta,
            )
            high = min(
                bucket.capacity,
                bucket_level_at(before_state[bucket.name], bucket.capacity, t1) + delta,
            )
            assert low - EPS <= float(level) <= high + EPS
        return rid

    @rule(rid=settled_requests)
    def settle_again(self, rid: str) -> None:
        before = self.run(self.snapshot())
        result = self.run(
            self.limiter.settle(
                Settlement(ACCOUNT, self.key_ids["k1"], rid, 10, 99, 0, 12345, "m", "ok")
            )
        )
        assert not result.settled and not result.overrun
        assert result.balance_nano == self.model.balance
        assert self.run(self.snapshot()) == before, "a repeated settlement wrote"

    @rule(target=settled_requests, rid=consumes(requests))
    def abandon(self, rid: str) -> str:
        """Its caller gave up after the admission ran: everything it placed comes back."""
        live = self.model.live[rid]
        self.model.pending_sweep.discard(rid)
        buckets = [(b, k) for b, k in self.buckets_for(live.key) if k == "tpm"]
        before_state = {b.name: self.run(self.bucket_state(b)) for b, _ in buckets}
        before = self.run(self.snapshot())
        t0 = self.run(self.redis_ms())
        result = self.run(self.limiter.settle(self.release(live.key, rid, live.estimate)))
        t1 = self.run(self.redis_ms())
        del self.model.live[rid]
        assert result.settled and not result.overrun
        assert result.balance_nano == self.model.balance
        if live.expired:
            # Its hold was swept already: only the tombstone is written (a lingering lease
            # is left to expire, as after any sweep).
            assert result.released_nano == 0
            self.assert_only_tombstone_written(before, rid)
            return rid
        assert result.released_nano == live.hold
        self.model.stale_leases = {(sc, r) for sc, r in self.model.stale_leases if r != rid}
        self.model.settled.add(rid)  # a `release` ledger entry
        for bucket, _ in buckets:  # the whole estimate refunded (capped at full)
            level, ts = self.run(self.bucket_state(bucket))
            if live.estimate == 0:
                assert [level, ts] == before_state[bucket.name]
                continue
            assert level is not None and ts is not None and t0 <= int(ts) <= t1
            state = before_state[bucket.name]
            low = min(bucket.capacity, bucket_level_at(state, bucket.capacity, t0) + live.estimate)
            high = min(bucket.capacity, bucket_level_at(state, bucket.capacity, t1) + live.estimate)
            assert low - EPS <= float(level) <= high + EPS
        entry = self.run(self.accounts.ledger(ACCOUNT, limit=1))[0]
        assert (entry.type, entry.settlement_id, entry.outcome) == ("release", rid, ABANDONED)
        return rid

    @rule(key=st.sampled_from(KEYS), estimate=st.integers(0, 160), hold=st.integers(0, 700))
    def abandon_before_the_admission_runs(self, key: str, estimate: int, hold: int) -> None:
        """The release reaches Redis first: it leaves a tombstone, and the admission, when it
        runs, is refused and writes nothing at all (not even the expired-hold sweep)."""
        self.counter += 1
        rid = f"req-{self.counter}"
        before = self.run(self.snapshot())
        result = self.run(self.limiter.settle(self.release(key, rid, estimate)))
        assert result.settled and result.released_nano == 0
        self.assert_only_tombstone_written(before, rid)
        tombstoned = self.run(self.snapshot())
        decision = self.run(
            self.limiter.admit(
                AdmissionRequest(ACCOUNT, self.key_ids[key], rid, estimate, hold, TTL_MS)
            )
        )
        assert (decision.allowed, decision.reason) == (False, "abandoned")
        assert self.run(self.snapshot()) == tombstoned, "an abandoned admission wrote"

    def release(self, key: str, rid: str, estimate: int) -> Settlement:
        admission = AdmissionRequest(ACCOUNT, self.key_ids[key], rid, estimate, 0, TTL_MS)
        return admission.abandoned("m", "")

    def assert_only_tombstone_written(self, before: dict[str, Any], rid: str) -> None:
        after = self.run(self.snapshot())
        after.pop(self.keys.settled)
        before.pop(self.keys.settled, None)
        assert after == before, "a release without an admission wrote more than its tombstone"
        assert self.run(self.storage.call("ZSCORE", self.keys.settled, rid)) is not None

    @rule(rid=requests)
    def hold_outlives_its_ttl(self, rid: str) -> None:
        """Make the request's TTL pass: the next admission must sweep its hold and leases."""
        live = self.model.live.get(rid)
        if live is None or live.expired or rid in self.model.pending_sweep:
            return
        # The in-flight set is also the account's leases: the sweep removes the rid from it.
        self.run(self.storage.call("ZADD", self.keys.inflight, 1, rid))
        scope, leases = self.scope_of(live.key), self.keys.key_leases(self.key_ids[live.key])
        if self.run(self.storage.call("ZSCORE", leases, rid)) is not None:
            self.run(self.storage.call("ZADD", leases, 1, rid))
            self.model.stale_leases.add((scope, rid))
        self.model.pending_sweep.add(rid)

    # ------------------------------------------------------------ the rest

    @rule(amount=st.integers(1, 2000), reuse=st.booleans(), same_amount=st.booleans())
    def topup(self, amount: int, reuse: bool, same_amount: bool) -> None:
        if reuse and self.model.idempotency:
            idempotency = sorted(self.model.idempotency)[0]
            if same_amount:
                amount = self.model.idempotency[idempotency]
        else:
            idempotency = f"topup-{len(self.model.idempotency)}"
        first = self.model.idempotency.get(idempotency)
        if first is not None and first != amount:
            before = self.run(self.snapshot())
            with pytest.raises(AccountError) as conflict:
                self.run(self.accounts.topup(ACCOUNT, amount, idempotency))
            assert (conflict.value.status, conflict.value.reason) == (409, "idempotency_conflict")
            assert self.run(self.snapshot()) == before, "a conflicting top-up wrote"
            return
        credited = self.run(self.accounts.topup(ACCOUNT, amount, idempotency))
        assert credited == (first is None)
        if credited:
            self.model.idempotency[idempotency] = amount
            self.model.balance += amount
            self.model.topped_up += amount

    @rule(amount=st.integers(-2000, 2000).filter(bool), reuse=st.booleans())
    def adjust(self, amount: int, reuse: bool) -> None:
        """A manual credit or debit: once per idempotency key; a debit below the live holds
        (those not swept yet count) is refused and writes nothing."""
        if reuse and self.model.adjustments:
            idempotency = sorted(self.model.adjustments)[0]
            amount = self.model.adjustments[idempotency]
        else:
            idempotency = f"adjust-{len(self.model.adjustments)}"
        stored_held = sum(r.hold for r in self.model.live.values() if not r.expired)
        fresh = idempotency not in self.model.adjustments
        if fresh and amount < 0 and self.model.balance + amount < stored_held:
            before = self.run(self.snapshot())
            with pytest.raises(AccountError) as refused:
                self.run(self.accounts.adjust(ACCOUNT, amount, "property", idempotency))
            assert (refused.value.status, refused.value.reason) == (409, "debit_exceeds_available")
            assert self.run(self.snapshot()) == before, "a refused debit wrote"
            return
        adjusted = self.run(self.accounts.adjust(ACCOUNT, amount, "property", idempotency))
        assert adjusted == fresh
        if adjusted:
            self.model.adjustments[idempotency] = amount
            self.model.balance += amount  # not topped up: the rpm policies ignore it

    @rule()
    def toggle_disabled(self) -> None:
        changed = self.run(self.accounts.set_disabled(ACCOUNT, not self.model.disabled))
        assert changed
        self.model.disabled = not self.model.disabled

    @rule(amount=st.integers(1, 2000))
    def money_for_a_missing_account_writes_nothing(self, amount: int) -> None:
        before = self.run(self.snapshot())
        result = self.run(
            self.limiter.settle(
                Settlement("ghost", self.key_ids["k1"], "req-ghost", 10, 5, 5, amount, "m", "ok")
            )
        )
        assert result.account_missing and not result.settled
        with pytest.raises(AccountError) as missing:
            self.run(self.accounts.topup("ghost", amount, "topup-ghost"))
        assert missing.value.status == 404
        assert self.run(self.snapshot()) == before, "money for a missing account wrote"

    @rule(key=st.sampled_from(KEYS))
    def peek(self, key: str) -> None:
        before = self.run(self.snapshot())
        decision = self.run(self.limiter.peek(ACCOUNT, self.key_ids[key]))
        assert not decision.allowed or decision.reason == "ok"
        assert self.run(self.snapshot()) == before, "a peek wrote"

    @precondition(lambda self: len(self.model.revoked) < 1)
    @rule(key=st.sampled_from(KEYS))
    def revoke(self, key: str) -> None:
        self.run(self.accounts.revoke_key(self.key_ids[key]))
        self.model.revoked.add(key)

    @rule(ms=st.sampled_from([500, 3_000, 10_000, 60_000]))
    def time_passes(self, ms: int) -> None:
        for bucket in self.all_buckets():
            field_name = f"{bucket.kind}_ts"
            ts = self.run(self.storage.call("HGET", bucket.hash, field_name))
            if ts is not None:
                self.run(self.storage.call("HSET", bucket.hash, field_name, int(ts) - ms))

    # ------------------------------------------------------------ invariants

    @invariant()
    def books_balance(self) -> None:
        if not self.key_ids:
            return
        account = self.run(self.storage.call("HGETALL", self.keys.account))
        balance = int(account["balance_nano"])
        assert balance == self.model.balance
        assert int(account["topped_up_nano"]) == self.model.topped_up
        assert int(account["spent_nano"]) == self.model.spent
        assert balance >= 0 or self.model.overrun_injected
        ledger = self.run(self.accounts.ledger(ACCOUNT, limit=100_000))
        ledger_costs = sum(parse_usd(e.cost_usd) for e in ledger if e.cost_usd)
        ledger_topups = sum(
            parse_usd(e.amount_usd, signed=True)
            for e in ledger
            if e.type in ("topup", "adjustment") and e.amount_usd
        )
        assert ledger_costs == self.model.charges
        assert ledger_topups - ledger_costs == balance  # Σ ledger = Δ balance
        settled = [e.request_id for e in ledger if e.type in ("charge", "release")]
        assert sorted(settled) == sorted(self.model.settled)  # one entry per settlement
        expired = [e.request_id for e in ledger if e.type == "hold_expired"]
        assert len(expired) == self.model.holds_expired

    @invariant()
    def holds_match_live_requests(self) -> None:
        if not self.key_ids:
            return
        held = int(self.run(self.storage.call("HGET", self.keys.account, "held_nano")) or 0)
        records = self.run(self.storage.call("HGETALL", self.keys.holds))
        in_records = sum(int(r.split("|")[1]) for r in records.values())
        expected = sum(r.hold for r in self.model.live.values() if not r.expired)
        assert held == in_records == expected
        live_ids = {rid for rid, r in self.model.live.items() if not r.expired}
        assert set(records) == live_ids

    @invariant()
    def budget_spend_matches_the_model(self) -> None:
        if not self.key_ids or self.model.budget is None:
            return
        spends = self.run(self.storage.call("KEYS", f"{self.keys.base}:spend:account:*"))
        assert len(spends) <= 1  # one week (an example never lasts into the next)
        spend = self.run(self.storage.call("HGETALL", spends[0])) if spends else {}
        held = sum(r.hold for r in self.model.live.values() if not r.expired)
        assert int(spend.get("held_nano", 0)) == held
        assert int(spend.get("spent_nano", 0)) == self.model.budget_spent
        assert held + self.model.budget_spent <= self.model.budget or self.model.overrun_injected

    @invariant()
    def leases_match_live_requests(self) -> None:
        if not self.key_ids:
            return
        # The account's leases are its in-flight set: every live request, limit or not, until
        # settled or swept (a request whose TTL we made pass stays until the sweep).
        inflight = self.run(self.storage.call("ZRANGE", self.keys.inflight, 0, -1))
        assert set(inflight) == {rid for rid, r in self.model.live.items() if not r.expired}
        for key in KEYS:
            scope, limit = self.scope_of(key), self.limits[key]["concurrency"]
            leases = self.keys.key_leases(self.key_ids[key])
            members = self.run(self.storage.call("ZRANGE", leases, 0, -1))
            if limit is None:
                assert members == []
                continue
            expected = {
                rid
                for rid, r in self.model.live.items()
                if r.key == key and not r.expired and (scope, rid) not in self.model.stale_leases
            }
            # A lease whose TTL we made pass lingers until an admission prunes it.
            stale = {rid for sc, rid in self.model.stale_leases if sc == scope}
            assert set(members) == expected | stale

    @invariant()
    def buckets_never_exceed_capacity(self) -> None:
        if not self.key_ids:
            return
        for bucket in self.all_buckets():
            level, _ = self.run(self.bucket_state(bucket))
            if level is not None:
                assert float(level) <= bucket.capacity + EPS


def run_machine(url: str, examples: int, steps: int) -> None:
    machine = type("Machine", (LuaMachine,), {"url": url})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


def test_lua_scripts_keep_their_invariants_against_the_model(storage_url: str) -> None:
    examples = 60 if storage_url == "memory://" else 40
    run_machine(storage_url, examples=examples, steps=40)


@pytest.mark.parametrize("anything", [None])
def test_model_helper_matches_the_script_refill_formula(anything: None) -> None:
    # Full when never used; refills capacity/60000 per ms; never above capacity.
    assert bucket_level_at([None, None], 10, 5) == 10
    assert bucket_level_at(["2", "1000"], 60, 2000) == pytest.approx(3.0)
    assert bucket_level_at(["-5", "0"], 6, 600_000) == 6
