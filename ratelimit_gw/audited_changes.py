"""The changes the admin API and the CLI make to accounts and keys, each with its audit line.

One home for "a change and its record": the admin handlers and the CLI verbs call these, never
the store's change methods, so neither can change something without the audit trail
(audit.py) showing who did it and the state before and after. A change that changes nothing
(a retried top-up or adjustment, disabling a disabled account) writes no line. Reads go to the
store directly; tests and the demo, which set up state behind the API's back, do too.
"""

from __future__ import annotations

from typing import Any

from .accounts import Account, AccountStore, Deletion, RpmPolicy
from .audit import record
from .keys import CreatedKey, KeyRecord, RotatedKey
from .limits import NO_LIMITS, Limits


class AuditedChanges:
    """The store's changes made by ``actor`` (an admin token's name, or ``cli:<user>``)."""

    def __init__(self, store: AccountStore, actor: str) -> None:
        self._store = store
        self._actor = actor

    async def create_account(
        self,
        account_id: str,
        *,
        balance_nano: int | None = None,
        limits: Limits = NO_LIMITS,
        rpm_policy: RpmPolicy = "fixed",
        rpm_override: int | None = None,
    ) -> Account:
        account = await self._store.create_account(
            account_id,
            balance_nano=balance_nano,
            limits=limits,
            rpm_policy=rpm_policy,
            rpm_override=rpm_override,
        )
        record(self._actor, "account.create", account.id, None, account)
        return account

    async def update_account(self, account_id: str, changes: dict[str, Any]) -> Account:
        before = await self._store.get_account(account_id)
        after = await self._store.update_account(account_id, changes)
        record(self._actor, "account.update", account_id, before, after)
        return after

    async def topup(
        self, account_id: str, amount_nano: int, idempotency_key: str
    ) -> tuple[bool, Account]:
        """Whether it credited (False: this idempotency key already did), and the account."""
        before = await self._store.get_account(account_id)
        credited = await self._store.topup(account_id, amount_nano, idempotency_key)
        after = await self._store.get_account(account_id)
        if credited:
            record(self._actor, "account.topup", account_id, before, after)
        return credited, after

    async def adjust(
        self, account_id: str, amount_nano: int, reason: str, idempotency_key: str
    ) -> tuple[bool, Account]:
        """Whether it moved money (False: this idempotency key already did), and the account."""
        before = await self._store.get_account(account_id)
        adjusted = await self._store.adjust(account_id, amount_nano, reason, idempotency_key)
        after = await self._store.get_account(account_id)
        if adjusted:
            record(self._actor, "account.adjust", account_id, before, after)
        return adjusted, after

    async def set_disabled(self, account_id: str, disabled: bool) -> Account:
        before = await self._store.get_account(account_id)
        if not await self._store.set_disabled(account_id, disabled):
            return before
        after = await self._store.get_account(account_id)
        action = "account.disable" if disabled else "account.enable"
        record(self._actor, action, account_id, before, after)
        return after

    async def delete_account(self, account_id: str, *, force: bool = False) -> Deletion:
        before = await self._store.get_account(account_id)
        deleted = await self._store.delete_account(account_id, force=force)
        record(self._actor, "account.delete", account_id, before, deleted)
        return deleted

    async def create_key(
        self,
        account_id: str,
        *,
        name: str = "",
        models: list[str] | None = None,
        limits: Limits = NO_LIMITS,
        expires_at: str | None = None,
    ) -> CreatedKey:
        created = await self._store.create_key(
            account_id, name=name, models=models, limits=limits, expires_at=expires_at
        )
        record(self._actor, "key.create", created.record.id, None, created.record)
        return created

    async def update_key(self, key_id: str, changes: dict[str, Any]) -> KeyRecord:
        before = await self._store.key_by_id(key_id)
        after = await self._store.update_key(key_id, changes)
        record(self._actor, "key.update", key_id, before, after)
        return after

    async def rotate_key(self, key_id: str, grace_s: int) -> RotatedKey:
        before = await self._store.key_by_id(key_id)
        rotated = await self._store.rotate_key(key_id, grace_s)
        # The record and when the old secret stops: never the new secret.
        record(self._actor, "key.rotate", key_id, before, rotated.without_secret())
        return rotated

    async def revoke_key(self, key_id: str) -> KeyRecord:
        before = await self._store.key_by_id(key_id)
        revoked = await self._store.revoke_key(key_id)
        record(self._actor, "key.revoke", revoked.id, before, revoked)
        return revoked
