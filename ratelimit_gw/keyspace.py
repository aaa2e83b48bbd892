"""Every Redis key the gateway uses, in one place.

Everything one admission or settlement touches lives under the account's hash tag
``{a:<account>}``, so a Redis Cluster keeps each script in one slot. Only the two lookup
indexes (key hash → key, key id → account) and the account list live outside it: they are
read before the account is known; the orphan-settlements stream, written after a script
found no account; and the key-change feed, which every gateway reads whatever the account.
Shared upstream quotas (docs/custom-endpoints.md) belong to no account: each has its own tag
``{q:<quota>}`` and its own script run. So do upstream key pools (SPEC §14): every key of one
provider's pool — each upstream key's buckets, cool-down and probe claim, the pool's own
buckets, its tie counter and unhealthy set — shares the tag ``{p:<provider>}``, so a pick
weighs the whole pool in one slot.

Webhook events (docs/webhooks.md) share one tag ``{wh}``: the outbox, its records, the
dedupe markers, the accounts' own webhooks and the key-scan claim, so each webhook script
runs in one slot (events are rare: one slot is no hot spot).

Deleting an account keeps its hash (status ``deleted``: the tombstone that keeps its id from
being created again), its ledger and its revoked keys; it leaves the account list.

Token buckets have no keys of their own: each is two fields (``rpm_level``/``rpm_ts``,
``tpm_level``/``tpm_ts``) of its scope's hash, the account's or the key's, which admit.lua
reads anyway. Likewise the account's concurrency leases are its in-flight set. Both save
Redis calls on every request (admit.lua went from 27 calls to 14, settle.lua from 23 to 15).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

PREFIX = "rlgw"
ACCOUNTS_SET = f"{PREFIX}:accounts"
# Settlements for an account that no longer exists (wiped or evicted): kept for audit, never
# applied. One stream for every account, appended by the settler (settle.lua cannot: on a
# cluster it is in another slot than the account's).
ORPHAN_SETTLEMENTS = f"{PREFIX}:orphan-settlements"
# The ids of keys whose record changed (updated, rotated): every gateway's key cache reads it
# four times a second and forgets those keys (auth.py). Written after the key's own hash.
KEY_CHANGES = f"{PREFIX}:key-changes"
# Deleted accounts leave ACCOUNTS_SET; the archiver still copies what their ledgers gain
# (forfeits, and the settlements of requests in flight at deletion), so they are listed here.
DELETED_ACCOUNTS = f"{PREFIX}:accounts-deleted"
# The ledger archive (docs/archive.md): the lease that makes one instance the archiver, and
# how far it got (every instance's lag gauge reads it).
ARCHIVE_LEASE = f"{PREFIX}:archive:lease"
ARCHIVE_PROGRESS = f"{PREFIX}:archive:progress"
# The orphan stream's archive epoch (AccountKeys.archive_epoch says what an epoch is).
ORPHAN_ARCHIVE_EPOCH = f"{PREFIX}:orphan-settlements:archive-epoch"
# Account and key ids appear inside key names and hash tags: keep them plain.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


WEBHOOKS = f"{PREFIX}:{{wh}}"
# Due time (ms) of every event not yet delivered, by delivery id (``<webhook>/<event id>``);
# a claimed event's due time is its lease's end.
WEBHOOK_OUTBOX = f"{WEBHOOKS}:outbox"
WEBHOOK_RECORDS = f"{WEBHOOKS}:events"  # delivery id → the record (webhook, body, created_ms)
WEBHOOK_ENDPOINTS = f"{WEBHOOKS}:endpoints"  # account id → that account's own webhook
WEBHOOK_KEY_SCAN = f"{WEBHOOKS}:key-scan"  # the claim of the periodic key.expiring scan


def webhook_seen(delivery_id: str) -> str:
    """The marker that makes raising the same event twice a no-op (it outlives delivery)."""
    return f"{WEBHOOKS}:seen:{delivery_id}"


def key_by_hash(key_sha256_hex: str) -> str:
    return f"{PREFIX}:keyhash:{key_sha256_hex}"


def key_account(key_id: str) -> str:
    return f"{PREFIX}:keyid:{key_id}"


class AccountKeys:
    """Key names of one account (and, for request scripts, one of its API keys)."""

    __slots__ = ("base",)

    def __init__(self, account_id: str) -> None:
        self.base = f"{PREFIX}:{{a:{account_id}}}"

    @property
    def account(self) -> str:
        return f"{self.base}:account"

    @property
    def key_ids(self) -> str:
        return f"{self.base}:keys"

    @property
    def inflight(self) -> str:
        return f"{self.base}:inflight"

    @property
    def holds(self) -> str:
        return f"{self.base}:holds"

    @property
    def ledger(self) -> str:
        return f"{self.base}:ledger"

    @property
    def archive_epoch(self) -> str:
        """A random marker the archiver sets once: its archived position in the ledger holds
        only while the marker does (a wiped Redis loses both; the ledger is read anew)."""
        return f"{self.base}:archive-epoch"

    @property
    def settled(self) -> str:
        return f"{self.base}:settled"

    @property
    def topups(self) -> str:
        return f"{self.base}:topups"

    def key(self, key_id: str) -> str:
        return f"{self.base}:key:{key_id}"

    def key_leases(self, key_id: str) -> str:
        """Concurrency leases of one key (the account's are its in-flight set)."""
        return f"{self.base}:leases:key:{key_id}"

    def account_spend(self, period: str) -> str:
        """The account budget's spend in one period (``budgets.spend_name``): a hash of
        ``spent_nano`` and ``held_nano`` that expires after the period (and its holds) end."""
        return f"{self.base}:spend:account:{period}"

    def key_spend(self, key_id: str, period: str) -> str:
        """One key's budget spend in one period, as :meth:`account_spend`."""
        return f"{self.base}:spend:key:{key_id}:{period}"

    def model_bucket(self, scope: str, key_id: str, pattern: str) -> str:
        """The rpm/tpm buckets of one per-model limit (model_limits.py) of the account
        (``scope`` "account") or of the key: a hash like a scope's bucket fields, which
        expires once both would be full again."""
        if scope == "account":
            return f"{self.base}:model-limit:account:{pattern}"
        return f"{self.base}:model-limit:key:{key_id}:{pattern}"

    def admit_keys(self, key_id: str) -> list[str]:
        """KEYS of admit.lua, in the order its header states (the properties' names, spelled
        out: this runs twice per request)."""
        base = self.base
        return [
            f"{base}:account",
            f"{base}:key:{key_id}",
            f"{base}:leases:key:{key_id}",
            f"{base}:inflight",
            f"{base}:holds",
            f"{base}:ledger",
            f"{base}:settled",
        ]

    def settle_keys(self, key_id: str) -> list[str]:
        """KEYS of settle.lua: admit.lua's, in the same order (its settled zset is the
        tombstone admit.lua checks)."""
        return self.admit_keys(key_id)


class PoolKeys:
    """Key names of one provider's upstream key pool (``pool_pick.lua`` and the plain commands
    that mark keys cooling or unhealthy), all under ``{p:<provider>}``."""

    __slots__ = ("base",)

    def __init__(self, provider: str) -> None:
        self.base = f"{PREFIX}:{{p:{provider}}}"

    @property
    def unhealthy(self) -> str:
        """The set of key names an upstream 401 marked unhealthy (until a probe clears them)."""
        return f"{self.base}:unhealthy"

    def cooling(self, key_name: str) -> str:
        """A marker whose TTL is the key's cool-down after an upstream 429."""
        return f"{self.base}:key:{key_name}:cooling"

    def probe(self, key_name: str) -> str:
        """A claim whose TTL is the probe interval of an unhealthy key: the instance that
        sets it probes the key; every other instance leaves it alone until it expires."""
        return f"{self.base}:key:{key_name}:probe"

    def unhealthy_since(self, key_name: str) -> str:
        """When the key was marked unhealthy (ms), set with the mark and cleared with it: the
        episode its ``upstream_key.unhealthy`` event is named after."""
        return f"{self.base}:key:{key_name}:unhealthy_since"

    def script_keys(self, key_names: Sequence[str]) -> list[str]:
        """KEYS of pool_pick.lua, in the order its header states, for the keys named."""
        base = self.base
        keys = [f"{base}:rpm", f"{base}:tpm", f"{base}:tie", self.unhealthy]
        for name in key_names:
            keys += [f"{base}:key:{name}:rpm", f"{base}:key:{name}:tpm", self.cooling(name)]
        return keys
