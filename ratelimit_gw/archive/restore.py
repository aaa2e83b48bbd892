"""`ratelimit-gw archive restore`: an empty Redis rebuilt from the archive.

docs/archive.md (Recovering from a lost Redis) is the operator's procedure.

What it promises:

- It writes only into a Redis without accounts: any account there (in the account lists, or
  any archived account's hash) refuses the whole restore before anything is written
  (:class:`RestoreRefused`). There is no ``--force``: merging an archive into live state
  would count money twice; an operator who means it empties the database first.
- Every account with a snapshot (snapshots.py) comes back, deleted ones as their tombstones,
  with the money the archived ledger says: the balance after its newest entry that states
  one (the ledger's own running balance, right for prepaid and postpaid alike, and for an
  account switched between them), spent = Σ charges, topped up = Σ top-ups, the overrun and
  expired-hold counters counted, nothing held. Token buckets restart full.
- Every key of those accounts comes back with both lookup indexes, so each secret that
  opened it (the current one, and a rotated-out one still in its grace) opens it again.
- Each account's top-up idempotency keys come back, so a retried top-up credits nothing.
- The current period's spend of each budget comes back (charges and expired holds since the
  period began), so a restore does not reset a budget.
- Within each batch an account's own state is written before any of its keys: a gateway
  serving during the restore never admits a key whose account's money is not there yet.

What it cannot bring back is in :class:`RestoreResult`: entries Redis held that were not
archived yet (after ``complete_until``), changes to records after their last snapshot,
accounts never snapshotted, keys issued before keys recorded their secret's hash, and the
signing secrets of accounts' own webhooks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from .. import budgets
from ..account_webhooks import new_secret
from ..keys import key_from_hash
from ..keyspace import (
    ACCOUNTS_SET,
    DELETED_ACCOUNTS,
    WEBHOOK_ENDPOINTS,
    AccountKeys,
    key_account,
    key_by_hash,
)
from ..limits import flatten
from ..management import iso
from ..storage import Storage
from .snapshots import ACCOUNTS_PER_ROUND_TRIP

if TYPE_CHECKING:
    import asyncpg

COMMANDS_PER_ROUND_TRIP = 5000
_RETIRED = "retired:"

_SNAPSHOT_IDS = "SELECT account_id FROM account_snapshots ORDER BY account_id"
_ACCOUNTS = "SELECT account_id, record FROM account_snapshots WHERE account_id = ANY($1::text[])"
_KEYS = (
    "SELECT key_id, account_id, record FROM key_snapshots WHERE account_id = ANY($1::text[]) "
    "ORDER BY key_id"
)
_TOTALS = """
SELECT account_id,
    coalesce(sum(cost_nano) FILTER (WHERE entry_type = 'charge'), 0)::bigint AS spent,
    coalesce(sum(amount_nano) FILTER (WHERE entry_type = 'topup'), 0)::bigint AS topped_up,
    coalesce(sum(amount_nano) FILTER (WHERE entry_type IN ('topup', 'adjustment', 'forfeit')),
        0)::bigint AS credited,
    count(*) FILTER (WHERE entry_type = 'overrun') AS overruns,
    count(*) FILTER (WHERE entry_type = 'hold_expired') AS holds_expired
FROM ledger_entries WHERE account_id = ANY($1::text[]) GROUP BY account_id
"""
# The ledger's running balance: the newest entry that states one (ledger_entries_account_position).
_BALANCES = """
SELECT DISTINCT ON (account_id) account_id, balance_nano FROM ledger_entries
WHERE account_id = ANY($1::text[]) AND balance_nano IS NOT NULL
ORDER BY account_id, stream_ms DESC, stream_seq DESC
"""
_TOPUPS = """
SELECT account_id, idempotency_key, stream_id, amount_nano, entry_type FROM ledger_entries
WHERE account_id = ANY($1::text[]) AND entry_type IN ('topup', 'adjustment')
    AND idempotency_key IS NOT NULL
"""
# A period's spend as admit.lua and settle.lua keep it: the charges settled in it, and the
# worst case of each hold that expired in it (admit.lua counts that as spent).
_PERIOD_SPEND = """
SELECT b.i, coalesce(sum(CASE WHEN l.entry_type = 'charge' THEN l.cost_nano
                              ELSE coalesce(l.hold_nano, 0) END), 0)::bigint AS spent
FROM unnest($1::int[], $2::text[], $3::text[], $4::bigint[]) AS b(i, account_id, key_id, start_ms)
LEFT JOIN ledger_entries l ON l.account_id = b.account_id
    AND l.entry_type IN ('charge', 'hold_expired')
    AND l.at >= to_timestamp(b.start_ms / 1000.0)
    AND (b.key_id IS NULL OR l.key_id = b.key_id)
GROUP BY b.i
"""
_NOT_SNAPSHOTTED = """
SELECT stream FROM archive_cursors c WHERE stream <> '*orphans'
    AND NOT EXISTS (SELECT 1 FROM account_snapshots s WHERE s.account_id = c.stream)
