"""API keys: their secrets, records, lookups, updates and rotations (docs/admin.md).

Keys are generated here (``rlgw-`` + 32 random bytes, url-safe), shown once, and stored only
as a SHA-256 hash. A key's own hash (under its account's hash tag, keyspace.py) is its record
and names its current secret by that hash; two lookup indexes map each secret's hash to the
key (the entry is the record as issued, as every build has written it) and a key id to its
account.

What a change promises: limits, expiry and revocation are read by admit.lua on every request
(in force on the next one); models and name reach every gateway's key cache within a second
(key_changes.py). A rotated key's old secret opens the same key (its limits and spend) until
its grace ends, then never again.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from fnmatch import fnmatchcase
from typing import Any

import msgspec

from . import budgets, keyspace, model_limits
from .budgets import Budget
from .key_changes import published
from .keyspace import AccountKeys
from .limits import LIMIT_NAMES, NO_LIMITS, Limits, flatten
from .management import (
    AccountError,
    FieldChanges,
    check_id,
    check_limits,
    iso,
    parse_time_ms,
    unknown_fields,
)
from .storage import Storage

KEY_PREFIX = "rlgw-"
# How much of a secret a key record keeps and shows (`prefix`): enough to tell keys apart.
SHOWN_PREFIX_CHARS = 12
DEFAULT_GRACE_S = 86_400  # how long a rotated key's old secret keeps working, unless told
MAX_GRACE_S = 30 * 86_400
MAX_PAGE = 1000
# The grace of the secret of a key issued before keys named their secret (rotate_key.lua).
_LEGACY_SECRET = "retired:legacy"
_BUDGET_CHANGES = {"budget_usd", "budget_period", "budget_period_s"}
_UPDATABLE = {"name", "models", "expires_at", "model_limits", *LIMIT_NAMES, *_BUDGET_CHANGES}


class KeyRecord(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    """What a gateway knows about a key (never the key itself)."""

    id: str
    account: str
    name: str
    prefix: str  # the first characters of the key, to recognise it in listings
    models: tuple[str, ...] = ()
    limits: Limits = NO_LIMITS  # flat in the index entry and the API
    expires_at: str | None = None
    revoked: bool = False
    created_at: str = ""
    # Its budget and the current period's spend (docs/limits-and-balance.md); the admin API
    # and CLI show it, a gateway's key cache never reads it.
    budget: Budget | None = None
    # Per-model rpm/tpm limits: pattern → limits (docs/limits-and-balance.md). admit.lua reads
    # them from the key's hash itself: the cache's copy is only shown.
    model_limits: dict[str, model_limits.ModelLimit] = {}

    def allows_model(self, model_id: str) -> bool:
        return not self.models or any(fnmatchcase(model_id, p) for p in self.models)


class CreatedKey(msgspec.Struct, kw_only=True):
    key: str  # shown once
    record: KeyRecord


class RotatedKey(msgspec.Struct, kw_only=True):
    key: str  # the new secret, shown once
    record: KeyRecord
    old_key_expires_at: str  # when the old secret stops working (now, for no grace)

    def without_secret(self) -> dict[str, Any]:
        """The record and the old secret's end: what the audit trail keeps of a rotation."""
        return {**flatten(self.record), "old_key_expires_at": self.old_key_expires_at}


class KeyPage(msgspec.Struct, kw_only=True):
    data: list[KeyRecord]
    next_cursor: str | None  # where the next page starts; None: this was the last


class _IndexTarget(msgspec.Struct):
    """The part of an index entry a lookup trusts: which key. The rest is read live."""

    account: str
    id: str


_INDEX_DECODER = msgspec.json.Decoder(_IndexTarget)


