"""Account and key records copied to PostgreSQL: what `archive restore` re-creates.

A snapshot is a record's hash as Redis holds it, without its live state: what requests
change on their own (:data:`ACCOUNT_LIVE_FIELDS`, :data:`KEY_LIVE_FIELDS`). Balances,
spend and counters are rebuilt from the archived ledger instead, which is exact where a
snapshot would be minutes old; token buckets restart full. Every account is copied, deleted
ones too (their hash is the tombstone that keeps the id from being used again), and every
key of each, revoked ones too. Keys are stored as Redis has them: the SHA-256 of each secret,
never a secret (none is ever in Redis).

An account's own webhook (``WEBHOOK_ENDPOINTS``) is copied into its snapshot without its
signing secret: that secret is in Redis in the clear (signing needs it), and the archive
keeps none. A restored webhook therefore gets a new secret nobody knows yet
(restore.py says which).

Only what changed is written: Postgres compares each record with the one it holds
(``IS DISTINCT FROM``) and keeps the old row, and its ``snapshot_at``, when they are equal.
Redis is read in pipelined batches; one statement writes each batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from ..keyspace import ACCOUNTS_SET, DELETED_ACCOUNTS, WEBHOOK_ENDPOINTS, AccountKeys
from ..storage import Storage

if TYPE_CHECKING:
    import asyncpg

# Small enough that one batch (its replies decoded, its records encoded) holds the event
# loop of a serving gateway for a few milliseconds, not tens.
ACCOUNTS_PER_ROUND_TRIP = 100
# What requests change on their own, rebuilt (or restarted) by restore, never snapshotted:
# the money (from the ledger), token buckets (restart full: a missing level is a full
# bucket), and the counters of expired holds and overruns (counted from the ledger).
BUCKET_FIELDS = frozenset({"rpm_level", "rpm_ts", "tpm_level", "tpm_ts"})
ACCOUNT_LIVE_FIELDS = BUCKET_FIELDS | {
    "balance_nano",
    "held_nano",
    "spent_nano",
    "topped_up_nano",
    "holds_expired",
    "overruns",
}
KEY_LIVE_FIELDS = BUCKET_FIELDS

_UPSERT_ACCOUNTS = (
    "INSERT INTO account_snapshots (account_id, record) "
    "SELECT * FROM unnest($1::text[], $2::jsonb[]) "
    "ON CONFLICT (account_id) DO UPDATE SET record = excluded.record, snapshot_at = now() "
    "WHERE account_snapshots.record IS DISTINCT FROM excluded.record"
)
_UPSERT_KEYS = (
    "INSERT INTO key_snapshots (key_id, account_id, record) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[]) "
    "ON CONFLICT (key_id) DO UPDATE SET account_id = excluded.account_id, "
    "record = excluded.record, snapshot_at = now() "
    "WHERE key_snapshots.record IS DISTINCT FROM excluded.record "
    "OR key_snapshots.account_id IS DISTINCT FROM excluded.account_id"
)


@dataclass(frozen=True)
class SnapshotResult:
    accounts: int  # account rows written (new or changed)
    keys: int  # key rows written (new or changed)
    accounts_seen: int
    keys_seen: int


def account_record(raw: dict[str, str], webhook: str | None) -> dict[str, Any]:
    """What the archive keeps of an account: its hash without live state, and its own
    webhook without the signing secret."""
    record: dict[str, Any] = {
        "hash": {k: v for k, v in raw.items() if k not in ACCOUNT_LIVE_FIELDS}
    }
    if webhook is not None:
        try:
            settings = msgspec.json.decode(webhook)
        except msgspec.DecodeError:
            settings = None  # not one we wrote: nothing to restore
        if isinstance(settings, dict):
            settings.pop("secret", None)
            record["webhook"] = settings
    return record


def key_record(raw: dict[str, str]) -> dict[str, Any]:
    return {"hash": {k: v for k, v in raw.items() if k not in KEY_LIVE_FIELDS}}


def _json(document: Any) -> str:
    return msgspec.json.encode(document).decode()


def _statement_count(status: str) -> int:
    """Rows an ``INSERT … ON CONFLICT DO UPDATE … WHERE`` wrote: "INSERT 0 <n>"."""
    return int(status.rsplit(" ", 1)[1])


async def _account_ids(storage: Storage) -> list[str]:
    live, deleted = await storage.call_many(
        [("SMEMBERS", ACCOUNTS_SET), ("SMEMBERS", DELETED_ACCOUNTS)]
    )
    return sorted({str(a) for a in live} | {str(a) for a in deleted})


def _batches(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def snapshot_all(storage: Storage, pool: asyncpg.Pool) -> SnapshotResult:
    """Copy every account and key record (live and deleted) to the archive; write only the
    rows whose content changed. Three Redis round trips and two statements per
    :data:`ACCOUNTS_PER_ROUND_TRIP` accounts."""
    account_ids = await _account_ids(storage)
    webhooks: dict[str, str] = {
        str(k): str(v) for k, v in (await storage.call("HGETALL", WEBHOOK_ENDPOINTS)).items()
    }
    written_accounts = written_keys = keys_seen = accounts_seen = 0
    async with pool.acquire() as conn:
        for batch in _batches(account_ids, ACCOUNTS_PER_ROUND_TRIP):
            names = [AccountKeys(a) for a in batch]
            replies = await storage.call_many(
                [c for n in names for c in (("HGETALL", n.account), ("SMEMBERS", n.key_ids))]
            )
            accounts: list[tuple[str, str]] = []
            key_pairs: list[tuple[str, str]] = []
            for account, raw, key_ids in zip(batch, replies[::2], replies[1::2], strict=True):
                if "created_ms" not in raw:  # gone, or a stub: not an account
                    continue
                accounts.append((account, _json(account_record(raw, webhooks.get(account)))))
                key_pairs += [(account, str(k)) for k in sorted(key_ids)]
            key_raws = await storage.call_many(
                [("HGETALL", AccountKeys(a).key(k)) for a, k in key_pairs]
            )
            keys = [
                (k, a, _json(key_record(raw)))
                for (a, k), raw in zip(key_pairs, key_raws, strict=True)
                if "created_ms" in raw  # a partial record (an interrupted create): not a key
            ]
            accounts_seen += len(accounts)
            keys_seen += len(keys)
            async with conn.transaction():
                if accounts:
                    status = await conn.execute(_UPSERT_ACCOUNTS, *zip(*accounts, strict=True))
                    written_accounts += _statement_count(status)
                if keys:
                    status = await conn.execute(_UPSERT_KEYS, *zip(*keys, strict=True))
                    written_keys += _statement_count(status)
    return SnapshotResult(written_accounts, written_keys, accounts_seen, keys_seen)