ORDER BY stream
"""
_FRESHNESS = """
SELECT (SELECT complete_until FROM archive_progress),
       greatest((SELECT max(snapshot_at) FROM account_snapshots),
                (SELECT max(snapshot_at) FROM key_snapshots))
"""


class RestoreRefused(Exception):
    """The Redis is not empty: nothing was written."""


@dataclass
class RestoreResult:
    accounts: int = 0  # live accounts restored
    deleted_accounts: int = 0  # tombstones restored
    keys: int = 0
    balance_usd_nano: int = 0  # the restored balances, summed
    topup_keys: int = 0  # idempotency keys of top-ups and adjustments
    budget_periods: int = 0  # budgets whose current period's spend was restored
    # The archive holds every ledger entry up to this time (RFC 3339); later ones are lost.
    complete_until: str | None = None
    snapshot_at: str | None = None  # the newest snapshot: record changes since are lost
    # Archived ledgers without a snapshot (created after the last one): not restored.
    accounts_without_snapshot: list[str] = field(default_factory=list)
    # Keys issued before keys recorded their secret's hash: no secret can open them again.
    keys_without_secret_hash: list[str] = field(default_factory=list)
    # Accounts whose own webhook came back with a new secret nobody has: set it again
    # (``new_secret``) and give its owner the secret.
    webhooks_needing_secret: list[str] = field(default_factory=list)
    # Prepaid accounts whose credits less charges differ from the ledger's running balance
    # (restored): they were postpaid for a while. Worth a look, not an error.
    balance_differs_from_sum: list[str] = field(default_factory=list)


async def restore(
    storage: Storage,
    pool: asyncpg.Pool,
    *,
    default_timezone: str = "UTC",
    now_ms: int | None = None,
) -> RestoreResult:
    """Rebuild every archived account and key into ``storage``, which holds no account."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    result = RestoreResult()
    async with pool.acquire() as conn:
        account_ids = [row[0] for row in await conn.fetch(_SNAPSHOT_IDS)]
        await _refuse_unless_empty(storage, account_ids)
        for start in range(0, len(account_ids), ACCOUNTS_PER_ROUND_TRIP):
            batch = account_ids[start : start + ACCOUNTS_PER_ROUND_TRIP]
            restoring = _Batch(conn, default_timezone, now_ms, result)
            await restoring.read(batch)
            await _write(storage, restoring.account_writes)
            await _write(storage, restoring.key_writes)
        result.accounts_without_snapshot = [row[0] for row in await conn.fetch(_NOT_SNAPSHOTTED)]
        complete, snapshot = await conn.fetchrow(_FRESHNESS)
    result.complete_until = None if complete is None else _iso(complete)
    result.snapshot_at = None if snapshot is None else _iso(snapshot)
    return result


def _iso(at: Any) -> str:
    return iso(int(at.timestamp() * 1000))


async def _refuse_unless_empty(storage: Storage, account_ids: Sequence[str]) -> None:
    live, deleted = await storage.call_many([("SCARD", ACCOUNTS_SET), ("SCARD", DELETED_ACCOUNTS)])
    found = int(live) + int(deleted)
    # One EXISTS per account: in a Redis Cluster each hash is in its own slot.
    for start in range(0, len(account_ids), COMMANDS_PER_ROUND_TRIP):
        batch = account_ids[start : start + COMMANDS_PER_ROUND_TRIP]
        replies = await storage.call_many([("EXISTS", AccountKeys(a).account) for a in batch])
        found += sum(int(r) for r in replies)
    if found:
        raise RestoreRefused(
            f"this Redis already holds accounts ({found} found): restore writes only into an "
            "empty one. Point [storage] url at the new, empty Redis, or empty this one "
            "(FLUSHDB) if its contents are really lost and to be replaced"
        )


async def _write(storage: Storage, commands: list[tuple[Any, ...]]) -> None:
    for start in range(0, len(commands), COMMANDS_PER_ROUND_TRIP):
        await storage.call_many(commands[start : start + COMMANDS_PER_ROUND_TRIP])