def _key_not_found(key_id: str) -> AccountError:
    if key_id.startswith(KEY_PREFIX):
        # A secret passed where the id belongs: never echo it (terminals, logs, tickets).
        return AccountError(
            404,
            "key_not_found",
            f"that is a key's secret, not its id; its account's key list shows the id (key_…) "
            f"beside the prefix {key_id[:SHOWN_PREFIX_CHARS]!r}",
        )
    return AccountError(404, "key_not_found", f"key {key_id!r} not found")


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    """The key operations of :class:`~ratelimit_gw.accounts.AccountStore`."""

    def __init__(self, storage: Storage, default_timezone: str = "UTC") -> None:
        self._storage = storage
        # The time zone of an account that names none ([accounts] default_timezone).
        self.default_timezone = default_timezone

    async def _with_budgets(
        self, pairs: list[tuple[str, str]], raws: list[dict[str, str]]
    ) -> list[Budget | None]:
        """The budget of each key hash in ``raws`` (of the keys ``pairs`` names) with its
        current period's spend: two more round trips, only when some key has a budget."""
        wanted = [i for i, raw in enumerate(raws) if raw.get("budget_nano")]
        shown: list[Budget | None] = [None] * len(raws)
        if not wanted:
            return shown
        accounts = sorted({pairs[i][0] for i in wanted})
        zones = await self._storage.call_many(
            [("HGET", AccountKeys(a).account, "timezone") for a in accounts]
        )
        zone_of = {a: z or self.default_timezone for a, z in zip(accounts, zones, strict=True)}
        now_ms = int(time.time() * 1000)
        names = []
        for i in wanted:
            account, key_id = pairs[i]
            spec = budgets.current_spec(raws[i], zone_of[account], now_ms)
            assert spec is not None
            names.append(AccountKeys(account).key_spend(key_id, budgets.spend_name(*spec)))
        spends = await self._storage.call_many([("HGETALL", name) for name in names])
        for i, spend in zip(wanted, spends, strict=True):
            shown[i] = budgets.shown(raws[i], zone_of[pairs[i][0]], spend, now_ms)
        return shown

    @property
    def storage(self) -> Storage:
        return self._storage

    async def _account_status(self, account_id: str) -> str:
        """The account's status (``active``, ``disabled``, ``deleted``); 404 if none."""
        check_id(account_id, "account id")
        created, status = await self._storage.call(
            "HMGET", AccountKeys(account_id).account, "created_ms", "status"
        )
        if created is None:  # none, or a stub left by an older build: not an account
            raise AccountError(404, "account_not_found", f"account {account_id!r} not found")
        return str(status or "active")

    async def _open_account(self, account_id: str) -> None:
        """404 for no account, 409 for a deleted one: what a change may not touch."""
        if await self._account_status(account_id) == "deleted":
            raise AccountError(409, "account_deleted", f"account {account_id!r} is deleted")

    async def create_key(
        self,
        account_id: str,
        *,
        name: str = "",
        models: list[str] | None = None,
        limits: Limits = NO_LIMITS,
        expires_at: str | None = None,
    ) -> CreatedKey:
        await self._open_account(account_id)
        secret, key_id, writes = _new_key_writes(account_id, name, models, limits, expires_at)
        # In order: the key's own hash first, so an index entry never points at nothing.
        for command in writes:
            await self._storage.call(*command)
        return CreatedKey(key=secret, record=await self.get_key(account_id, key_id))

    async def create_keys(
        self, account_id: str, count: int, limits: Limits = NO_LIMITS
    ) -> list[str]:
        """Many keys alike, in pipelined batches (benchmarks, bulk provisioning)."""
        await self._open_account(account_id)
        secrets_out: list[str] = []
        for start in range(0, count, 1000):
            batch: list[tuple[Any, ...]] = []
            for _ in range(min(1000, count - start)):
                secret, _key_id, writes = _new_key_writes(account_id, "", None, limits, None)
                secrets_out.append(secret)
                batch.extend(writes)
            await self._storage.call_many(batch)
        return secrets_out

    async def get_key(self, account_id: str, key_id: str) -> KeyRecord:
        raw = await self._storage.call("HGETALL", AccountKeys(account_id).key(key_id))
        record = key_from_hash(account_id, key_id, raw)
        if record is None:  # none, or a partial record: not a key
            raise _key_not_found(key_id)
        if raw.get("budget_nano"):
            (budget,) = await self._with_budgets([(account_id, key_id)], [raw])
            record = msgspec.structs.replace(record, budget=budget)
        return record

    async def key_by_id(self, key_id: str) -> KeyRecord:
        return await self.get_key(await self._key_account(key_id), key_id)

    async def list_keys(self, account_id: str) -> list[KeyRecord]:
        """Every key of one account (a deleted one's too: revoked), by id."""
        await self._account_status(account_id)
        key_ids = sorted(await self._storage.call("SMEMBERS", AccountKeys(account_id).key_ids))
        return await self._records([(account_id, key_id) for key_id in key_ids])

    async def page_keys(
        self, account_id: str | None = None, *, limit: int = 100, cursor: str | None = None
    ) -> KeyPage:
        """Keys by account id, then key id: of one account, or of every account in the
        account list (a deleted account is not in it). ``cursor`` is a page's
        ``next_cursor``: the page after it. Each page reads the account list whole."""
        if not 1 <= limit <= MAX_PAGE:
            raise AccountError(400, "invalid_request", f"limit must be 1 to {MAX_PAGE}")
        after = ("", "")
        if cursor:
            account, sep, key_id = cursor.partition("/")
            if not sep or not keyspace.ID_PATTERN.match(account) or not key_id:
                raise AccountError(400, "invalid_request", f"cursor {cursor!r} is not valid")
            after = (account, key_id)
        if account_id is not None:
            await self._account_status(account_id)
            account_ids = [account_id]
        else:
            members = await self._storage.call("SMEMBERS", keyspace.ACCOUNTS_SET)
            account_ids = sorted(a for a in members if a >= after[0])
        found: list[tuple[str, str]] = []
        for start in range(0, len(account_ids), 100):
            batch = account_ids[start : start + 100]
            key_sets = await self._storage.call_many(
                [("SMEMBERS", AccountKeys(a).key_ids) for a in batch]
            )
            for account, key_ids in zip(batch, key_sets, strict=True):
                found += [(account, k) for k in sorted(key_ids) if (account, k) > after]
                if len(found) > limit:
                    break
            if len(found) > limit:
                break
        more = len(found) > limit
        found = found[:limit]
        next_cursor = f"{found[-1][0]}/{found[-1][1]}" if more else None
        return KeyPage(data=await self._records(found), next_cursor=next_cursor)

    async def _records(self, keys: list[tuple[str, str]]) -> list[KeyRecord]:
        """The records of these (account, key id) pairs, in one round trip; a key whose hash
        is gone (a partial write) is left out."""
        if not keys:
            return []
        raws = await self._storage.call_many(
            [("HGETALL", AccountKeys(account).key(key_id)) for account, key_id in keys]
        )
        shown = await self._with_budgets(keys, raws)
        records = []
        for (a, k), raw, budget in zip(keys, raws, shown, strict=True):
            record = key_from_hash(a, k, raw)
            if record is not None:
                records.append(
                    record if budget is None else msgspec.structs.replace(record, budget=budget)
                )
        return records

    async def update_key(self, key_id: str, changes: dict[str, Any]) -> KeyRecord:
        """Set the name, models, limits or expiry (None clears one: no limit, every model,
        no expiry). In force on the next request (limits, expiry) or within a second (models,
        name) on every gateway."""
        unknown_fields(changes, _UPDATABLE)
        account_id = await self._key_account(key_id)
        if (await self.get_key(account_id, key_id)).revoked:
            raise AccountError(409, "key_revoked", f"key {key_id!r} is revoked")
        fields = FieldChanges()
        budgets.apply_budget_changes(fields, changes)
        for name, value in changes.items():
            if name in _BUDGET_CHANGES:
                continue
            if name == "name":
                if value is not None and not isinstance(value, str):
                    raise AccountError(400, "invalid_request", "name must be a string")
                fields.set("name", value or "")
            elif name == "model_limits":
                model_limits.change(fields, value)
            elif name == "models":
                models = _checked_models(value) or []
                fields.set("models", msgspec.json.encode(models).decode())
            elif name == "expires_at":
                if value is None:
                    fields.clear("expires_ms")
                else:
                    fields.set("expires_ms", parse_time_ms(value))
            else:
                fields.limit(name, value)
        writes = fields.commands(AccountKeys(account_id).key(key_id))
        if writes:
            await self._storage.call_many(writes, atomic=True)
            # Only once the hash has it: a gateway that hears of the change reads it at once.
            await self._storage.call(*published(key_id))
        return await self.get_key(account_id, key_id)

    async def rotate_key(self, key_id: str, grace_s: int = DEFAULT_GRACE_S) -> RotatedKey:
        """A new secret for the same key (its id, limits, buckets and spend). The old secret
        keeps working for ``grace_s`` seconds (0: it stops now), then never again."""
        if isinstance(grace_s, bool) or not isinstance(grace_s, int):
            raise AccountError(400, "invalid_request", "grace_s must be an integer")
        if not 0 <= grace_s <= MAX_GRACE_S:
            raise AccountError(400, "invalid_request", f"grace_s must be 0 to {MAX_GRACE_S}")
        account_id = await self._key_account(key_id)
        secret = _new_secret()
        digest = hash_key(secret)
        status, old_digest, grace_end = await self._storage.run(
            "rotate_key",
            [AccountKeys(account_id).key(key_id)],
            [digest, secret[:SHOWN_PREFIX_CHARS], grace_s * 1000],
        )
        if int(status) == -1:
            raise _key_not_found(key_id)
        if int(status) == -2:
            raise AccountError(409, "key_revoked", f"key {key_id!r} is revoked")
        record = await self.get_key(account_id, key_id)
        writes: list[tuple[Any, ...]] = [
            ("SET", keyspace.key_by_hash(digest), msgspec.json.encode(flatten(record)))
        ]
        if old_digest:  # "" for a key issued before keys named their secret: its entry stays
            old_index = keyspace.key_by_hash(old_digest)
            if grace_s:
                writes.append(("PEXPIREAT", old_index, int(grace_end)))
            else:
                writes.append(("DEL", old_index))
        # The key's hash decides which secrets open it (find_key): these only follow it.
        await self._storage.call_many([*writes, published(key_id)])
        return RotatedKey(key=secret, record=record, old_key_expires_at=iso(int(grace_end)))

    async def revoke_key(self, key_id: str) -> KeyRecord:
        account_id = await self._key_account(key_id)
        key_hash = AccountKeys(account_id).key(key_id)
        # admit.lua reads this flag on every request: revocation needs no cache expiry.
        await self._storage.call(
            "HSET", key_hash, "revoked", "1", "revoked_ms", int(time.time() * 1000)
        )
        return await self.get_key(account_id, key_id)

    async def _key_account(self, key_id: str) -> str:
        account_id = await self._storage.call("GET", keyspace.key_account(key_id))
        if account_id is None:
            raise _key_not_found(key_id)
        return str(account_id)

    async def find_key(self, secret: str) -> KeyRecord | None:
        """The key a caller presented, or None if no key has this secret (never issued, or
        a rotated-out secret past its grace).

        Two reads: the index entry says which key, the key's hash says the rest as it is now
        (models, name) and whether this secret still opens it. A retired secret's record
        expires at its grace's end (the key cache keeps it no longer). Revocation and the
        key's own expiry are admit.lua's to enforce, on every request.
        """
        if not secret.startswith(KEY_PREFIX):
            return None
        digest = hash_key(secret)
        indexed = await self._storage.call("GET", keyspace.key_by_hash(digest))
        if indexed is None:
            return None
        try:
            target = _INDEX_DECODER.decode(indexed)
            account_id, key_id = target.account, target.id
        except msgspec.DecodeError:
            # Keys issued by builds before the index carried the record: "account key_id".
            account_id, _, key_id = str(indexed).partition(" ")
        if not keyspace.ID_PATTERN.match(account_id):
            return None
        raw = await self._storage.call("HGETALL", AccountKeys(account_id).key(key_id))
        record = key_from_hash(account_id, key_id, raw)
        current = raw.get("secret_sha256")
        if record is None or current is None or current == digest:
            return record
        grace_end = int(raw.get(f"retired:{digest}") or raw.get(_LEGACY_SECRET) or 0)
        if grace_end <= time.time() * 1000:
            return None
        expires = raw.get("expires_ms")
        if not expires or int(expires) > grace_end:
            record = msgspec.structs.replace(record, expires_at=iso(grace_end))
        return record


