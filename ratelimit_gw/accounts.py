"""Accounts, API keys, top-ups and the ledger: the operations behind the admin API and CLI.

Keys are generated here (``rlgw-`` + 32 random bytes, url-safe), shown once, and stored only
as a SHA-256 hash. Everything per account lives under its hash tag (see keyspace.py); the
two lookup indexes let a request find its key and a revoke find its account.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any, Literal

import msgspec

from . import keyspace
from .keyspace import AccountKeys
from .limits import LIMIT_NAMES, MAX_LIMIT, NO_LIMITS, Limits, flat_type, flatten, nest
from .money import format_usd
from .storage import Storage

KEY_PREFIX = "rlgw-"
# How much of a secret a key record keeps and shows (`prefix`): enough to tell keys apart.
SHOWN_PREFIX_CHARS = 12
MAX_TOPUP_NANO = 10**18  # $1e9 per top-up
# Idempotency keys of the gateway's own top-ups (initial balances): callers may not use it.
RESERVED_IDEMPOTENCY_PREFIX = "rlgw:"
RpmPolicy = Literal["fixed", "balance", "tier"]


class AccountError(Exception):
    """A management operation cannot be done; ``status`` is the HTTP status it maps to."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


class Account(msgspec.Struct, kw_only=True):
    id: str
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