class _Batch:
    """The Redis writes that restore one batch of accounts, read from the archive."""

    def __init__(
        self, conn: asyncpg.Connection, default_timezone: str, now_ms: int, result: RestoreResult
    ) -> None:
        self._conn = conn
        self._default_timezone = default_timezone
        self._now_ms = now_ms
        self._result = result
        self.account_writes: list[tuple[Any, ...]] = []
        self.key_writes: list[tuple[Any, ...]] = []
        self._zones: dict[str, str] = {}
        # Each budget's current period: (account, key id or None, spec, start ms, end ms,
        # its spend hash); its spend is read in one query for the batch.
        self._periods: list[tuple[str, str | None, int, int, str]] = []

    async def read(self, batch: Sequence[str]) -> None:
        conn = self._conn
        totals = {row["account_id"]: row for row in await conn.fetch(_TOTALS, batch)}
        balances = {row[0]: int(row[1]) for row in await conn.fetch(_BALANCES, batch)}
        for account_id, record in await conn.fetch(_ACCOUNTS, batch):
            self._account(account_id, msgspec.json.decode(record), totals.get(account_id), balances)
        for row in await conn.fetch(_TOPUPS, batch):
            kind = "|adjustment" if row["entry_type"] == "adjustment" else ""
            self.account_writes.append(
                (
                    "HSET",
                    AccountKeys(row["account_id"]).topups,
                    row["idempotency_key"],
                    f"{row['stream_id']}|{row['amount_nano']}{kind}",
                )
            )
            self._result.topup_keys += 1
        for key_id, account_id, record in await conn.fetch(_KEYS, batch):
            self._key(account_id, key_id, msgspec.json.decode(record)["hash"])
        await self._period_spends()

    def _account(
        self,
        account_id: str,
        record: dict[str, Any],
        totals: asyncpg.Record | None,
        balances: dict[str, int],
    ) -> None:
        fields: dict[str, Any] = dict(record["hash"])
        balance = balances.get(account_id, 0)
        fields.update(balance_nano=balance, held_nano=0, spent_nano=0, topped_up_nano=0)
        if totals is not None:
            fields.update(spent_nano=totals["spent"], topped_up_nano=totals["topped_up"])
            for counter in ("overruns", "holds_expired"):
                if totals[counter]:
                    fields[counter] = totals[counter]
            credited_less_spent = totals["credited"] - totals["spent"]
            if fields.get("prepaid") == "1" and credited_less_spent != balance:
                self._result.balance_differs_from_sum.append(account_id)
        keys = AccountKeys(account_id)
        deleted = fields.get("status") == "deleted"
        pairs = [x for name, value in fields.items() for x in (name, value)]
        self.account_writes += [
            ("HSET", keys.account, *pairs),
            ("SADD", DELETED_ACCOUNTS if deleted else ACCOUNTS_SET, account_id),
        ]
        if deleted:
            self._result.deleted_accounts += 1
        else:
            self._result.accounts += 1
        self._result.balance_usd_nano += balance
        zone = str(fields.get("timezone") or self._default_timezone)
        self._zones[account_id] = zone
        self._budget(account_id, None, fields, zone, keys.account_spend)
        webhook = record.get("webhook")
        if webhook is not None:
            # The archive never held its secret: a new one, which nobody has yet.
            stored = {**webhook, "secret": new_secret()}
            self.account_writes.append(
                ("HSET", WEBHOOK_ENDPOINTS, account_id, msgspec.json.encode(stored))
            )
            self._result.webhooks_needing_secret.append(account_id)

    def _key(self, account_id: str, key_id: str, fields: dict[str, str]) -> None:
        keys = AccountKeys(account_id)
        pairs = [x for name, value in fields.items() for x in (name, value)]
        self.key_writes += [
            ("HSET", keys.key(key_id), *pairs),
            ("SADD", keys.key_ids, key_id),
            ("SET", key_account(key_id), account_id),
        ]
        self._result.keys += 1
        record = key_from_hash(account_id, key_id, fields)
        digest = fields.get("secret_sha256")
        if record is None or digest is None:
            self._result.keys_without_secret_hash.append(key_id)
            return
        indexed = msgspec.json.encode(flatten(record))
        self.key_writes.append(("SET", key_by_hash(digest), indexed))
        for name, value in fields.items():
            # A rotated-out secret still in its grace opens the key until the grace ends.
            if name.startswith(_RETIRED) and name != _RETIRED + "legacy":
                grace_end = int(value)
                if grace_end > self._now_ms:
                    old_index = key_by_hash(name[len(_RETIRED) :])
                    self.key_writes += [
                        ("SET", old_index, indexed),
                        ("PEXPIREAT", old_index, grace_end),
                    ]
        zone = self._zones.get(account_id, self._default_timezone)
        self._budget(
            account_id, key_id, fields, zone, lambda period: keys.key_spend(key_id, period)
        )

    def _budget(
        self,
        account_id: str,
        key_id: str | None,
        fields: dict[str, Any],
        zone: str,
        spend_hash: Callable[[str], str],
    ) -> None:
        current = budgets.current_spec(fields, zone, self._now_ms)
        if current is None:
            return
        spec, start_ms = current
        end_ms = budgets.bounds(spec, zone, self._now_ms)[1]
        name = spend_hash(budgets.spend_name(spec, start_ms))
        self._periods.append((account_id, key_id, start_ms, end_ms, name))

    async def _period_spends(self) -> None:
        if not self._periods:
            return
        rows = await self._conn.fetch(
            _PERIOD_SPEND,
            list(range(len(self._periods))),
            [p[0] for p in self._periods],
            [p[1] for p in self._periods],
            [p[2] for p in self._periods],
        )
        for i, spent in rows:
            _, _, _, end_ms, name = self._periods[i]
            # After the accounts' hashes, before the keys: a key's request settles into it.
            self.account_writes += [
                ("HSET", name, "spent_nano", spent, "held_nano", 0),
                ("PEXPIREAT", name, end_ms + budgets.SPEND_MARGIN_MS),
            ]
            self._result.budget_periods += 1
