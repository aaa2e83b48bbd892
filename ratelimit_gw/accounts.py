"""Accounts, their balances and ledger, and their lifecycle: the operations behind the admin
API and CLI (keys: keys.py, which :class:`AccountStore` extends).

Everything per account lives under its hash tag (see keyspace.py). An account is active,
disabled (admit.lua refuses its keys, nothing else changes) or deleted: a tombstone that keeps
its id from being used again, its ledger and its revoked keys.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import msgspec

from . import budgets, keyspace, model_limits
from .budgets import Budget, check_timezone
from .keys import KeyStore
from .keyspace import AccountKeys
from .limits import LIMIT_NAMES, NO_LIMITS, Limits
from .management import (
    AccountError,
    FieldChanges,
    check_id,
    check_limit,
    check_limits,
    iso,
    opt_int,
    unknown_fields,
)
from .money import format_usd

MAX_TOPUP_NANO = 10**18  # $1e9 per top-up or adjustment
# Idempotency keys of the gateway's own top-ups (initial balances): callers may not use it.
RESERVED_IDEMPOTENCY_PREFIX = "rlgw:"
RpmPolicy = Literal["fixed", "balance", "tier"]
AccountStatus = Literal["active", "disabled", "deleted"]
# Ledger entries that move money by hand, not by a request: they have no cost.
_BALANCE_ENTRIES = frozenset({"topup", "adjustment", "forfeit"})
_KINDS = {"topup": "a top-up", "adjustment": "an adjustment"}
_BUDGET = {"budget_usd", "budget_period", "budget_period_s"}


class Account(msgspec.Struct, kw_only=True):
    id: str
    status: AccountStatus
    prepaid: bool
    balance_usd: str
    held_usd: str
    available_usd: str
    spent_usd: str
    topped_up_usd: str
    limits: Limits  # flat on the wire: rpm, tpm, concurrency (limits.flatten)
    rpm_policy: RpmPolicy
    rpm_override: int | None
    holds_live: int
    holds_expired: int
    overruns: int
    created_at: str
    # Where its budgets' days, weeks and months begin: its own, or [accounts] default_timezone.
    timezone: str
    budget: Budget | None  # with the current period's spend (docs/limits-and-balance.md)
    # Per-model rpm/tpm limits: pattern → limits (docs/limits-and-balance.md).
    model_limits: dict[str, model_limits.ModelLimit] = {}


class Deletion(msgspec.Struct, kw_only=True):
    forfeited_usd: str  # the balance written off by a forced delete ("0.00": none)
    account: Account


class LedgerEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    time: str
    type: str
    request_id: str | None = None
    key_id: str | None = None
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: str | None = None
    amount_usd: str | None = None
    hold_usd: str | None = None
    balance_usd: str | None = None
    outcome: str | None = None
    idempotency_key: str | None = None
    reason: str | None = None  # an adjustment's or a forfeit's
    settlement_id: str | None = None  # the gateway's own id (request_id is the caller's)
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None


class AccountStore(KeyStore):
    async def create_account(
        self,
        account_id: str,
        *,
        balance_nano: int | None = None,
        limits: Limits = NO_LIMITS,
        rpm_policy: RpmPolicy = "fixed",
        rpm_override: int | None = None,
    ) -> Account:
        """Create an account; giving a balance (even 0) makes it prepaid
        (docs/limits-and-balance.md)."""
        check_id(account_id, "account id")
        check_limits(limits)
        check_limit("rpm_override", rpm_override)
        fields: list[Any] = [
            "created_ms",
            int(time.time() * 1000),
            "prepaid",
            "1" if balance_nano is not None else "0",
            "balance_nano",
            0,
            "held_nano",
            0,
            "spent_nano",
            0,
            "topped_up_nano",
            0,
            "rpm_policy",
            rpm_policy,
            *limits.hash_fields(),
        ]
        if rpm_override is not None:
            fields += ["rpm_override", rpm_override]
        keys = AccountKeys(account_id)
        created = int(await self._storage.run("create_account", [keys.account], fields))
        if created == -1:
            raise AccountError(
                409,
                "account_deleted",
                f"account {account_id!r} was deleted: its id cannot be used again",
            )
        if not created:
            raise AccountError(409, "account_exists", f"account {account_id!r} already exists")
        await self._storage.call("SADD", keyspace.ACCOUNTS_SET, account_id)
        if balance_nano:
            initial = f"{RESERVED_IDEMPOTENCY_PREFIX}initial-balance:{account_id}"
            await self._change_balance(account_id, balance_nano, initial, "topup")
        return await self.get_account(account_id)

    async def get_account(self, account_id: str) -> Account:
        """Any account, a deleted one too (its tombstone)."""
        check_id(account_id, "account id")
        keys = AccountKeys(account_id)
        # One snapshot: a settlement landing between two reads would mix two states.
        raw, live = await self._storage.call_many(
            [("HGETALL", keys.account), ("HLEN", keys.holds)], atomic=True
        )
        if "created_ms" not in raw:  # none, or a stub left by an older build: not an account
            raise AccountError(404, "account_not_found", f"account {account_id!r} not found")
        balance, held = int(raw.get("balance_nano", 0)), int(raw.get("held_nano", 0))
        zone = raw.get("timezone") or self.default_timezone
        budget = None
        now_ms = int(time.time() * 1000)
        current = budgets.current_spec(raw, zone, now_ms)
        if current is not None:
            spend = await self._storage.call(
                "HGETALL", keys.account_spend(budgets.spend_name(*current))
            )
            budget = budgets.shown(raw, zone, spend, now_ms)
        return Account(
            id=account_id,
            status=raw.get("status", "active"),
            prepaid=raw.get("prepaid") == "1",
            balance_usd=format_usd(balance),
            held_usd=format_usd(held),
            available_usd=format_usd(balance - held),
            spent_usd=format_usd(int(raw.get("spent_nano", 0))),
            topped_up_usd=format_usd(int(raw.get("topped_up_nano", 0))),
            limits=Limits.from_hash(raw),
            rpm_policy=raw.get("rpm_policy", "fixed"),
            rpm_override=opt_int(raw.get("rpm_override")),
            holds_live=int(live),
            holds_expired=int(raw.get("holds_expired", 0)),
            overruns=int(raw.get("overruns", 0)),
            created_at=iso(int(raw["created_ms"])),
            timezone=zone,
            budget=budget,
            model_limits=model_limits.decode(raw.get(model_limits.FIELD)),
        )

    async def is_prepaid(self, account_id: str) -> bool:
        """One field read: whether the account's money is protected by holds
        (docs/limits-and-balance.md)."""
        prepaid: str | None = await self._storage.call(
            "HGET", AccountKeys(account_id).account, "prepaid"
        )
        return prepaid == "1"

    async def update_account(self, account_id: str, changes: dict[str, Any]) -> Account:
        """Set or clear (None) limits, the rpm policy/override, whether it is prepaid, its
        budget (budgets.apply_budget_changes) and its time zone."""
        await self._open_account(account_id)
        unknown_fields(
            changes,
            {*LIMIT_NAMES, "rpm_override", "rpm_policy", "prepaid", "timezone", "model_limits"}
            | _BUDGET,
        )
        fields = FieldChanges()
        budgets.apply_budget_changes(fields, changes)
        for name, value in changes.items():
            if name in _BUDGET:
                continue
            if name == "model_limits":
                model_limits.change(fields, value)
            elif name == "timezone":
                if value is None:
                    fields.clear("timezone")
                else:
                    fields.set("timezone", check_timezone(value))
            elif name == "rpm_policy":
                if value not in ("fixed", "balance", "tier"):
                    raise AccountError(
                        400, "invalid_request", "rpm_policy must be fixed, balance or tier"
                    )
                fields.set(name, value)
            elif name == "prepaid":
                if not isinstance(value, bool):
                    raise AccountError(400, "invalid_request", "prepaid must be true or false")
                fields.set(name, "1" if value else "0")
            else:
                fields.limit(name, value)
        writes = fields.commands(AccountKeys(account_id).account)
        if writes:
            await self._storage.call_many(writes, atomic=True)
        return await self.get_account(account_id)

    async def set_disabled(self, account_id: str, disabled: bool) -> bool:
        """Disable (admit.lua refuses the account's keys on their next request, 403
        ``account_disabled``) or enable again; False when it already was."""
        check_id(account_id, "account id")
        status = "disabled" if disabled else ""
        changed = int(
            await self._storage.run("account_status", [AccountKeys(account_id).account], [status])
        )
        if changed == -1:
            raise AccountError(404, "account_not_found", f"account {account_id!r} not found")
        if changed == -2:
            raise AccountError(409, "account_deleted", f"account {account_id!r} is deleted")
        return changed == 1

    async def delete_account(self, account_id: str, *, force: bool = False) -> Deletion:
        """Delete an account: refused (409 ``account_not_empty``) while it has a balance or
        live holds, unless ``force``d (the balance is then forfeited, in a ledger entry).
        Its keys are revoked, its ledger kept, and its id never used again."""
        check_id(account_id, "account id")
        keys = AccountKeys(account_id)
        reply = await self._storage.run(
            "delete_account", [keys.account, keys.holds, keys.ledger], ["1" if force else "0"]
        )
        status, balance, held, holds = int(reply[0]), int(reply[1]), int(reply[2]), int(reply[3])
        if status == -1:
            raise AccountError(404, "account_not_found", f"account {account_id!r} not found")
        if status == -2:
            raise AccountError(409, "account_deleted", f"account {account_id!r} is already deleted")
        if status == 0:
            left = [f"a balance of {_dollars(balance)}"] if balance else []
            if holds:
                plural = "s" if holds > 1 else ""
                left.append(f"{holds} live hold{plural} ({_dollars(held)} held)")
            raise AccountError(
                409,
                "account_not_empty",
                f"account {account_id!r} still has {' and '.join(left)}: a forced delete "
                "forfeits the balance (the requests in flight still settle)",
            )
        # admit.lua refuses them already (the account's status): this makes listings say so.
        now_ms = int(time.time() * 1000)
        key_ids = sorted(await self._storage.call("SMEMBERS", keys.key_ids))
        for start in range(0, len(key_ids), 500):
            revocations: list[tuple[Any, ...]] = []
            for key_id in key_ids[start : start + 500]:
                revocations += [
                    ("HSET", keys.key(key_id), "revoked", "1"),
                    ("HSETNX", keys.key(key_id), "revoked_ms", now_ms),
                ]
            await self._storage.call_many(revocations, atomic=True)
        await self._storage.call_many(
            [
                ("SADD", keyspace.DELETED_ACCOUNTS, account_id),  # still archived
                ("SREM", keyspace.ACCOUNTS_SET, account_id),
            ]
        )
        return Deletion(
            forfeited_usd=format_usd(balance), account=await self.get_account(account_id)
        )

    async def topup(self, account_id: str, amount_nano: int, idempotency_key: str) -> bool:
        """Credit once per idempotency key; False when that key was already used for the
        same amount (a retry). The key used before for another amount or for an adjustment:
        409 ``idempotency_conflict``, nothing credited."""
        _check_idempotency_key(idempotency_key)
        return await self._change_balance(account_id, amount_nano, idempotency_key, "topup")

    async def adjust(
        self, account_id: str, amount_nano: int, reason: str, idempotency_key: str
    ) -> bool:
        """Credit (positive) or debit (negative) the balance by hand, once per idempotency
        key (shared with top-ups), with a reason in its own ledger entry (``adjustment``).
        Not a top-up: the rpm policies do not count it. A debit may not take the balance
        below the live holds (409 ``debit_exceeds_available``)."""
        _check_idempotency_key(idempotency_key)
        if amount_nano == 0:
            raise AccountError(400, "invalid_request", "amount_usd must not be 0")
        if not isinstance(reason, str) or not reason.strip() or len(reason) > 500:
            raise AccountError(400, "invalid_request", "reason is required (≤ 500 chars)")
        return await self._change_balance(
            account_id, amount_nano, idempotency_key, "adjustment", reason
        )

    async def _change_balance(
        self, account_id: str, amount_nano: int, idempotency_key: str, kind: str, reason: str = ""
    ) -> bool:
        if kind == "topup" and amount_nano <= 0:
            raise AccountError(400, "invalid_request", "amount_usd must be > 0")
        if abs(amount_nano) > MAX_TOPUP_NANO:
            # Balances are 64-bit integers of nano-USD in Redis: keep far from overflow.
            raise AccountError(400, "invalid_request", "amount_usd must be at most 1000000000")
        keys = AccountKeys(account_id)
        reply = await self._storage.run(
            "topup",
            [keys.account, keys.topups, keys.ledger],
            [amount_nano, idempotency_key, kind, reason],
        )
        status = int(reply[0])
        if status == -1:
            raise AccountError(404, "account_not_found", f"account {account_id!r} not found")
        if status == -4:
            raise AccountError(409, "account_deleted", f"account {account_id!r} is deleted")
        if status == -3:
            balance, held = int(reply[1]), int(reply[3])
            raise AccountError(
                409,
                "debit_exceeds_available",
                f"a debit of {_dollars(-amount_nano)} would take account {account_id!r} "
                f"below its live holds (balance {_dollars(balance)}, held {_dollars(held)}): "
                f"at most {_dollars(max(balance - held, 0))} can be debited now",
            )
        if status == -2:
            first, first_kind = str(reply[3]), str(reply[4])
            used = _KINDS.get(first_kind, first_kind)
            if first:
                used += f" of {_dollars(int(first))}"
            if first_kind == kind:
                new = kind.replace("topup", "top-up")
                raise AccountError(
                    409,
                    "idempotency_conflict",
                    f"idempotency key {idempotency_key!r} was already used for {used} on "
                    f"account {account_id!r}, not {_dollars(amount_nano)}: use a new key "
                    f"for a new {new}",
                )
            raise AccountError(
                409,
                "idempotency_conflict",
                f"idempotency key {idempotency_key!r} was already used for {used} on "
                f"account {account_id!r}: use a new key for {_KINDS[kind]}",
            )
        return status == 1

    async def ledger(self, account_id: str, limit: int = 100) -> list[LedgerEntry]:
        """The newest ``limit`` ledger entries, newest first (a deleted account's too)."""
        await self._account_status(account_id)
        return [ledger_entry(i, f) for i, f in await self.ledger_fields(account_id, limit)]

    async def ledger_fields(
        self, account_id: str, limit: int, before: str | None = None
    ) -> list[tuple[str, dict[str, str]]]:
        """Up to ``limit`` entries as Redis holds them (id, fields), newest first, older than
        the entry id ``before`` if given; none for an account Redis does not know."""
        newest = "+" if before is None else "(" + before
        rows = await self._storage.call(
            "XREVRANGE", AccountKeys(account_id).ledger, newest, "-", "COUNT", limit
        )
        return [(entry_id, _pairs(fields)) for entry_id, fields in rows]

    async def account_exists(self, account_id: str) -> bool:
        """Whether Redis knows the account (a deleted one's tombstone too)."""
        try:
            await self._account_status(account_id)
        except AccountError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def list_accounts(self) -> list[str]:
        """Every account but the deleted ones."""
        return sorted(await self._storage.call("SMEMBERS", keyspace.ACCOUNTS_SET))


def _dollars(nano: int) -> str:
    """ "$12.50", "-$0.25"."""
    return f"-${format_usd(-nano)}" if nano < 0 else f"${format_usd(nano)}"


def _check_idempotency_key(idempotency_key: str) -> None:
    if not isinstance(idempotency_key, str) or not idempotency_key or len(idempotency_key) > 200:
        raise AccountError(400, "invalid_request", "idempotency_key is required (≤ 200 chars)")
    if idempotency_key.startswith(RESERVED_IDEMPOTENCY_PREFIX):
        raise AccountError(
            400,
            "invalid_request",
            f"idempotency keys starting with {RESERVED_IDEMPOTENCY_PREFIX!r} are reserved "
            "for the gateway's own top-ups",
        )


def _pairs(fields: Any) -> dict[str, str]:
    if isinstance(fields, dict):
        return fields
    return dict(zip(fields[::2], fields[1::2], strict=True))


def _usd(fields: dict[str, str], name: str) -> str | None:
    value = fields.get(name)
    return format_usd(int(value)) if value not in (None, "") else None


def ledger_entry(entry_id: str, f: dict[str, str]) -> LedgerEntry:
    """The entry as the admin API and CLI show it, from its id and its fields."""
    entry_type = f.get("type", "")
    return LedgerEntry(
        id=entry_id,
        time=iso(int(entry_id.split("-", 1)[0])),
        type=entry_type,
        request_id=f.get("request_id"),
        key_id=f.get("key_id"),
        model=f.get("model"),
        input_tokens=opt_int(f.get("input_tokens")),
        output_tokens=opt_int(f.get("output_tokens")),
        cost_usd=_usd(f, "cost_nano") if entry_type not in _BALANCE_ENTRIES else None,
        amount_usd=_usd(f, "amount_nano"),
        hold_usd=_usd(f, "hold_nano"),
        balance_usd=_usd(f, "balance_nano"),
        outcome=f.get("outcome"),
        idempotency_key=f.get("idempotency_key"),
        reason=f.get("reason"),
        settlement_id=f.get("settlement_id"),
        cache_read_tokens=opt_int(f.get("cache_read_tokens")),
        cache_write_tokens=opt_int(f.get("cache_write_tokens")),
    )