def key_from_hash(account_id: str, key_id: str, raw: dict[str, str]) -> KeyRecord | None:
    """A key's record from its hash as storage holds it (None: not a key, e.g. a partial
    create); also how `archive restore` rebuilds a key's index entry."""
    if "created_ms" not in raw:
        return None
    expires = raw.get("expires_ms")
    return KeyRecord(
        id=key_id,
        account=account_id,
        name=raw.get("name", ""),
        prefix=raw.get("prefix", ""),
        models=tuple(msgspec.json.decode(raw.get("models", "[]"))),
        limits=Limits.from_hash(raw),
        expires_at=iso(int(expires)) if expires else None,
        revoked=raw.get("revoked") == "1",
        created_at=iso(int(raw["created_ms"])),
        model_limits=model_limits.decode(raw.get(model_limits.FIELD)),
    )


def _checked_models(models: Any) -> list[str] | None:
    if models is not None and (
        not isinstance(models, list) or not all(isinstance(m, str) and m for m in models)
    ):
        raise AccountError(400, "invalid_request", "models must be a list of model ids/globs")
    return models


def _new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _new_key_writes(
    account_id: str,
    name: str,
    models: list[str] | None,
    limits: Limits,
    expires_at: str | None,
) -> tuple[str, str, list[tuple[Any, ...]]]:
    """A new secret, its key id, and the storage writes that create it (in order)."""
    check_limits(limits)
    models = _checked_models(models)
    secret = _new_secret()
    digest = hash_key(secret)
    key_id = "key_" + secrets.token_hex(8)
    created_ms = int(time.time() * 1000)
    expires_ms = parse_time_ms(expires_at) if expires_at is not None else None
    fields: list[Any] = [
        "created_ms",
        created_ms,
        "account",
        account_id,
        "name",
        name,
        "prefix",
        secret[:SHOWN_PREFIX_CHARS],
        "models",
        msgspec.json.encode(models or []).decode(),
        "secret_sha256",
        digest,
        *limits.hash_fields(),
    ]
    if expires_ms is not None:
        fields += ["expires_ms", expires_ms]
    keys = AccountKeys(account_id)
    indexed = KeyRecord(
        id=key_id,
        account=account_id,
        name=name,
        prefix=secret[:SHOWN_PREFIX_CHARS],
        models=tuple(models or ()),
        limits=limits,
        expires_at=iso(expires_ms) if expires_ms is not None else None,
        created_at=iso(created_ms),
    )
    writes: list[tuple[Any, ...]] = [
        ("HSET", keys.key(key_id), *fields),
        ("SADD", keys.key_ids, key_id),
        ("SET", keyspace.key_account(key_id), account_id),
        ("SET", keyspace.key_by_hash(digest), msgspec.json.encode(flatten(indexed))),
    ]
    return secret, key_id, writes