class KeyRecord(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    """What a gateway knows about a key (never the key itself)."""

    id: str
    account: str
    name: str
    prefix: str  # the first characters of the key, to recognise it in listings
    models: tuple[str, ...] = ()
    limits: Limits = NO_LIMITS  # as issued; flat in the index entry and the API
    expires_at: str | None = None
    revoked: bool = False
    created_at: str = ""

    def allows_model(self, model_id: str) -> bool:
        return not self.models or any(fnmatchcase(model_id, p) for p in self.models)


# The index entry is a KeyRecord's flat form, the same JSON every build has written.
_INDEX_DECODER = msgspec.json.Decoder(flat_type(KeyRecord))


class CreatedKey(msgspec.Struct, kw_only=True):
    key: str  # shown once
    record: KeyRecord


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
    settlement_id: str | None = None  # the gateway's own id (request_id is the caller's)
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


# The last instant a datetime can show (9999-12-31T23:59:59.999Z): a later time could be
# stored but never printed back.
_MAX_TIME_MS = 253_402_300_799_999


def parse_time_ms(value: str) -> int:
    """RFC 3339 time or unix seconds → unix ms, from 1970 to the end of year 9999."""
    try:
        if value.replace(".", "", 1).isdigit():
            time_ms = float(value) * 1000  # inf for absurdly many digits
        else:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            time_ms = parsed.timestamp() * 1000
    except ValueError:
        raise AccountError(400, "invalid_request", f"{value!r} is not an RFC 3339 time") from None
    if not 0 <= time_ms <= _MAX_TIME_MS:
        raise AccountError(
            400, "invalid_request", f"{value!r} is out of range (1970 to the end of 9999)"
        )
    return int(time_ms)


def _check_id(value: str, what: str) -> None:
    if not keyspace.ID_PATTERN.match(value):
        raise AccountError(
            400, "invalid_request", f"{what} must be 1-64 of A-Z a-z 0-9 _ . - (got {value!r})"
        )


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


def _check_limit(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise AccountError(400, "invalid_request", f"{name} must be a positive integer or null")
    if value is not None and value > MAX_LIMIT:
        raise AccountError(400, "invalid_request", f"{name} must be at most {MAX_LIMIT}")


def _check_limits(limits: Limits) -> None:
    for name, value in limits.items():
        _check_limit(name, value)


def _opt_int(value: str | None) -> int | None:
    return None if value in (None, "") else int(value)


class AccountStore:
    def __init__(self, storage: Storage) -> None:
        self._storage = storage

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
        _check_id(account_id, "account id")
        _check_limits(limits)
        _check_limit("rpm_override", rpm_override)
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
        if not await self._storage.run("create_account", [keys.account], fields):
            raise AccountError(409, "account_exists", f"account {account_id!r} already exists")
        await self._storage.call("SADD", keyspace.ACCOUNTS_SET, account_id)
        if balance_nano:
            initial = f"{RESERVED_IDEMPOTENCY_PREFIX}initial-balance:{account_id}"
            await self._credit(account_id, balance_nano, initial)
        return await self.get_account(account_id)

    async def get_account(self, account_id: str) -> Account:
        _check_id(account_id, "account id")
        keys = AccountKeys(account_id)
        # One snapshot: a settlement landing between two reads would mix two states.
        raw, live = await self._storage.call_many(
            [("HGETALL", keys.account), ("HLEN", keys.holds)], atomic=True
        )
        if "created_ms" not in raw:  # none, or a stub left by an older build: not an account
            raise AccountError(404, "account_not_found", f"account {account_id!r} not found")
        balance, held = int(raw.get("balance_nano", 0)), int(raw.get("held_nano", 0))
        return Account(
            id=account_id,
            prepaid=raw.get("prepaid") == "1",
            balance_usd=format_usd(balance),
            held_usd=format_usd(held),
            available_usd=format_usd(balance - held),
            spent_usd=format_usd(int(raw.get("spent_nano", 0))),
            topped_up_usd=format_usd(int(raw.get("topped_up_nano", 0))),
            limits=Limits.from_hash(raw),
            rpm_policy=raw.get("rpm_policy", "fixed"),
            rpm_override=_opt_int(raw.get("rpm_override")),
            holds_live=int(live),
            holds_expired=int(raw.get("holds_expired", 0)),
            overruns=int(raw.get("overruns", 0)),
            created_at=_iso(int(raw["created_ms"])),
        )

    async def is_prepaid(self, account_id: str) -> bool:
        """One field read: whether the account's money is protected by holds
        (docs/limits-and-balance.md)."""
        prepaid: str | None = await self._storage.call(
            "HGET", AccountKeys(account_id).account, "prepaid"
        )
        return prepaid == "1"

    async def update_account(self, account_id: str, changes: dict[str, Any]) -> Account:
        """Set or clear (None) limits, the rpm policy/override and whether it is prepaid."""
        await self.get_account(account_id)
        allowed = {*LIMIT_NAMES, "rpm_override", "rpm_policy", "prepaid"}
        unknown = sorted(set(changes) - allowed)
        if unknown:
            raise AccountError(400, "invalid_request", f"unknown field(s): {', '.join(unknown)}")
        to_set: list[Any] = []
        to_clear: list[str] = []
        for name, value in changes.items():
            if name == "rpm_policy":
                if value not in ("fixed", "balance", "tier"):
                    raise AccountError(
                        400, "invalid_request", "rpm_policy must be fixed, balance or tier"
                    )
                to_set += [name, value]
            elif name == "prepaid":
                if not isinstance(value, bool):
                    raise AccountError(400, "invalid_request", "prepaid must be true or false")
                to_set += [name, "1" if value else "0"]
            else:
                _check_limit(name, value)
                if value is None:
                    to_clear.append(name)
                else:
                    to_set += [name, value]
        account_key = AccountKeys(account_id).account
        if to_set:
            await self._storage.call("HSET", account_key, *to_set)
        if to_clear:
            await self._storage.call("HDEL", account_key, *to_clear)
        return await self.get_account(account_id)

    async def topup(self, account_id: str, amount_nano: int, idempotency_key: str) -> bool:
        """Credit once per idempotency key; False when that key was already used for the
        same amount (a retry). The key used before for another amount: 409
        ``idempotency_conflict``, nothing credited."""
        if idempotency_key.startswith(RESERVED_IDEMPOTENCY_PREFIX):
            raise AccountError(
                400,
                "invalid_request",
                f"idempotency keys starting with {RESERVED_IDEMPOTENCY_PREFIX!r} are reserved "
                "for the gateway's own top-ups",
            )
        return await self._credit(account_id, amount_nano, idempotency_key)

    async def _credit(self, account_id: str, amount_nano: int, idempotency_key: str) -> bool:
        if amount_nano <= 0:
            raise AccountError(400, "invalid_request", "amount_usd must be > 0")
        if amount_nano > MAX_TOPUP_NANO:
            # Balances are 64-bit integers of nano-USD in Redis: keep far from overflow.
            raise AccountError(400, "invalid_request", "amount_usd must be at most 1000000000")
        if not idempotency_key or len(idempotency_key) > 200:
            raise AccountError(400, "invalid_request", "idempotency_key is required (≤ 200 chars)")
        keys = AccountKeys(account_id)
        reply = await self._storage.run(
            "topup", [keys.account, keys.topups, keys.ledger], [amount_nano, idempotency_key]
        )
        credited = int(reply[0])
        if credited == -1:
            raise AccountError(404, "account_not_found", f"account {account_id!r} not found")
        if credited == -2:
            raise AccountError(
                409,
                "idempotency_conflict",
                f"idempotency key {idempotency_key!r} was already used for a top-up of "
                f"${format_usd(int(reply[3]))} on account {account_id!r}, not "
                f"${format_usd(amount_nano)}: use a new key for a new top-up",
            )
        return credited == 1

    async def ledger(self, account_id: str, limit: int = 100) -> list[LedgerEntry]:
        """The newest ``limit`` ledger entries, newest first."""
        await self.get_account(account_id)
        rows = await self._storage.call(
            "XREVRANGE", AccountKeys(account_id).ledger, "+", "-", "COUNT", limit
        )
        return [_ledger_entry(entry_id, _pairs(fields)) for entry_id, fields in rows]

    async def create_key(
        self,
        account_id: str,
        *,
        name: str = "",
        models: list[str] | None = None,
        limits: Limits = NO_LIMITS,
        expires_at: str | None = None,
    ) -> CreatedKey:
        await self.get_account(account_id)
        secret, key_id, writes = _new_key_writes(account_id, name, models, limits, expires_at)
        # In order: the key's own hash first, so an index entry never points at nothing.
        for command in writes:
            await self._storage.call(*command)
        return CreatedKey(key=secret, record=await self.get_key(account_id, key_id))

    async def create_keys(
        self, account_id: str, count: int, limits: Limits = NO_LIMITS
    ) -> list[str]:
        """Many keys alike, in pipelined batches (benchmarks, bulk provisioning)."""
        await self.get_account(account_id)
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
        raw: dict[str, str] = await self._storage.call(
            "HGETALL", AccountKeys(account_id).key(key_id)
        )
        if "created_ms" not in raw:  # none, or a partial record: not a key
            raise _key_not_found(key_id)
        expires = raw.get("expires_ms")
        return KeyRecord(
            id=key_id,
            account=account_id,
            name=raw.get("name", ""),
            prefix=raw.get("prefix", ""),
            models=tuple(msgspec.json.decode(raw.get("models", "[]"))),
            limits=Limits.from_hash(raw),
            expires_at=_iso(int(expires)) if expires else None,
            revoked=raw.get("revoked") == "1",
            created_at=_iso(int(raw["created_ms"])),
        )

    async def list_keys(self, account_id: str) -> list[KeyRecord]:
        await self.get_account(account_id)
        key_ids = sorted(await self._storage.call("SMEMBERS", AccountKeys(account_id).key_ids))
        return [await self.get_key(account_id, key_id) for key_id in key_ids]

    async def list_accounts(self) -> list[str]:
        return sorted(await self._storage.call("SMEMBERS", keyspace.ACCOUNTS_SET))

    async def revoke_key(self, key_id: str) -> KeyRecord:
        account_id = await self._storage.call("GET", keyspace.key_account(key_id))
        if account_id is None:
            raise _key_not_found(key_id)
        key_hash = AccountKeys(account_id).key(key_id)
        # admit.lua reads this flag on every request: revocation needs no cache expiry.
        await self._storage.call(
            "HSET", key_hash, "revoked", "1", "revoked_ms", int(time.time() * 1000)
        )
        return await self.get_key(account_id, key_id)

    async def find_key(self, secret: str) -> KeyRecord | None:
        """The key a caller presented, or None if no such key was ever issued.

        One GET: the index entry carries the key's immutable facts (account, models, expiry,
        limits as issued). Its ``revoked`` is not maintained there — admit.lua reads the live
        flag from the key's own hash on every request.
        """
        if not secret.startswith(KEY_PREFIX):
            return None
        indexed = await self._storage.call("GET", keyspace.key_by_hash(hash_key(secret)))
        if indexed is None:
            return None
        try:
            return nest(_INDEX_DECODER.decode(indexed), KeyRecord)
        except msgspec.DecodeError:
            pass
        # Keys issued by builds before the index carried the record: "account key_id".
        account_id, _, key_id = str(indexed).partition(" ")
        try:
            return await self.get_key(account_id, key_id)
        except AccountError:
            return None


def _new_key_writes(
    account_id: str,
    name: str,
    models: list[str] | None,
    limits: Limits,
    expires_at: str | None,
) -> tuple[str, str, list[tuple[Any, ...]]]:
    """A new secret, its key id, and the storage writes that create it (in order)."""
    _check_limits(limits)
    if models is not None and (
        not isinstance(models, list) or not all(isinstance(m, str) and m for m in models)
    ):
        raise AccountError(400, "invalid_request", "models must be a list of model ids/globs")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = "key_" + secrets.token_hex(8)
    created_ms = int(time.time() * 1000)
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
        *limits.hash_fields(),
    ]
    if expires_at is not None:
        fields += ["expires_ms", parse_time_ms(expires_at)]
    keys = AccountKeys(account_id)
    indexed = KeyRecord(
        id=key_id,
        account=account_id,
        name=name,
        prefix=secret[:SHOWN_PREFIX_CHARS],
        models=tuple(models or ()),
        limits=limits,
        expires_at=_iso(parse_time_ms(expires_at)) if expires_at is not None else None,
        created_at=_iso(created_ms),
    )
    writes: list[tuple[Any, ...]] = [
        ("HSET", keys.key(key_id), *fields),
        ("SADD", keys.key_ids, key_id),
        ("SET", keyspace.key_account(key_id), account_id),
        ("SET", keyspace.key_by_hash(hash_key(secret)), msgspec.json.encode(flatten(indexed))),
    ]
    return secret, key_id, writes


def _pairs(fields: Any) -> dict[str, str]:
    if isinstance(fields, dict):
        return fields
    return dict(zip(fields[::2], fields[1::2], strict=True))


def _usd(fields: dict[str, str], name: str) -> str | None:
    value = fields.get(name)
    return format_usd(int(value)) if value not in (None, "") else None


def _ledger_entry(entry_id: str, f: dict[str, str]) -> LedgerEntry:
    entry_type = f.get("type", "")
    return LedgerEntry(
        id=entry_id,
        time=_iso(int(entry_id.split("-", 1)[0])),
        type=entry_type,
        request_id=f.get("request_id"),
        key_id=f.get("key_id"),
        model=f.get("model"),
        input_tokens=_opt_int(f.get("input_tokens")),
        output_tokens=_opt_int(f.get("output_tokens")),
        cost_usd=_usd(f, "cost_nano") if entry_type != "topup" else None,
        amount_usd=_usd(f, "amount_nano"),
        hold_usd=_usd(f, "hold_nano"),
        balance_usd=_usd(f, "balance_nano"),
        outcome=f.get("outcome"),
        idempotency_key=f.get("idempotency_key"),
        settlement_id=f.get("settlement_id"),
        cache_read_tokens=_opt_int(f.get("cache_read_tokens")),
        cache_write_tokens=_opt_int(f.get("cache_write_tokens")),
    )
